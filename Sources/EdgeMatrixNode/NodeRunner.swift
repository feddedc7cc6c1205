import AsyncHTTPClient
import EdgeMatrixChain
import EdgeMatrixCompute
import EdgeMatrixCore
import EdgeMatrixRouter
import Logging
import ServiceLifecycle

/// Runs a single node role under a service group with graceful shutdown on SIGINT/SIGTERM.
public enum NodeRunner {
    /// The node keeps its unacknowledged receipts in DATA_DIR/outbox.sqlite, so they survive a crash. With `chainURL`
    /// (a validator's HTTP API) it also settles its own countersigned receipts when a router does not
    /// (`ReceiptNoticeService`, docs/SETTLEMENT.md § 10), and checks every batch of its routers that covers its
    /// receipts, filing challenges itself (`WatchtowerService`, § 11; the node key's account posts the bond).
    public static func runCompute(configPath: String, key: SigningKey, dataDirectory: String, chainURL: String? = nil,
                                  noticeGraceBlocks: UInt64? = nil, logger: Logger) async throws {
        NodeMetrics.bootstrap()
        let configuration = try ComputeConfiguration.load(from: configPath)
        let outbox = try ReceiptOutbox(path: dataDirectory + "/outbox.sqlite", logger: logger)
        let httpClient = HTTPClient(eventLoopGroupProvider: .singleton)
        let node = ComputeNode(configuration: configuration, key: key, httpClient: httpClient, outbox: outbox, logger: logger)
        var services: [any Service] = [node]
        if let chainURL {
            services.append(ReceiptNoticeService(client: ChainClient(baseURL: chainURL), nodeKey: key, outbox: outbox,
                                                 routers: configuration.routers.map(\.key), logger: logger, graceBlocks: noticeGraceBlocks))
            services.append(WatchtowerService(client: ChainClient(baseURL: chainURL), nodeKey: key, outbox: outbox,
                                              routers: configuration.routers.map(\.key), http: httpClient, logger: logger))
        } else {
            logger.warning("no --chain given: this node cannot settle its own receipts should a router stop settling them, nor check its routers' batches")
        }
        let group = ServiceGroup(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        do { try await group.run() } catch {
            try? await httpClient.shutdown()
            throw error
        }
        try await httpClient.shutdown()
    }

    /// A router admits the compute nodes that the chain at `chainURL` (a validator's HTTP API) has registered.
    /// Assignments and receipts name the prices of the nodes' price lists in that registry.
    public static func runRouter(configuration: RouterConfiguration, key: SigningKey, chainURL: String, logger: Logger,
                                 onReady: @escaping @Sendable (RouterEndpoints) async -> Void) async throws {
        NodeMetrics.bootstrap()
        let admitted = RegisteredNodes()
        let priceBook = RegistryPriceBook()
        let escrows = ChainEscrows(router: key.publicKey)
        let router = try RouterService(configuration: configuration, key: key, admission: admitted, priceBook: priceBook,
                                       escrows: escrows, metricsText: NodeMetrics.text, logger: logger, onReady: onReady)
        let follower = RegistryFollower(nodeURL: chainURL, admitted: admitted, prices: priceBook, escrows: escrows, logger: logger)
        let settlement = SettlementSubmitter(client: ChainClient(baseURL: chainURL), routerKey: key, store: router.settlements,
                                             inFlight: router.inFlight, logger: logger)
        let group = ServiceGroup(services: [router, follower, settlement], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        try await group.run()
    }
}
