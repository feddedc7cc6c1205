import EdgeMatrixCore
import EdgeMatrixNetwork
import EdgeMatrixStore
import GRPCCore
import GRPCNIOTransportHTTP2
import Hummingbird
import HummingbirdCore
import Logging
import Metrics
import ServiceLifecycle

public struct RouterConfiguration: Sendable {
    public var httpHost: String
    /// 0 picks a free port; `onReady` reports the bound one.
    public var httpPort: Int
    public var tunnelHost: String
    public var tunnelPort: Int
    public var dataDirectory: String
    public var selectionSeed: UInt64
    public var failover: FailoverPolicy
    public var limits: PoolLimits
    /// An HTTP connection with nothing to read or write for this long is closed (also a request body that stalls).
    public var httpIdleTimeoutSeconds: Int64
    /// Open client connections; beyond this the router stops accepting until one closes. With the per-route body
    /// cap this bounds the memory client requests can hold.
    public var maxHTTPConnections = 512

    public init(httpHost: String = "127.0.0.1", httpPort: Int = 8080, tunnelHost: String = "127.0.0.1", tunnelPort: Int = 7070,
                dataDirectory: String, selectionSeed: UInt64 = UInt64.random(in: .min ... .max),
                failover: FailoverPolicy = FailoverPolicy(), limits: PoolLimits = PoolLimits(), httpIdleTimeoutSeconds: Int64 = 30) {
        self.limits = limits
        self.httpIdleTimeoutSeconds = httpIdleTimeoutSeconds
        self.httpHost = httpHost
        self.httpPort = httpPort
        self.tunnelHost = tunnelHost
        self.tunnelPort = tunnelPort
        self.dataDirectory = dataDirectory
        self.selectionSeed = selectionSeed
        self.failover = failover
    }

    public var databasePath: String { dataDirectory + "/router.sqlite" }
}

/// Where a running router listens.
public struct RouterEndpoints: Sendable, Equatable {
    public var httpPort: Int
    public var tunnelPort: Int
}

/// A routing node: the tunnel endpoint compute nodes dial into, and the OpenAI-compatible gateway.
public struct RouterService: Service {
    public let configuration: RouterConfiguration
    public let key: SigningKey
    public let pool: NodePool
    public let receipts: ReceiptStore
    let database: RouterDatabase
    /// The settlement batches closed from `receipts` (a `SettlementSubmitter` beside the router closes and sends them).
    public let settlements: SettlementStore
    /// Requests still being served: settlement batches close only behind them.
    public let inFlight: InFlightSequences
    /// Requests assigned up to this long before a restart are held after it, for as long (10 minutes).
    static let restartHoldMillis: UInt64 = 600_000
    /// The compute nodes the chain lets serve (kept current by a registry follower beside the router).
    public let admission: RegisteredNodes
    /// The compute nodes' unit prices that assignments and receipts name.
    let priceBook: any PriceBook
    let spendEpochs: any SpendEpochs
    /// The payers' escrows with this router on chain.
    let escrows: any EscrowView
    let metricsText: @Sendable () -> [UInt8]
    let onReady: @Sendable (RouterEndpoints) async -> Void
    let logger: Logger

    public init(configuration: RouterConfiguration, key: SigningKey, admission: RegisteredNodes, priceBook: any PriceBook = FreePriceBook(),
                spendEpochs: any SpendEpochs = SingleSpendEpoch(), escrows: any EscrowView = UncheckedEscrow(),
                metricsText: @escaping @Sendable () -> [UInt8], logger: Logger = Logger(label: "emc.router"),
                onReady: @escaping @Sendable (RouterEndpoints) async -> Void = { _ in }) throws {
        self.priceBook = priceBook
        self.escrows = escrows
        self.spendEpochs = spendEpochs
        self.configuration = configuration
        self.key = key
        self.admission = admission
        self.metricsText = metricsText
        self.logger = logger
        self.onReady = onReady
        database = try RouterDatabase(path: configuration.databasePath)
        inFlight = InFlightSequences()
        receipts = ReceiptStore(database: database, holds: inFlight)
        // A restart forgets what was in flight: hold the requests assigned before it whose receipts have not come, so
        // that no batch closes over them before their nodes reconnect and re-deliver.
        let awaiting = try receipts.sequencesAwaitingReceipt(
            assignedSinceMillis: wallClockMillis() - min(wallClockMillis(), Self.restartHoldMillis))
        for (sequence, node) in awaiting {
            inFlight.holdUntilReceipt(sequence, node: node, for: .milliseconds(Int64(Self.restartHoldMillis)))
        }
        if let lowest = awaiting.first {
            logger.info("holding requests assigned before the restart until their nodes reconnect and re-deliver receipts",
                        metadata: ["count": "\(awaiting.count)", "lowest": "\(lowest.sequence)"])
        }
        settlements = SettlementStore(database: database)
        pool = NodePool(seed: configuration.selectionSeed, limits: configuration.limits, logger: logger)
    }

    public func run() async throws {
        let endpoint = TunnelEndpoint(routerKey: key, pool: pool, receipts: ReceiptCollector(routerKey: key, store: receipts),
                                      admission: admission, prices: priceBook, inFlight: inFlight, logger: logger)
        let admission = admission
        let pool = pool
        let tls = try NodeTLS.loadOrCreate(in: configuration.dataDirectory, name: "tunnel", key: key)
        let transport = HTTP2ServerTransport.Posix(
            address: .ipv4(host: configuration.tunnelHost, port: configuration.tunnelPort),
            transportSecurity: tls.serverSecurity(),
            // Node messages are answer chunks (tens of KiB), receipts and heartbeats: 4 MiB bounds any one of them.
            config: .defaults {
                $0.rpc.maxRequestPayloadSize = 4 << 20
                // A connection quiet for 30 s is pinged; no answer within 10 s closes it (a frozen host, a dead path).
                // Nodes may ping too (they watch for a frozen router), but not more often than every 10 s.
                $0.connection.keepalive = .init(time: .seconds(30), timeout: .seconds(10),
                                                clientBehavior: .init(minPingIntervalWithoutCalls: .seconds(10), allowWithoutCalls: true))
                // A TLS connection that opens no stream holds a socket for nothing.
                $0.connection.maxIdleTime = .seconds(60)
            }
        )
        let grpcServer = GRPCServer(transport: transport, services: [endpoint])
        let gateway = Gateway(pool: pool, forwarder: Forwarder(pool: pool, policy: configuration.failover, logger: logger),
                              keys: APIKeyCache(store: APIKeyStore(database: database)), receipts: receipts, routerKey: key.publicKey,
                              epochs: spendEpochs, escrows: escrows, prices: priceBook, inFlight: inFlight,
                              settlementData: SettlementDataRoutes(store: settlements, router: key.publicKey, logger: logger),
                              metricsText: metricsText, logger: logger)
        let onReady = onReady
        let logger = logger
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { try await grpcServer.serve() }
            // A node the chain retires or slashes below its stake minimum is dropped as soon as the registry says so.
            group.addTask {
                for await admitted in admission.updates {
                    let dropped = await pool.retain(admitted: admitted, reason: "no longer an eligible compute node on chain")
                    if dropped > 0 { Counter(label: "emc_router_nodes_dropped_by_registry_total").increment(by: dropped) }
                }
            }
            let tunnelPort = try await transport.listeningAddress.ipv4?.port ?? configuration.tunnelPort
            let app = Application(
                router: gateway.makeRouter(),
                server: .http1(configuration: .init(idleTimeout: .seconds(configuration.httpIdleTimeoutSeconds))),
                configuration: .init(address: .hostname(configuration.httpHost, port: configuration.httpPort),
                                     serverName: "edgematrix-router",
                                     availableConnectionsDelegate: MaximumAvailableConnections(configuration.maxHTTPConnections)),
                onServerRunning: { channel in
                    let httpPort = channel.localAddress?.port ?? 0
                    logger.info("router ready", metadata: ["http": "\(httpPort)", "tunnel": "\(tunnelPort)"])
                    await onReady(RouterEndpoints(httpPort: httpPort, tunnelPort: tunnelPort))
                },
                logger: logger
            )
            group.addTask {
                try await withGracefulShutdownHandler {
                    try await app.run()
                } onGracefulShutdown: {
                    grpcServer.beginGracefulShutdown()
                    admission.finish()
                }
                admission.finish()
            }
        }
    }
}
