@testable import EdgeMatrixChain
import EdgeMatrixApplication
import EdgeMatrixConsensus
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNetwork
import EdgeMatrixStore
import AsyncHTTPClient
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import NIOHTTP1
import ServiceLifecycle
import Synchronization
import Testing

/// The validator's trust boundary: what a client, a proposer or a peer sends can neither crash it nor stall the chain.
extension Integration {
    @Suite("Validator under hostile input", .serialized)
    struct ChainHostileInputTests {
        // MARK: Pure rules (no network)

        /// A one-validator devnet genesis and its ledger, in a temporary directory.
        struct Fixture {
            let directory: String
            let genesis: Genesis
            let layout: DevnetGenesis.Layout
            let ledger: LedgerState
            let funded: SigningKey

            init(validators: Int = 1) throws {
                directory = Harness.temporaryDirectory("chain-rules")
                genesis = try DevnetGenesis.create(directory: directory, chainID: "emc-test",
                                                   endpoints: (0..<validators).map { "127.0.0.1:\(20_000 + $0)" })
                layout = DevnetGenesis.Layout(directory: directory)
                ledger = try LedgerState(genesis: genesis)
                funded = try KeyFile.read(from: layout.fundedKeyPath)
            }

            var validatorKeys: [SigningKey] {
                get throws { try (1...genesis.validators.count).map { try KeyFile.read(from: layout.validatorKeyPath($0)) } }
            }

            func block(_ height: UInt64, _ txs: [[UInt8]], evidence: [DuplicateVoteEvidence] = [], proposer: NodeID) -> ChainBlock {
                ChainBlock(height: height, timeMillis: genesis.genesisTimeMillis + height * 1000, proposer: proposer,
                           transactions: txs, evidence: evidence)
            }
        }

        @Test("a proposer's broken-signature copy of a transaction fails in its block and never blocks the valid copy")
        func mempoolPoisoning() throws {
            let f = try Fixture()
            let proposer = try f.validatorKeys[0].nodeID
            let rules = BlockRules(chainID: "emc-test")
            let bob = Account(owner: SigningKey().publicKey)
            let valid = transfer(f.funded, to: bob, amount: Amount(emc: 3), chainID: "emc-test")
            var broken = valid.encoded
            broken[broken.count - 1] ^= 1
            let brokenTx = try Transaction(decoding: broken)
            #expect(brokenTx.id == valid.id)  // the id leaves the signature out: that is what makes this attack possible

            // The valid copy waits in the mempool; a Byzantine proposer commits the broken copy first.
            let store = try BlockStore(path: f.directory + "/chain.sqlite")
            let mempool = Mempool()
            _ = try mempool.admit(valid.encoded, ledger: f.ledger, store: store)
            let first = try rules.execute(f.block(1, [broken], proposer: proposer), on: f.ledger).get()
            guard case .failure(.badSignature) = first.result.txResults[0] else {
                Issue.record("the broken copy must fail on its signature: \(first.result.txResults[0])")
                return
            }
            try store.append(StoredBlock(height: 1, hash: Hash32.of([1]), timeMillis: 1, value: [], certificate: [], nextValidators: [],
                                         stateRoot: first.result.stateRoot, txCount: 1),
                             txs: [StoredTx(hash: valid.id, height: 1, index: 0, ok: false, error: "bad signature", errorCode: "bad_signature")])
            mempool.removeCommitted(applied: [], failed: [(valid.id, broken)])
            #expect(mempool.contains(valid.id), "the valid copy must stay pending")
            // A client resubmitting the valid copy is not told "duplicate" either.
            let fresh = Mempool()
            #expect(try fresh.admit(valid.encoded, ledger: first.ledger, store: store) == valid.id)

            // The next block carries the valid copy, and it applies.
            let second = try rules.execute(f.block(2, mempool.take(max: 10).map(\.bytes), proposer: proposer), on: first.ledger).get()
            guard case .success = second.result.txResults[0] else {
                Issue.record("the valid copy must apply: \(second.result.txResults[0])")
                return
            }
            #expect(second.ledger.balance(of: bob) == Amount(emc: 3))
            try store.append(StoredBlock(height: 2, hash: Hash32.of([2]), timeMillis: 2, value: [], certificate: [], nextValidators: [],
                                         stateRoot: second.result.stateRoot, txCount: 1),
                             txs: [StoredTx(hash: valid.id, height: 2, index: 0, ok: true)])
            // A later failed copy never overwrites the applied record.
            try store.append(StoredBlock(height: 3, hash: Hash32.of([3]), timeMillis: 3, value: [], certificate: [], nextValidators: [],
                                         stateRoot: second.result.stateRoot, txCount: 1),
                             txs: [StoredTx(hash: valid.id, height: 3, index: 0, ok: false, error: "duplicate", errorCode: "duplicate")])
            #expect(try store.tx(hash: valid.id) == StoredTx(hash: valid.id, height: 2, index: 0, ok: true))
            #expect(throws: MempoolRejection.self) { try Mempool().admit(valid.encoded, ledger: second.ledger, store: store) }
        }

        @Test("evidence is judged by the validator set of its own height, expires, and is refused from the future or forged")
        func evidenceRules() throws {
            let f = try Fixture(validators: 2)
            let keys = try f.validatorKeys
            let leaver = keys[1]
            func vote(_ value: UInt8, height: Height, by key: SigningKey) -> SignedVote {
                SignedVote(signing: VoteBody(chainID: "emc-test", type: .prevote, height: height, round: 0, value: Hash32.of([value]),
                                             validator: key.nodeID), with: key)
            }
            let evidence = try DuplicateVoteEvidence(vote(1, height: 5, by: leaver), vote(2, height: 5, by: leaver))
            let thenSet = try ValidatorSet(keys.map { (publicKey: $0.publicKey, votingPower: 100) })
            let nowSet = try ValidatorSet([(publicKey: keys[0].publicKey, votingPower: 100)])  // the offender has left since
            let history = ChainHistory(validatorsAt: { $0 <= 5 ? thenSet : nowSet }, timeAt: { 1_000 * $0 })
            let rules = BlockRules(chainID: "emc-test", evidenceMaxAgeBlocks: 100, evidenceMaxAgeMillis: 60_000)

            // Valid at height 9 although the offender is no longer a validator: the old driver checked it against the
            // current set, refused every proposal carrying it and stalled the chain.
            #expect(rules.check(evidence, blockHeight: 9, blockTime: 9_000, ledger: f.ledger, history: history) == nil)
            #expect(throws: ConsensusError.self) { try evidence.verify(chainID: "emc-test", validators: nowSet) }
            // Expired only when older than both bounds.
            #expect(rules.check(evidence, blockHeight: 200, blockTime: 30_000, ledger: f.ledger, history: history) == nil)
            #expect(rules.check(evidence, blockHeight: 200, blockTime: 80_000, ledger: f.ledger, history: history)
                    == .expired(ageBlocks: 195, ageMillis: 75_000))
            #expect(rules.check(evidence, blockHeight: 4, blockTime: 4_000, ledger: f.ledger, history: history)
                    == .fromTheFuture(evidenceHeight: 5, blockHeight: 4))
            let unknown = ChainHistory(validatorsAt: { _ in nil }, timeAt: { _ in nil })
            #expect(rules.check(evidence, blockHeight: 9, blockTime: 9_000, ledger: f.ledger, history: unknown) == .unknownValidatorSet(5))
            // Forged: a vote signed by someone else in the offender's name.
            let forged = try DuplicateVoteEvidence(
                vote(1, height: 5, by: leaver),
                SignedVote(signing: VoteBody(chainID: "emc-test", type: .prevote, height: 5, round: 0, value: Hash32.of([3]),
                                             validator: leaver.nodeID), with: keys[0]))
            guard case .invalid? = rules.check(forged, blockHeight: 9, blockTime: 9_000, ledger: f.ledger, history: history) else {
                Issue.record("forged evidence must be refused")
                return
            }
            // The pool keeps the admissible piece and drops the rest; a block carrying a bad piece is refused.
            let (admissible, dropped) = rules.admissibleEvidence([forged, evidence], height: 9, time: 9_000, ledger: f.ledger, history: history)
            #expect(admissible == [evidence])
            #expect(dropped.map(\.0) == [forged.id])
        }

        @Test("block rules refuse a wrong height, time travel, an outside proposer and duplicate evidence")
        func blockRules() throws {
            let f = try Fixture()
            let proposer = try f.validatorKeys[0].nodeID
            let set = try ValidatorSet([(publicKey: try f.validatorKeys[0].publicKey, votingPower: 100)])
            let history = ChainHistory(validatorsAt: { _ in set }, timeAt: { _ in nil })
            let rules = BlockRules(chainID: "emc-test")
            let now = f.genesis.genesisTimeMillis + 1000
            func verdict(_ block: ChainBlock) -> BlockRuleViolation? {
                if case .failure(let v) = rules.validate(block.canonicalBytes, height: 1, ledger: f.ledger, validators: set, now: now,
                                                         history: history) { return v }
                return nil
            }
            #expect(verdict(f.block(1, [], proposer: proposer)) == nil)
            #expect(verdict(f.block(2, [], proposer: proposer)) == .wrongHeight(expected: 1, got: 2))
            #expect(verdict(f.block(1, [], proposer: SigningKey().nodeID)) != nil)
            var late = f.block(1, [], proposer: proposer)
            late.timeMillis = now + 60_000
            #expect(verdict(late) == .timeTooFarAhead(now: now, got: now + 60_000))
            late.timeMillis = .max
            #expect(verdict(late) != nil)
            var early = f.block(1, [], proposer: proposer)
            early.timeMillis = f.genesis.genesisTimeMillis
            #expect(verdict(early) == .timeNotAfterParent(parent: f.genesis.genesisTimeMillis, got: f.genesis.genesisTimeMillis))
            if case .failure(.undecodable) = rules.validate([1, 2, 3], height: 1, ledger: f.ledger, validators: set, now: now,
                                                           history: history) {} else { Issue.record("garbage must be undecodable") }
        }

        @Test("block sync rotates away from a peer that claims heights it does not deliver, for longer each time")
        func syncPenalties() throws {
            let key = SigningKey()
            let network = PeerNetwork(key: key, tls: try NodeTLS.make(key: key), chainID: "emc-test", peers: [], logger: Logger(label: "test"))
            let liar = SigningKey().nodeID
            let honest = SigningKey().nodeID
            network.noteHeight(1 << 40, of: liar)
            network.noteHeight(12, of: honest)
            let now = ContinuousClock.now
            #expect(Set(network.syncCandidates(above: 10, now: now).map(\.peer)) == [liar, honest])
            network.penalize(liar, now: now)
            #expect(network.syncCandidates(above: 10, now: now).map(\.peer) == [honest])
            // It claims again at once (status frames keep coming): still skipped while the penalty runs.
            network.noteHeight(1 << 40, of: liar)
            #expect(network.syncCandidates(above: 10, now: now + .milliseconds(900)).map(\.peer) == [honest])
            // After the penalty it is tried again, but after the honest peer (more failures sort later).
            #expect(network.syncCandidates(above: 10, now: now + .seconds(2)).map(\.peer) == [honest, liar])
            network.penalize(liar, now: now + .seconds(2))
            network.noteHeight(1 << 40, of: liar)
            #expect(network.syncCandidates(above: 10, now: now + .seconds(3)).map(\.peer) == [honest])  // 2 s this time
            #expect(network.syncCandidates(above: 10, now: now + .seconds(5)).map(\.peer) == [honest, liar])
            network.credit(liar)
            #expect(network.syncCandidates(above: 12, now: now + .seconds(5)).map(\.peer) == [liar])
        }

        // MARK: Real validators over TCP

        @Test("extreme and malformed values at every HTTP route and the peer GetBlocks call: 4xx answers, the process lives, state is unchanged")
        func extremeValues() async throws {
            let chain = try InProcessChain(validators: 1, running: 1)
            do { try await extremes(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        func extremes(_ chain: InProcessChain) async throws {
            let base = chain.url()
            try await Harness.eventually(timeout: .seconds(20), "single validator commits") {
                (try await Harness.request(.GET, base + "/status", timeout: .seconds(1)).json?["height"] as? Int ?? 0) >= 2
            }
            let funded = Account(owner: try chain.funded.publicKey)
            let before = try await Harness.request(.GET, base + "/accounts/\(funded)/balance").json?["balance"] as? String
            func expectStatus(_ path: String, _ expected: Int, code: String? = nil, method: HTTPMethod = .GET, body: [UInt8] = []) async throws {
                let result = try await Harness.request(method, base + path, body: body.isEmpty ? nil : body)
                #expect(result.status == expected, "\(method) \(path): \(result.status) \(result.text.prefix(200))")
                if let code { #expect(ChainAPITests.code(result) == code, "\(path): \(result.text.prefix(200))") }
            }
            // Heights: the old store trapped on Int64(UInt64) for anything above Int64.max.
            for height in ["18446744073709551615", "9223372036854775808", "9223372036854775807", "0"] {
                try await expectStatus("/blocks/\(height)", 404, code: "not_found")
            }
            for height in ["-1", "18446744073709551616", "1e3", "%00", String(repeating: "9", count: 5000)] {
                try await expectStatus("/blocks/\(height)", 400, code: "invalid_height")
            }
            let huge = try await Harness.request(.GET, base + "/blocks?from=18446744073709551615").json
            #expect((huge?["blocks"] as? [Any])?.isEmpty == true)
            try await expectStatus("/blocks?from=9223372036854775808&limit=100", 200)
            for query in ["from=-1", "from=abc", "limit=0", "limit=101", "limit=-5", "limit=99999999999999999999"] {
                try await expectStatus("/blocks?\(query)", 400, code: "invalid_parameter")
            }
            try await expectStatus("/txs/" + String(repeating: "f", count: 64), 404, code: "not_found")
            for bad in ["", "zz", String(repeating: "f", count: 63), String(repeating: "0", count: 10_000), "-1", "%00"] {
                try await expectStatus("/settlements?router=\(bad)", 400, code: "invalid_router")
                try await expectStatus("/earnings/\(bad.isEmpty ? "x" : bad)", 400, code: "invalid_key")
                try await expectStatus("/settlements/cursor/\(bad.isEmpty ? "x" : bad)", 400, code: "invalid_router")
            }
            try await expectStatus("/txs/" + String(repeating: "f", count: 100_00), 400, code: "invalid_hash")
            try await expectStatus("/accounts/" + String(repeating: "a", count: 4000) + "/balance", 400, code: "invalid_account")
            let undecodable = try await Harness.request(.GET, base + "/stakes/%FF%FE")
            #expect((400..<500).contains(undecodable.status), "\(undecodable.status)")
            try await expectStatus("/txs", 400, method: .POST, body: [])
            try await expectStatus("/txs", 400, method: .POST, body: [UInt8](repeating: 0xFF, count: 1 << 16))
            let oversized = try await Harness.request(.POST, base + "/txs", body: [UInt8](repeating: 0x41, count: 3 << 20))
            #expect(oversized.status == 413, "\(oversized.status) \(oversized.text.prefix(200))")
            #expect(ChainAPITests.code(oversized) == "too_large")

            // Seeded random bodies and paths at every route.
            var random = SeededRandom(seed: 0xE3C)
            let routes = ["/status", "/blocks", "/blocks/1", "/txs", "/txs/00", "/accounts/x", "/accounts/x/balance", "/validators",
                          "/stakes/x", "/nodes", "/health", "/metrics"]
            for i in 0..<300 {
                let length = Int(random.next() % 512)
                let body = (0..<length).map { _ in UInt8(truncatingIfNeeded: random.next()) }
                let route = routes[i % routes.count]
                let method: HTTPMethod = i % 2 == 0 ? .POST : .GET
                let result = try await Harness.request(method, base + route + (i % 3 == 0 ? "?from=\(random.next())&limit=\(Int64(bitPattern: random.next()))" : ""),
                                                       body: method == .POST ? body : nil)
                #expect(result.status < 500, "\(method) \(route): \(result.status) \(result.text.prefix(200))")
            }

            // The peer GetBlocks handler with the extremes, as a validator would send them.
            let node = chain.nodes[0]
            for (start, limit) in [(UInt64.max, UInt32.max), (UInt64(Int64.max) + 1, 1), (0, 0), (UInt64(Int64.max), UInt32.max)] {
                let response = try node.blockRange(BlockRangeRequest(from: start, limit: limit))
                #expect(response.blocks.isEmpty == (start > 1))
                #expect(response.blocks.count <= 200)
            }

            // Alive, still committing, and no balance moved.
            let height = try await Harness.request(.GET, base + "/status").json?["height"] as? Int ?? 0
            try await Harness.eventually(timeout: .seconds(10), "still committing") {
                (try await Harness.request(.GET, base + "/status").json?["height"] as? Int ?? 0) > height
            }
            #expect(try await Harness.request(.GET, base + "/accounts/\(funded)/balance").json?["balance"] as? String == before)
        }

        @Test("a lagging validator catches up although a peer keeps claiming height 2^40 and delivers nothing")
        func syncPastALiar() async throws {
            let chain = try InProcessChain(validators: 4, running: 3)
            do { try await lagging(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        func lagging(_ chain: InProcessChain) async throws {
            try await Harness.eventually(timeout: .seconds(30), "three of four validators commit") {
                (try await Harness.request(.GET, chain.url() + "/status", timeout: .seconds(1)).json?["height"] as? Int ?? 0) >= 4
            }
            var logger = Logger(label: "test.late")
            logger.logLevel = .warning
            let late = try ValidatorNode(
                configuration: ValidatorConfiguration(genesis: chain.genesis, dataDirectory: chain.layout.validatorDirectory(4),
                                                      httpPort: chain.httpPorts[3], p2pPort: chain.p2pPorts[3]),
                key: try chain.key(3), logger: logger)
            let group = ServiceGroup(configuration: .init(services: [.init(service: late)], logger: logger))
            let task = Task { try await group.run() }
            // A phantom peer claims a huge height over and over, as its status frames would.
            let liar = SigningKey().nodeID
            let claims = Task {
                while !Task.isCancelled {
                    late.peers.noteHeight(1 << 40, of: liar)
                    try? await Task.sleep(for: .milliseconds(100))
                }
            }
            defer { claims.cancel() }
            let target = try await Harness.request(.GET, chain.url() + "/status").json?["height"] as? Int ?? 0
            try await Harness.eventually(timeout: .seconds(30), "the late validator reaches height \(target)") {
                late.view.current.height >= UInt64(target)
            }
            await group.triggerGracefulShutdown()
            _ = try? await task.value
        }
    }
}

/// Validators in the test process, each in its own service group, so a test can stop and restart any one of them.
final class ValidatorCluster: @unchecked Sendable {
    let directory: String
    let genesis: Genesis
    let layout: DevnetGenesis.Layout
    let httpPorts: [Int]
    let p2pPorts: [Int]
    private let lock = NSLock()
    private var running: [Int: (node: ValidatorNode, group: ServiceGroup, task: Task<Void, any Error>)] = [:]

    /// `validators` in the genesis, and `slots` ports in all (the rest for validators that join later).
    init(validators: Int, slots: Int, epochLengthBlocks: UInt64) throws {
        directory = Harness.temporaryDirectory("cluster")
        httpPorts = (0..<slots).map { _ in Harness.freePort() }
        p2pPorts = (0..<slots).map { _ in Harness.freePort() }
        genesis = try DevnetGenesis.create(directory: directory, chainID: "emc-test",
                                           endpoints: p2pPorts.prefix(validators).map { "127.0.0.1:\($0)" },
                                           epochLengthBlocks: epochLengthBlocks)
        layout = DevnetGenesis.Layout(directory: directory)
    }

    func key(_ i: Int) throws -> SigningKey { try KeyFile.loadOrCreate(at: layout.validatorKeyPath(i + 1)) }
    func url(_ i: Int) -> String { "http://127.0.0.1:\(httpPorts[i])" }
    func node(_ i: Int) -> ValidatorNode? { lock.withLock { running[i]?.node } }
    var runningIndices: [Int] { lock.withLock { running.keys.sorted() } }

    /// Starts validator slot `i` from its data directory (a restart resumes from its blocks and WAL).
    @discardableResult
    func start(_ i: Int) throws -> ValidatorNode {
        var logger = Logger(label: "test.cluster")
        logger.logLevel = .warning
        let node = try ValidatorNode(configuration: ValidatorConfiguration(genesis: genesis, dataDirectory: layout.validatorDirectory(i + 1),
                                                                           httpPort: httpPorts[i], p2pPort: p2pPorts[i]),
                                     key: try key(i), logger: logger)
        let group = ServiceGroup(configuration: .init(services: [.init(service: node)], logger: logger))
        let task = Task { try await group.run() }
        lock.withLock { running[i] = (node, group, task) }
        return node
    }

    func stop(_ i: Int) async {
        guard let entry = lock.withLock({ running.removeValue(forKey: i) }) else { return }
        await entry.group.triggerGracefulShutdown()
        _ = try? await entry.task.value
    }

    func stopAll() async { for i in runningIndices { await stop(i) } }

    /// The highest committed height among running validators.
    var height: UInt64 { lock.withLock { running.values.map { $0.node.view.current.height }.max() ?? 0 } }

    /// Submits a transaction to slot `i`'s API and waits until it commits.
    func commit(_ tx: Transaction, via i: Int) async throws {
        let accepted = try await Harness.request(.POST, url(i) + "/txs", body: Array(Hex.encode(tx.encoded).utf8))
        #expect(accepted.status == 202, "\(accepted.text)")
        try await Harness.eventually(timeout: .seconds(30), "\(tx.body.kind.name) commits") {
            let status = try await Harness.request(.GET, url(i) + "/txs/\(tx.id.hex)").json?["status"] as? String
            if status == "failed" { throw ClusterError.failed(try await Harness.request(.GET, url(i) + "/txs/\(tx.id.hex)").text) }
            return status == "committed"
        }
    }

    enum ClusterError: Error { case failed(String) }
}

extension Integration {
    @Suite("Validators join by staking", .serialized)
    struct ValidatorJoinTests {
        @Test("a 5th validator bonds and registers on a running 4-validator chain, syncs, and proposes after the epoch boundary; with 2 of 5 down the chain stops, with 1 down it finalises")
        func fifthValidatorJoins() async throws {
            let cluster = try ValidatorCluster(validators: 4, slots: 5, epochLengthBlocks: 8)
            do { try await join(cluster) } catch {
                await cluster.stopAll()
                throw error
            }
            await cluster.stopAll()
        }

        func join(_ cluster: ValidatorCluster) async throws {
            for i in 0..<4 { try cluster.start(i) }
            try await Harness.eventually(timeout: .seconds(30), "the genesis validators commit") { cluster.height >= 2 }
            let funded = try KeyFile.read(from: cluster.layout.fundedKeyPath)
            let newcomer = try cluster.key(4)
            func now() -> UInt64 { UInt64(Date().timeIntervalSince1970 * 1000) }

            // Bond a validator stake (same amount and lock as the genesis validators: equal voting power).
            let requirement = cluster.genesis.parameters.staking.validator
            try await cluster.commit(Transaction(signing: TransactionBody(
                chainID: "emc-test", createdAtMillis: now(),
                kind: .bond(Bond(role: .validator, amount: requirement.minimumStake, lockDays: requirement.minimumLockDays))), with: funded), via: 0)
            let stake = try #require(cluster.node(0)?.view.current.ledger.stakes(ownedBy: funded.publicKey).first)
            // Register the node: the node key signs the statement, the owner signs the transaction.
            let statement = NodeRegistrationStatement(chainID: "emc-test", owner: funded.publicKey, nodeKey: newcomer.publicKey,
                                                      role: .validator, endpoints: ["127.0.0.1:\(cluster.p2pPorts[4])"], stakeID: stake.id)
            try await cluster.commit(Transaction(signing: TransactionBody(
                chainID: "emc-test", createdAtMillis: now(),
                kind: .registerNode(NodeRegistration(statement: statement, nodeKey: newcomer))), with: funded), via: 1)

            // It starts from the genesis file alone (its key is not in it), syncs, and is elected at the boundary.
            let fifth = try cluster.start(4)
            try await Harness.eventually(timeout: .seconds(60), "the newcomer is in the validator set") {
                cluster.node(0)?.view.current.validators.index(of: newcomer.nodeID) != nil
            }
            let elected = cluster.height
            try await Harness.eventually(timeout: .seconds(60), "the newcomer proposes a committed block") {
                guard let store = cluster.node(0)?.store else { return false }
                return try store.blocks(from: elected, limit: 1000).contains { stored in
                    (try? ChainBlock(canonicalBytes: stored.value))?.proposer == newcomer.nodeID
                }
            }
            #expect(fifth.view.current.height + 2 >= cluster.height, "the newcomer follows the chain")

            // Two of five down: 60% of the voting power is up, not more than 2/3, so nothing more is final.
            await cluster.stop(4)
            await cluster.stop(0)
            try await Task.sleep(for: .seconds(2))  // a commit already under way may still land
            let stalled = cluster.height
            try await Task.sleep(for: .seconds(8))
            #expect(cluster.height == stalled, "3 of 5 equal validators must not finalise")
            // One back (restarted from its own blocks and WAL): 80% is up, and the chain moves again.
            try cluster.start(4)
            try await Harness.eventually(timeout: .seconds(60), "4 of 5 finalise again") { cluster.height >= stalled + 2 }
        }
    }
}

/// A validator key that speaks the real peer protocol (mutual TLS, handshake) and then sends whatever a test wants.
struct HostilePeer {
    let key: SigningKey
    let chainID: String
    let target: PeerAddress

    /// Connects, authenticates, sends `frames` as fast as the stream takes them, and returns how the stream ended.
    func send(_ frames: @escaping @Sendable () -> [PeerFrame]) async -> (sent: Int, error: (any Error)?) {
        let sent = Mutex(0)
        do {
            let transport = try HTTP2ClientTransport.Posix(
                target: peerTarget(host: target.host, port: target.port),
                transportSecurity: try NodeTLS.make(key: key).clientSecurity(pinned: target.key))
            let client = GRPCClient(transport: transport)
            return try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await client.runConnections() }
                defer { client.beginGracefulShutdown() }
                let (outbound, sink) = AsyncStream<PeerFrame>.makeStream()
                let nonce = PeerHandshake.randomNonce()
                sink.yield(.hello(nodeKey: key.publicKey, nonce: nonce, chainID: chainID))
                let request = StreamingClientRequest<PeerFrame> { writer in
                    for await frame in outbound {
                        try await writer.write(frame)
                        sent.withLock { $0 += 1 }
                    }
                }
                do {
                    try await client.bidirectionalStreaming(
                        request: request, descriptor: PeerService.gossip,
                        serializer: ProtobufWireSerializer<PeerFrame>(), deserializer: ProtobufWireDeserializer<PeerFrame>(),
                        options: .defaults
                    ) { response in
                        var inbound = response.messages.makeAsyncIterator()
                        guard case .challenge(let serverKey, let serverNonce, _)? = try await inbound.next() else { return }
                        let transcript = PeerHandshake.transcript(role: "client", chainID: chainID, clientKey: key.publicKey, clientNonce: nonce,
                                                                  serverKey: serverKey, serverNonce: serverNonce)
                        sink.yield(.auth(signature: key.sign(transcript, domain: .peerHandshake)))
                        guard case .accepted? = try await inbound.next() else { return }
                        for frame in frames() { sink.yield(frame) }
                        // Keep reading until the server ends the stream (or a short while passes).
                        let deadline = ContinuousClock.now + .seconds(5)
                        while ContinuousClock.now < deadline, try await inbound.next() != nil {}
                        sink.finish()
                    }
                } catch {
                    sink.finish()
                    group.cancelAll()
                    return (sent.withLock { $0 }, error)
                }
                group.cancelAll()
                return (sent.withLock { $0 }, nil)
            }
        } catch {
            return (sent.withLock { $0 }, error)
        }
    }
}

extension Integration {
    @Suite("Validator under a hostile peer", .serialized)
    struct HostilePeerTests {
        @Test("a validator key sending garbage, forged votes, a huge height, handshake frames and a flood is cut off; the chain keeps finalising")
        func hostilePeer() async throws {
            // A limit a debug build can exceed from one test client (the default, 20,000/s, is for release builds).
            let chain = try InProcessChain(validators: 4, running: 3, maxPeerFramesPerSecond: 3_000)
            do { try await attack(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        func attack(_ chain: InProcessChain) async throws {
            try await Harness.eventually(timeout: .seconds(30), "three of four validators commit") {
                (try await Harness.request(.GET, chain.url() + "/status", timeout: .seconds(1)).json?["height"] as? Int ?? 0) >= 2
            }
            // The fourth genesis validator's key: admitted by TLS and the handshake, so every frame reaches the node.
            let byzantine = try chain.key(3)
            let target = PeerAddress(key: try chain.key(0).publicKey, endpoint: "127.0.0.1:\(chain.p2pPorts[0])")!
            let peer = HostilePeer(key: byzantine, chainID: "emc-test", target: target)
            let honest = try chain.key(1)
            let height = { chain.nodes.map { $0.view.current.height }.max() ?? 0 }

            // Garbage of every kind, seeded; votes signed by the wrong key in an honest validator's name; far
            // future heights; a claimed height of 2^40.
            var random = SeededRandom(seed: 0xBAD)
            var garbage = [PeerFrame]()
            for i in 0..<600 {
                let bytes = random.bytes(Int(random.next() % 300))
                garbage.append(i % 2 == 0 ? .consensus(bytes) : .tx(bytes))
                let now = height()
                let forged = SignedVote(signing: VoteBody(chainID: "emc-test", type: .prevote, height: now + 1, round: UInt32(i % 5),
                                                          value: Hash32.of(bytes), validator: honest.nodeID), with: byzantine)
                garbage.append(.consensus(ConsensusMessage.vote(forged).canonicalBytes))
                let future = SignedVote(signing: VoteBody(chainID: "emc-test", type: .precommit, height: now + 1_000 + UInt64(i),
                                                          round: 0, value: nil, validator: byzantine.nodeID), with: byzantine)
                garbage.append(.consensus(ConsensusMessage.vote(future).canonicalBytes))
            }
            garbage.append(.status(height: 1 << 40))
            let frames = garbage
            let before = height()
            let first = await peer.send { frames }
            #expect(first.sent >= frames.count)
            try await Harness.eventually(timeout: .seconds(20), "the chain finalises after the garbage") { height() >= before + 2 }

            // A handshake frame after the handshake ends the link.
            let second = await peer.send { [.status(height: 1), .hello(nodeKey: byzantine.publicKey, nonce: PeerHandshake.randomNonce(), chainID: "emc-test")] }
            #expect(second.error != nil, "a second hello must end the stream")

            // A flood: far more frames per second than the limit. The node cuts the link off.
            let flood = await peer.send { Array(repeating: PeerFrame.tx([1, 2, 3]), count: 200_000) }
            #expect(flood.error != nil, "the flood must be cut off (sent \(flood.sent))")

            // Every validator is alive, the chain still finalises, and an honest transfer commits.
            let afterFlood = height()
            try await Harness.eventually(timeout: .seconds(20), "the chain finalises after the flood") { height() >= afterFlood + 2 }
            let bob = Account(owner: SigningKey().publicKey)
            let tx = transfer(try chain.funded, to: bob, amount: Amount(emc: 1), chainID: "emc-test")
            #expect(try await Harness.request(.POST, chain.url(1) + "/txs", body: tx.encoded).status == 202)
            try await Harness.eventually(timeout: .seconds(20), "an honest transfer commits") {
                try await Harness.request(.GET, chain.url(2) + "/accounts/\(bob)/balance").json?["balance"] as? String == "1.00000000"
            }
            for i in 0..<3 { #expect(try await Harness.request(.GET, chain.url(i) + "/health").status == 200) }
        }
    }
}
