import AsyncHTTPClient
import EdgeMatrixCompute
import EdgeMatrixCore
import EdgeMatrixRouter
import Logging
import ServiceLifecycle

/// Runs a single node role under a service group with graceful shutdown on SIGINT/SIGTERM.
public enum NodeRunner {
    public static func runCompute(configPath: String, key: SigningKey, logger: Logger) async throws {
        NodeMetrics.bootstrap()
        let configuration = try ComputeConfiguration.load(from: configPath)
        let httpClient = HTTPClient(eventLoopGroupProvider: .singleton)
        let node = ComputeNode(configuration: configuration, key: key, httpClient: httpClient, logger: logger)
        let group = ServiceGroup(services: [node], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        do { try await group.run() } catch {
            try? await httpClient.shutdown()
            throw error
        }
        try await httpClient.shutdown()
    }

    public static func runRouter(configuration: RouterConfiguration, key: SigningKey, logger: Logger,
                                 onReady: @escaping @Sendable (RouterEndpoints) async -> Void) async throws {
        NodeMetrics.bootstrap()
        let router = try RouterService(configuration: configuration, key: key, metricsText: NodeMetrics.text, logger: logger,
                                       onReady: onReady)
        let group = ServiceGroup(services: [router], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        try await group.run()
    }
}
