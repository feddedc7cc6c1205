import EdgeMatrixApplication
import EdgeMatrixConsensus
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNetwork
import EdgeMatrixStore
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Hummingbird
import Logging
import ServiceLifecycle

/// What a chain node does: a validator votes and serves peers; a full node syncs read-only and never signs.
public enum ChainNodeRole: String, Sendable, CaseIterable {
    /// Runs consensus (votes once its key is in the set), gossips, serves peers and admits transactions.
    case validator
    /// Syncs blocks from validators over the peer service (every block's commit certificate checked against the set
    /// of its height), applies them and serves the read-only HTTP API. It never signs a proposal or a vote, even if
    /// its key is elected, sends no consensus or transaction frame, serves no peer port, and refuses `POST /txs`
    /// with `read_only_node`.
    case full
}

public struct ValidatorConfiguration: Sendable {
    public var genesis: Genesis
    public var dataDirectory: String
    public var httpHost: String
    public var httpPort: Int
    public var p2pHost: String
    public var p2pPort: Int
    public var timeouts: TimeoutConfiguration
    public var maxTxsPerBlock: Int
    public var gossipIntervalMs: Int
    /// Peers to dial besides the genesis validators (`--peers KEY@HOST:PORT,...`): how a validator that joins
    /// later by staking finds the network. Validators registered on chain are dialled as they appear.
    public var peers: [PeerAddress]
    /// A peer that sends more frames than this in one second is disconnected.
    public var maxPeerFramesPerSecond = 20_000
    /// `.full`: follow the chain read-only (see `ChainNodeRole`).
    public var role = ChainNodeRole.validator
    /// What a validator serves to keys outside the validator set.
    public var readOnlyPeers = ReadOnlyPeerLimits()

    public init(genesis: Genesis, dataDirectory: String, httpHost: String = "127.0.0.1", httpPort: Int, p2pHost: String = "127.0.0.1",
                p2pPort: Int, timeouts: TimeoutConfiguration = ValidatorConfiguration.defaultTimeouts, maxTxsPerBlock: Int = 10_000,
                gossipIntervalMs: Int = 300, peers: [PeerAddress] = []) {
        self.peers = peers
        self.genesis = genesis
        self.dataDirectory = dataDirectory
        self.httpHost = httpHost
        self.httpPort = httpPort
        self.p2pHost = p2pHost
        self.p2pPort = p2pPort
        self.timeouts = timeouts
        self.maxTxsPerBlock = maxTxsPerBlock
        self.gossipIntervalMs = gossipIntervalMs
    }

    /// About one block per second: the commit wait is what paces an idle chain.
    public static let defaultTimeouts = TimeoutConfiguration(proposeMs: 2000, proposeDeltaMs: 500, prevoteMs: 1000, prevoteDeltaMs: 500,
                                                             precommitMs: 1000, precommitDeltaMs: 500, commitMs: 900)

    public static func loadGenesis(path: String) throws -> Genesis {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ChainError.genesis("cannot read \(path)")
        }
        do { return try Genesis.decode(json: data) } catch { throw ChainError.genesis("\(path): \(error)") }
    }
}

/// A validator: consensus engine, ledger, block store, mempool, peer transport and the chain's HTTP JSON API.
public struct ValidatorNode: Service {
    public let configuration: ValidatorConfiguration
    public let key: SigningKey
    public let view: ChainView
    public let mempool: Mempool
    let store: BlockStore
    let driver: ChainDriver
    let peers: PeerNetwork
    /// Keys this validator serves read-only (full nodes): admission, rate limits, refusals.
    public let readOnlyPeers: ReadOnlyPeers
    let inputs: AsyncStream<ChainInput>
    let inputSink: AsyncStream<ChainInput>.Continuation
    let metricsText: @Sendable () -> [UInt8]
    let onReady: @Sendable (Int, Int) async -> Void
    let logger: Logger

    /// Opens the store, replays committed blocks into a fresh ledger and recovers consensus from the WAL.
    public init(configuration: ValidatorConfiguration, key: SigningKey, metricsText: @escaping @Sendable () -> [UInt8] = { [] },
                logger: Logger = Logger(label: "emc.validator"),
                onReady: @escaping @Sendable (_ httpPort: Int, _ p2pPort: Int) async -> Void = { _, _ in }) throws {
        self.configuration = configuration
        self.key = key
        self.metricsText = metricsText
        self.onReady = onReady
        var logger = logger
        logger[metadataKey: configuration.role == .full ? "full_node" : "validator"] = "\(key.nodeID.short)"
        self.logger = logger
        let genesis = configuration.genesis
        try FileManager.default.createDirectory(atPath: configuration.dataDirectory, withIntermediateDirectories: true)
        store = try BlockStore(path: configuration.dataDirectory + "/chain.sqlite")

        var ledger: LedgerState
        do { ledger = try LedgerState(genesis: genesis) } catch { throw ChainError.genesis("\(error)") }
        var validators: ValidatorSet
        do {
            validators = try ValidatorSet(ledger.validators.map { (publicKey: $0.nodeKey, votingPower: $0.power) })
        } catch { throw ChainError.genesis("validator set: \(error)") }
        let genesisValidators = validators
        let rules = BlockRules(chainID: genesis.chainID)
        var lastHash = Hash32.zero
        var lastTime = genesis.genesisTimeMillis
        var lastUpdates = [StakedValidator]()
        let last = try store.lastHeight()
        var height: UInt64 = 1
        let started = ContinuousClock.now
        while height <= last {
            let batch = try store.blocks(from: height, limit: 500)
            if batch.isEmpty { break }
            for stored in batch {
                let block: ChainBlock
                do { block = try ChainBlock(canonicalBytes: stored.value) } catch {
                    throw ChainError.corruptBlock(height: stored.height, reason: "\(error)")
                }
                let result: BlockResult
                switch rules.execute(block, on: ledger) {
                case .success(let outcome): (ledger, result) = outcome
                case .failure(let violation): throw ChainError.corruptBlock(height: stored.height, reason: "\(violation)")
                }
                guard result.stateRoot == stored.stateRoot else {
                    throw ChainError.replayMismatch(height: stored.height, stored: stored.stateRoot, computed: result.stateRoot)
                }
                do { validators = try ValidatorSet(canonicalBytes: stored.nextValidators) } catch {
                    throw ChainError.corruptBlock(height: stored.height, reason: "next validators: \(error)")
                }
                lastHash = stored.hash
                lastTime = block.timeMillis
                lastUpdates = result.validatorUpdates
                height = stored.height + 1
            }
        }
        if last > 0 {
            logger.info("replayed committed blocks", metadata: ["height": "\(ledger.height)", "state_root": "\(ledger.stateRoot().hex.prefix(16))",
                                                              "seconds": "\(ContinuousClock.now - started)"])
        }
        view = ChainView(ChainSnapshot(ledger: ledger, height: ledger.height, blockHash: lastHash, stateRoot: ledger.stateRoot(),
                                       timeMillis: lastTime, validators: validators))
        mempool = Mempool()
        let wal: FileWAL
        do { wal = try FileWAL(path: configuration.dataDirectory + "/consensus.wal") } catch { throw ChainError.wal(error.description) }
        let genesisPeers = genesis.validators.compactMap { v in v.endpoints.first.flatMap { PeerAddress(key: v.nodeKey, endpoint: $0) } }
        let tls: NodeTLS
        do { tls = try NodeTLS.loadOrCreate(in: configuration.dataDirectory, name: "p2p", key: key) } catch {
            throw ChainError.storage("p2p TLS: \(error)")
        }
        let isFull = configuration.role == .full
        peers = PeerNetwork(key: key, tls: tls, chainID: genesis.chainID, peers: genesisPeers + configuration.peers, readOnly: isFull,
                            logger: logger)
        peers.add(Self.registeredValidatorPeers(ledger))
        readOnlyPeers = ReadOnlyPeers(limits: configuration.readOnlyPeers)
        if isFull {
            logger.notice("full node: follows the chain read-only, verifies every block's certificate, never votes",
                          metadata: ["node": "\(key.nodeID)"])
        } else if !ledger.validators.contains(where: { $0.nodeKey == key.publicKey }) {
            logger.notice("this node key is not in the current validator set: it follows the chain and votes once elected",
                          metadata: ["node": "\(key.nodeID)"])
        }
        (inputs, inputSink) = AsyncStream<ChainInput>.makeStream()
        driver = try ChainDriver(chainID: genesis.chainID, key: key, store: store, wal: wal, mempool: mempool, view: view,
                                 peers: peers, inputs: inputSink, ledger: ledger, lastHash: lastHash, validators: validators,
                                 genesisValidators: genesisValidators, timeouts: configuration.timeouts, pendingUpdates: lastUpdates,
                                 maxTxsPerBlock: configuration.maxTxsPerBlock, votes: !isFull, logger: logger)
    }

    /// Whether the chain as it is now admits a peer key: a member of the next height's set, or a validator-role node
    /// registered with a stake (it must sync before it can vote once elected). Not the genesis file forever.
    static func admits(_ key: PublicKey, _ s: ChainSnapshot) -> Bool {
        if s.validators.index(of: key.nodeID) != nil { return true }
        guard let node = s.ledger.node(key) else { return false }
        return node.role == .validator && node.status == .active
    }

    /// A peer's GetBlocks: at most `maxBlocks` (≤ 200) blocks and half a message's bytes, whatever the request asks.
    func blockRange(_ request: BlockRangeRequest, maxBlocks: Int = 200) throws -> BlockRangeResponse {
        let cap = UInt32(clamping: min(max(maxBlocks, 1), 200))
        let blocks = try store.blocks(from: request.from, limit: Int(min(max(request.limit, 1), cap)),
                                      maxBytes: PeerService.maxMessageBytes / 2)
        return BlockRangeResponse(latestHeight: view.current.height, blocks: blocks.map { .init(value: $0.value, certificate: $0.certificate) })
    }

    /// Validator-role nodes the ledger has registered, at their first endpoint that reads as HOST:PORT.
    static func registeredValidatorPeers(_ ledger: LedgerState) -> [PeerAddress] {
        ledger.allNodes.filter { $0.role == .validator && $0.status == .active }.compactMap { node in
            node.endpoints.lazy.compactMap { PeerAddress(key: node.nodeKey, endpoint: $0) }.first
        }
    }

    /// Admits a transaction (from the API or a peer); on success it is gossiped when `gossip` is set.
    public func submit(_ bytes: [UInt8], gossip: Bool = true) throws(MempoolRejection) -> Hash32 {
        if configuration.role == .full { throw MempoolRejection.readOnlyNode }
        // Peers' gossip skips the store lookup: the ledger's dedup check already refuses a committed transaction.
        let id = try mempool.admit(bytes, ledger: view.current.ledger, store: gossip ? store : nil)
        if gossip { peers.broadcast(.tx(bytes)) }
        return id
    }

    public func run() async throws {
        let genesis = configuration.genesis
        let view = view
        let peers = peers
        let inputSink = inputSink
        let logger = logger
        let readOnlyPeers = readOnlyPeers
        let endpoint = PeerEndpoint(
            key: key, chainID: genesis.chainID,
            isValidatorPeer: { key in Self.admits(key, view.current) },
            readOnly: readOnlyPeers,
            onFrame: { [self] peer, frame in
                switch frame {
                case .consensus(let bytes):
                    // Only the heights the engine can use (the next one, and one beyond while a commit propagates)
                    // reach the consensus loop; anything else is dropped here, before it queues.
                    let next = view.current.height + 1
                    if let message = try? ConsensusMessage(canonicalBytes: bytes), message.height >= next, message.height <= next + 1 {
                        inputSink.yield(.message(message))
                    }
                case .tx(let bytes):
                    _ = try? submit(bytes, gossip: false)
                case .status(let height):
                    peers.noteHeight(height, of: peer)
                default: break
                }
            },
            blocks: { [self] request, maxBlocks in try blockRange(request, maxBlocks: maxBlocks) },
            statusFrame: { .status(height: view.current.height) },
            logger: logger,
            maxFramesPerSecond: configuration.maxPeerFramesPerSecond)
        let transport = HTTP2ServerTransport.Posix(
            address: .ipv4(host: configuration.p2pHost, port: configuration.p2pPort),
            // Checked in the TLS handshake itself: nothing, GetBlocks included, is served to a client without a certificate
            // bound to a node key; a key the chain does not admit as a validator gets in only while the read-only table
            // has room for it, and then only the read-only service (PeerEndpoint).
            transportSecurity: peers.tls.serverSecurity(admit: { key in Self.admits(key, view.current) || readOnlyPeers.canAdmit(key.nodeID) }),
            config: .defaults { $0.rpc.maxRequestPayloadSize = PeerService.maxMessageBytes }
        )
        let grpcServer = GRPCServer(transport: transport, services: [endpoint])
        let api = ChainAPI(node: self)
        let configuration = configuration
        let onReady = onReady
        let driver = driver
        try await driver.start()

        try await withThrowingDiscardingTaskGroup { group in
            // A full node serves no peer port: it only dials validators.
            let servesPeers = configuration.role == .validator
            if servesPeers { group.addTask { try await grpcServer.serve() } }
            let p2pPort: Int
            if servesPeers { p2pPort = try await transport.listeningAddress.ipv4?.port ?? configuration.p2pPort } else { p2pPort = 0 }
            group.addTask { await peers.run() }
            // The consensus loop: the only caller of the driver.
            group.addTask {
                for await input in inputs { try await driver.process(input) }
            }
            group.addTask {
                var tick = 0
                var links = 0
                while !Task.isCancelled {
                    try? await Task.sleep(for: .milliseconds(configuration.gossipIntervalMs))
                    tick += 1
                    // Everything held for the current height again: now and then, and at once when a peer link comes up.
                    let connected = peers.connectedCount
                    inputSink.yield(.gossipTick(full: tick % 4 == 0 || connected > links))
                    links = connected
                }
            }
            group.addTask { await syncLoop() }
            // Dial validators as the ledger registers them.
            group.addTask {
                for await _ in view.subscribe() { peers.add(Self.registeredValidatorPeers(view.current.ledger)) }
            }
            let app = Application(
                router: api.makeRouter(),
                configuration: .init(address: .hostname(configuration.httpHost, port: configuration.httpPort),
                                     serverName: "edgematrix-validator"),
                onServerRunning: { channel in
                    let httpPort = channel.localAddress?.port ?? 0
                    logger.info("\(configuration.role == .full ? "full node" : "validator") ready",
                                metadata: ["http": "\(httpPort)", "p2p": "\(p2pPort)", "height": "\(view.current.height)", "chain": "\(genesis.chainID)"])
                    await onReady(httpPort, p2pPort)
                },
                logger: logger
            )
            try await withGracefulShutdownHandler {
                try await app.run()
            } onGracefulShutdown: {
                grpcServer.beginGracefulShutdown()
                inputSink.finish()
                view.finishSubscribers()
            }
            // The HTTP server is down: stop the rest of the node.
            grpcServer.beginGracefulShutdown()
            group.cancelAll()
        }
    }

    /// Block sync: when peers report a higher committed height, fetch blocks with certificates from one of them (in
    /// rotation) and feed them in order. The first block's certificate is checked here against the set of that height
    /// (the engine checks every block again); a peer whose claim is not met is penalised and the next one is tried.
    private func syncLoop() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: .milliseconds(250))
            let ours = view.current.height
            let candidates = peers.syncCandidates(above: ours)
            guard let best = candidates.map(\.height).max() else { continue }
            // One block behind is normal while a commit propagates; wait for the gossip a moment before fetching.
            if best == ours + 1 {
                try? await Task.sleep(for: .milliseconds(400))
                if view.current.height >= best { continue }
            }
            for candidate in candidates {
                if await sync(from: candidate.peer, ours: ours) { break }
                if Task.isCancelled { return }
            }
        }
    }

    /// One sync attempt; true when it moved our height.
    private func sync(from peer: NodeID, ours: UInt64) async -> Bool {
        let response: BlockRangeResponse
        do {
            // No link to a peer that claims a height is as good as not delivering: rotate away from it.
            guard let fetched = try await peers.fetchBlocks(from: peer, start: ours + 1, limit: 100) else {
                peers.penalize(peer)
                return false
            }
            response = fetched
        } catch {
            logger.debug("block sync failed", metadata: ["peer": "\(peer.short)", "error": "\(error)"])
            peers.penalize(peer)
            return false
        }
        var expected = ours + 1
        var fed: UInt64 = ours
        for entry in response.blocks {
            guard let certificate = try? CommitCertificate(canonicalBytes: entry.certificate), certificate.height == expected,
                  certificate.value == Hash32.of(entry.value) else { break }
            if expected == ours + 1 {
                // The view's validators are those of height ours + 1.
                do { try certificate.verify(chainID: configuration.genesis.chainID, validators: view.current.validators) } catch {
                    logger.warning("block sync: certificate does not verify", metadata: ["peer": "\(peer.short)", "error": "\(error)"])
                    break
                }
            }
            inputSink.yield(.synced(value: entry.value, certificate: certificate))
            fed = certificate.height
            expected += 1
        }
        guard fed > ours else {
            peers.penalize(peer)
            return false
        }
        logger.info("block sync", metadata: ["from": "\(ours + 1)", "to": "\(fed)", "peer": "\(peer.short)"])
        let deadline = ContinuousClock.now + .seconds(5)
        while view.current.height < fed, ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
        // Blocks that the engine refused (a bad certificate further on) leave us short: the peer is not trusted again soon.
        if view.current.height <= ours { peers.penalize(peer); return false }
        peers.credit(peer)
        return true
    }
}
