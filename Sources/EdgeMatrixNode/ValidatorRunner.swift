import EdgeMatrixChain
import EdgeMatrixCore
import Logging
import ServiceLifecycle

extension NodeRunner {
    /// Runs one validator until SIGINT/SIGTERM.
    public static func runValidator(configuration: ValidatorConfiguration, key: SigningKey, logger: Logger,
                                    onReady: @escaping @Sendable (_ httpPort: Int, _ p2pPort: Int) async -> Void) async throws {
        _ = NodeMetrics.registry  // bootstrap swift-metrics before the node creates its counters
        let node = try ValidatorNode(configuration: configuration, key: key, metricsText: NodeMetrics.text, logger: logger,
                                     onReady: onReady)
        let group = ServiceGroup(services: [node], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        try await group.run()
    }
}
