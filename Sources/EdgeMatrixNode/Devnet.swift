import AsyncHTTPClient
import EdgeMatrixChain
import EdgeMatrixCompute
import EdgeMatrixCore
import EdgeMatrixRouter
import EdgeMatrixStore
import Foundation
import Logging
import ServiceLifecycle

/// A whole local network on one machine with embedded defaults: one router, two compute nodes, and the real
/// local models they front (on a small machine both nodes front the same model servers).
/// Everything lives under one data dir, so a second run reuses keys, API key, models and receipts.
public struct Devnet: Sendable {
    public struct Layout: Sendable {
        public var dataDirectory: String
        public var httpPort: Int
        public var tunnelPort: Int { httpPort + 1 }
        public var chatPort: Int { httpPort + 10 }
        public var embeddingsPort: Int { httpPort + 11 }
        public var routerDirectory: String { dataDirectory + "/router" }
        public func computeDirectory(_ index: Int) -> String { dataDirectory + "/compute-\(index)" }
        public var modelsDirectory: String { dataDirectory + "/models" }
        public var logsDirectory: String { dataDirectory + "/logs" }
        public var apiKeyPath: String { dataDirectory + "/api-key.txt" }
        public var baseURL: String { "http://127.0.0.1:\(httpPort)/v1" }
        /// Validator i (0-based): HTTP API on PORT+20+i, peer port PORT+30+i (on first run; later runs keep the genesis').
        public func validatorHTTPPort(_ i: Int) -> Int { httpPort + 20 + i }
        public func validatorP2PPort(_ i: Int) -> Int { httpPort + 30 + i }
        public var nodeURL: String { "http://127.0.0.1:\(validatorHTTPPort(0))" }
        public var genesisPath: String { dataDirectory + "/genesis.json" }
        public var fundedKeyPath: String { dataDirectory + "/funded.key" }
    }

    public let layout: Layout
    public let computeNodeCount = 2
    public let validatorCount = 4
    let logger: Logger

    public init(dataDirectory: String, httpPort: Int, logger: Logger) {
        layout = Layout(dataDirectory: dataDirectory, httpPort: httpPort)
        self.logger = logger
    }

    /// Runs until SIGINT/SIGTERM. `say` prints progress and the banner for the person at the terminal.
    public func run(venv: String? = nil, say: @escaping @Sendable (String) -> Void) async throws {
        NodeMetrics.bootstrap()
        let fm = FileManager.default
        for dir in [layout.routerDirectory, layout.logsDirectory, layout.modelsDirectory] + (1...computeNodeCount).map(layout.computeDirectory) {
            try fm.createDirectory(atPath: dir, withIntermediateDirectories: true)
        }
        let models = LocalModels(venv: venv ?? layout.modelsDirectory + "/venv")
        try models.setUp(progress: say)

        let routerKey = try KeyFile.loadOrCreate(at: layout.routerDirectory + "/node.key")
        let routerConfig = RouterConfiguration(httpHost: "127.0.0.1", httpPort: layout.httpPort, tunnelHost: "127.0.0.1",
                                               tunnelPort: layout.tunnelPort, dataDirectory: layout.routerDirectory)
        let (ready, readySink) = AsyncStream<RouterEndpoints>.makeStream()
        let admitted = RegisteredNodes()
        let priceBook = RegistryPriceBook()
        let escrows = ChainEscrows(router: routerKey.publicKey)
        let router = try RouterService(configuration: routerConfig, key: routerKey, admission: admitted, priceBook: priceBook,
                                       escrows: escrows, metricsText: NodeMetrics.text,
                                       logger: logger) { endpoints in readySink.yield(endpoints) }

        let httpClient = HTTPClient(eventLoopGroupProvider: .singleton)
        var services: [any Service] = [
            try models.chatServer(port: layout.chatPort, logPath: layout.logsDirectory + "/chat-model.log", logger: logger),
            try models.embeddingsServer(port: layout.embeddingsPort, logPath: layout.logsDirectory + "/embeddings.log", logger: logger),
            router,
            RegistryFollower(nodeURL: layout.nodeURL, admitted: admitted, prices: priceBook, escrows: escrows, logger: logger),
            SettlementSubmitter(client: ChainClient(baseURL: layout.nodeURL), routerKey: routerKey, store: router.settlements,
                                inFlight: router.inFlight, logger: logger),
        ]
        var computeKeys = [SigningKey]()
        for index in 1...computeNodeCount {
            let key = try KeyFile.loadOrCreate(at: layout.computeDirectory(index) + "/node.key")
            computeKeys.append(key)
            let config = ComputeConfiguration(
                routers: [.init(address: "127.0.0.1:\(layout.tunnelPort)", key: routerKey.publicKey)],
                maxConcurrent: 8,
                apps: [
                    .init(name: "llm", kind: .openai, baseURL: "http://127.0.0.1:\(layout.chatPort)", models: [LocalModels.chatModel]),
                    .init(name: "embeddings", kind: .openai, baseURL: "http://127.0.0.1:\(layout.embeddingsPort)",
                          models: [LocalModels.embeddingModel]),
                ],
                probeIntervalSeconds: 2)
            try writeJSON(config, to: layout.computeDirectory(index) + "/config.json")
            var nodeLogger = logger
            nodeLogger[metadataKey: "node"] = "compute-\(index)"
            let outbox = try ReceiptOutbox(path: layout.computeDirectory(index) + "/outbox.sqlite", logger: nodeLogger)
            services.append(ComputeNode(configuration: config, key: key, httpClient: httpClient, outbox: outbox, logger: nodeLogger))
            services.append(ReceiptNoticeService(client: ChainClient(baseURL: layout.nodeURL), nodeKey: key, outbox: outbox,
                                                 routers: [routerKey.publicKey], logger: nodeLogger))
            services.append(WatchtowerService(client: ChainClient(baseURL: layout.nodeURL), nodeKey: key, outbox: outbox,
                                              routers: [routerKey.publicKey], http: httpClient, logger: nodeLogger))
        }
        services += try validators()
        // After the validators: their genesis creates the funded account the key is bound to.
        let apiKey = try devnetAPIKey(database: routerConfig.databasePath, router: routerKey.publicKey)
        // The devnet's router and compute nodes join the chain like anyone's: bonded and registered at start-up.
        services.append(DevnetEnrollment(client: ChainClient(baseURL: layout.nodeURL), owner: try KeyFile.read(from: layout.fundedKeyPath),
                                         router: (routerKey, "127.0.0.1:\(layout.tunnelPort)", "http://127.0.0.1:\(layout.httpPort)"), computeNodes: computeKeys, say: say))
        let banner = DevnetBanner(layout: layout, apiKey: apiKey)
        services.append(ReadinessReporter(ready: ready, baseURL: layout.baseURL, apiKey: apiKey, httpClient: httpClient,
                                          expectedModels: [LocalModels.chatModel, LocalModels.embeddingModel],
                                          say: say, banner: banner.text))
        let group = ServiceGroup(configuration: .init(services: services.map { .init(service: $0) },
                                                      gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        do {
            try await group.run()
        } catch {
            try? await httpClient.shutdown()
            throw error
        }
        try? await httpClient.shutdown()
        say("devnet stopped; state kept in \(layout.dataDirectory)")
    }

    /// Four in-process validators (f = 1) from a genesis generated once into DATA_DIR/genesis.json.
    func validators() throws -> [any Service] {
        _ = NodeMetrics.registry  // bootstrap swift-metrics before the validators create their counters
        let endpoints = (0..<validatorCount).map { "127.0.0.1:\(layout.validatorP2PPort($0))" }
        let genesis = try DevnetGenesis.loadOrCreate(directory: layout.dataDirectory, chainID: "emc-devnet", endpoints: endpoints)
        let genesisLayout = DevnetGenesis.Layout(directory: layout.dataDirectory)
        var services = [any Service]()
        for (i, validator) in genesis.validators.enumerated() {
            let key = try KeyFile.read(from: genesisLayout.validatorKeyPath(i + 1))
            guard key.publicKey == validator.nodeKey else {
                throw ChainError.genesis("\(genesisLayout.validatorKeyPath(i + 1)) does not hold validator \(i + 1)'s key of \(layout.genesisPath)")
            }
            let p2pPort = validator.endpoints.first.flatMap { PeerAddress(key: key.publicKey, endpoint: $0)?.port } ?? layout.validatorP2PPort(i)
            var nodeLogger = logger
            nodeLogger[metadataKey: "node"] = "validator-\(i + 1)"
            let configuration = ValidatorConfiguration(genesis: genesis, dataDirectory: genesisLayout.validatorDirectory(i + 1),
                                                       httpPort: layout.validatorHTTPPort(i), p2pPort: p2pPort)
            services.append(try ValidatorNode(configuration: configuration, key: key, metricsText: NodeMetrics.text, logger: nodeLogger))
        }
        return services
    }

    /// The devnet's API key: created once, stored beside the data so a second run prints the same key, and bound to
    /// the funded devnet account (signed by its key), so that the requests it makes are that account's to pay. A key
    /// left by an older devnet that is not bound to that account is replaced.
    func devnetAPIKey(database: String, router: PublicKey) throws -> String {
        let funded = try KeyFile.read(from: layout.fundedKeyPath)
        let store = APIKeyStore(database: try RouterDatabase(path: database))
        if let existing = try? String(contentsOfFile: layout.apiKeyPath, encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines), !existing.isEmpty,
           try store.lookup(existing)?.account == Account(owner: funded.publicKey) {
            return existing
        }
        let key = try store.create(label: "devnet", router: router, signer: funded)
        try? FileManager.default.removeItem(atPath: layout.apiKeyPath)
        FileManager.default.createFile(atPath: layout.apiKeyPath, contents: Data((key + "\n").utf8),
                                       attributes: [.posixPermissions: 0o600])
        return key
    }
}

func writeJSON<T: Encodable>(_ value: T, to path: String) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    try encoder.encode(value).write(to: URL(fileURLWithPath: path), options: .atomic)
}

public struct DevnetBanner: Sendable {
    let layout: Devnet.Layout
    let apiKey: String

    public var text: String {
        """

        EdgeMatrix devnet is up: 1 router, 2 compute nodes, models \(LocalModels.chatModel) and \(LocalModels.embeddingModel),
        and 4 validators (chain emc-devnet, about one block a second)
          router:     http://127.0.0.1:\(layout.httpPort)   (metrics at /metrics)
          validators: http://127.0.0.1:\(layout.validatorHTTPPort(0))...\(layout.validatorHTTPPort(3))   (chain HTTP API)
          data dir:   \(layout.dataDirectory)

        The chain (emc tx / emc query use EMC_NODE_URL):
        EMC_NODE_URL=\(layout.nodeURL)
        funded account key (it holds a 1,000 EMC escrow with the router, which pays for OPENAI_API_KEY):
        EMC_FUNDED_KEY=\(layout.fundedKeyPath)
          emc query status
          emc tx transfer --to <account> --amount 12.5 --key \(layout.fundedKeyPath)

        Export these to use the stock OpenAI SDK:
        OPENAI_BASE_URL=\(layout.baseURL)
        OPENAI_API_KEY=\(apiKey)
        (the key is bound to the funded account \(layout.fundedKeyPath); x-emc-request-id on every answer is the router's
        sequence number, the id its receipts carry)

        Try it:
          curl -s $OPENAI_BASE_URL/chat/completions -H "Authorization: Bearer $OPENAI_API_KEY" -H 'content-type: application/json' \\
            -d '{"model":"\(LocalModels.chatModel)","messages":[{"role":"user","content":"Say hello"}],"max_tokens":32}'
          python3 -c 'import openai; print(openai.OpenAI().chat.completions.create(model="\(LocalModels.chatModel)", messages=[{"role":"user","content":"Say hello"}]).choices[0].message.content)'
          swift run emc chat "Say hello"

        Ctrl-C stops the network.
        """
    }
}

/// Waits until the router lists every model, then prints the banner once.
struct ReadinessReporter: Service {
    let ready: AsyncStream<RouterEndpoints>
    let baseURL: String
    let apiKey: String
    let httpClient: HTTPClient
    let expectedModels: [String]
    let say: @Sendable (String) -> Void
    let banner: String

    func run() async throws {
        var iterator = ready.makeAsyncIterator()
        guard await iterator.next() != nil else { return }
        say("router listening; waiting for compute nodes and models to come up...")
        var lastReport = ContinuousClock.now
        while !Task.isCancelled {
            var request = HTTPClientRequest(url: baseURL + "/models")
            request.headers.add(name: "authorization", value: "Bearer \(apiKey)")
            if let response = try? await httpClient.execute(request, timeout: .seconds(5)),
               let body = try? await response.body.collect(upTo: 1 << 20) {
                let text = String(buffer: body)
                if expectedModels.allSatisfy({ text.contains("\"\($0)\"") }) {
                    say(banner)
                    break
                }
            }
            if ContinuousClock.now - lastReport > .seconds(10) {
                say("still waiting for models (loading takes a few seconds)...")
                lastReport = .now
            }
            try? await Task.sleep(for: .milliseconds(300))
        }
        // Stay in the group until shutdown so that returning does not end the devnet.
        try? await gracefulShutdown()
    }
}
