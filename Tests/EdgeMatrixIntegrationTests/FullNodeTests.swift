@testable import EdgeMatrixChain
import EdgeMatrixConsensus
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNetwork
import Foundation
import GRPCCore
import Logging
import ServiceLifecycle
import Synchronization
import Testing

/// A full node (`ChainNodeRole.full`) in the test process, syncing over real TCP and mutual TLS.
final class InProcessFullNode: @unchecked Sendable {
    let node: ValidatorNode
    let httpPort: Int
    private let group: ServiceGroup
    private let task: Task<Void, any Error>

    init(genesis: Genesis, directory: String, key: SigningKey = SigningKey()) throws {
        httpPort = Harness.freePort()
        var logger = Logger(label: "test.full")
        logger.logLevel = .warning
        var configuration = ValidatorConfiguration(genesis: genesis, dataDirectory: directory, httpPort: httpPort, p2pPort: Harness.freePort())
        configuration.role = .full
        node = try ValidatorNode(configuration: configuration, key: key, logger: logger)
        group = ServiceGroup(configuration: .init(services: [.init(service: node)], logger: logger))
        let group = group
        task = Task { try await group.run() }
    }

    var url: String { "http://127.0.0.1:\(httpPort)" }

    func stop() async {
        await group.triggerGracefulShutdown()
        _ = try? await task.value
    }
}

extension Integration {
    @Suite("Full nodes sync read-only", .serialized)
    struct FullNodeTests {
        // MARK: The read-only table, on a given clock

        /// Catches: a bucket that does not refill (or refills past its size), a clock jump that traps or overflows, an
        /// admission that exceeds the table's bound, a key evicted while it holds a stream, and churning keys that
        /// get a fresh bucket before the old one would have refilled.
        @Test("read-only table: token bucket refill and cap, bounded keys, idle eviction only, bounded calls in flight and streams")
        func readOnlyTable() throws {
            let limits = ReadOnlyPeerLimits(maxPeers: 2, callsPerSecond: 10, burst: 3, maxConcurrentCalls: 2, maxStreamsPerPeer: 1,
                                            idleEviction: .seconds(1))
            let table = ReadOnlyPeers(limits: limits)
            let (a, b, c) = (SigningKey().nodeID, SigningKey().nodeID, SigningKey().nodeID)
            let t0 = ContinuousClock.now
            // The burst, then refusal; 100 ms gives one more call (10 a second), never more than the burst.
            for _ in 0..<3 {
                try table.beginCall(a, now: t0)
                table.endCall(a, now: t0)
            }
            #expect(throws: ReadOnlyRefusal.rateLimited) { try table.beginCall(a, now: t0) }
            #expect(throws: ReadOnlyRefusal.rateLimited) { try table.beginCall(a, now: t0 + .milliseconds(99)) }
            try table.beginCall(a, now: t0 + .milliseconds(100))
            table.endCall(a, now: t0 + .milliseconds(100))
            // A huge gap (a clock far ahead) fills the bucket to its size, no more, and traps nothing.
            let later = t0 + .seconds(Int64(Int32.max) * 4)
            for _ in 0..<3 {
                try table.beginCall(a, now: later)
                table.endCall(a, now: later)
            }
            #expect(throws: ReadOnlyRefusal.rateLimited) { try table.beginCall(a, now: later) }
            #expect(table.refusals(.rateLimited) == 3)

            // Calls in flight are bounded over all keys.
            try table.beginCall(b, now: t0)
            try table.beginCall(b, now: t0)
            #expect(throws: ReadOnlyRefusal.busy) { try table.beginCall(b, now: t0) }
            table.endCall(b, now: t0)
            table.endCall(b, now: t0)

            // Two keys fill the table; a third is refused while both are active, and the one with a stream stays.
            try table.openStream(b, now: t0)
            #expect(throws: ReadOnlyRefusal.tooManyStreams) { try table.openStream(b, now: t0) }
            #expect(table.count == 2)
            #expect(!table.canAdmit(c, now: later))  // a holds no stream but was active at `later`
            #expect(throws: ReadOnlyRefusal.tooManyPeers) { try table.beginCall(c, now: later) }
            // Once a has been idle long enough, c takes its place; b, holding a stream, is never evicted.
            let idle = later + .seconds(2)
            #expect(table.canAdmit(c, now: idle))
            try table.beginCall(c, now: idle)
            table.endCall(c, now: idle)
            #expect(table.count == 2)
            #expect(throws: ReadOnlyRefusal.tooManyPeers) { try table.openStream(a, now: idle) }
            table.closeStream(b, now: idle)
            // When room is needed every idle key goes (their buckets are full again: they lose nothing).
            try table.openStream(a, now: idle + .seconds(2))
            #expect(table.count == 1)
            #expect(ReadOnlyRefusal.rateLimited.description.hasPrefix("rate_limited: "))
        }

        // MARK: (a) a real `emc node --role full` process follows four validator processes

        /// Catches: a validator that refuses a TLS-bound key outside the set (the state before full nodes: sync never
        /// starts), `--role full` not wired in the CLI, a full node that stops after its first sync, and a full node
        /// that applies blocks differently (block hashes or state roots differ from a validator's).
        @Test("a full node with a fresh key syncs to the head of a 4-validator chain, keeps following, and its blocks and state roots equal a validator's")
        func fullNodeFollows() async throws {
            let chain = try TestChain()
            let fullDirectory = chain.root + "/full"
            let fullPort = Harness.freePort()
            let full = Mutex<TestProcess?>(nil)
            defer {
                chain.stopAll()
                full.withLock { $0?.terminate() }
            }
            do {
                for i in 0..<4 { try chain.start(i) }
                try await Harness.eventually(timeout: .seconds(60), "the validators commit") { (try? await chain.height(0)) ?? 0 >= 3 }
                // A transfer before the full node starts, so that sync carries a state change.
                let bob = chain.root + "/bob.key"
                _ = try TestNetwork.runEMC(["keys", "new", "--file", bob])
                _ = try chain.transfer(to: bob, amount: "7.5", via: 0)
                try await Harness.eventually(timeout: .seconds(30), "the transfer commits") {
                    try await chain.balance(0, keyFile: bob) == "7.50000000"
                }

                full.withLock { process in
                    process = try? TestProcess(name: "full", executable: Harness.emcBinary, arguments: [
                        "node", "--role", "full", "--genesis", chain.genesisPath, "--data-dir", fullDirectory,
                        "--http-port", String(fullPort),
                    ], logDirectory: chain.root)
                }
                let url = "http://127.0.0.1:\(fullPort)"
                func fullHeight() async -> Int {
                    (try? await Harness.request(.GET, url + "/status", timeout: .seconds(1)).json?["height"] as? Int) ?? -1
                }
                let head = try await chain.height(0)
                try await Harness.eventually(timeout: .seconds(60), "the full node syncs to height \(head)") { await fullHeight() >= head }
                let status = try #require(try await Harness.request(.GET, url + "/status").json)
                #expect(status["role"] as? String == "full")
                let fullKey = try #require(status["node_key"] as? String)
                let validatorKeys = try (0..<4).map { i in try KeyFile.read(from: chain.root + "/net/validator-\(i + 1)/node.key").publicKey.hex }
                #expect(!validatorKeys.contains(fullKey), "the full node runs with a fresh key of its own")
                #expect(FileManager.default.fileExists(atPath: fullDirectory + "/node.key"))

                // It keeps following: new blocks arrive, and a transfer made after the sync reads the same there.
                let synced = await fullHeight()
                _ = try chain.transfer(to: bob, amount: "1", via: 2)
                try await Harness.eventually(timeout: .seconds(30), "the full node follows new blocks") { await fullHeight() >= synced + 3 }
                try await Harness.eventually(timeout: .seconds(30), "the later transfer reads the same on the full node") {
                    let answer = try await Harness.request(.GET, url + "/accounts/\(try Self.account(bob))/balance").json
                    return answer?["balance"] as? String == "8.50000000"
                }
                let last = await fullHeight()
                for height in Set([1, 2, head / 2, head, last]) where height >= 1 {
                    let ours = try await Harness.request(.GET, url + "/blocks/\(height)").json ?? [:]
                    let theirs = try await chain.block(1, height)
                    #expect(ours["hash"] as? String != nil)
                    #expect(ours["hash"] as? String == theirs["hash"] as? String, "block \(height) hash")
                    #expect(ours["state_root"] as? String == theirs["state_root"] as? String, "block \(height) state root")
                }
            } catch {
                print(chain.logs)
                print(full.withLock { $0.map { String($0.log.suffix(3000)) } } ?? "")
                throw error
            }
        }

        static func account(_ keyFile: String) throws -> Account { Account(owner: try KeyFile.read(from: keyFile).publicKey) }

        // MARK: (b) consensus and transaction frames from a read-only key

        /// Catches: a read-only key's frames handed to the node like a validator's (its transaction would enter the
        /// mempool and commit; its votes would queue in the consensus loop), or a read-only link that is not ended.
        @Test("a read-only key's status frames are ignored, its consensus or transaction frame ends its stream with read_only_peer, and nothing it sent is used; the chain keeps finalising")
        func consensusFramesRefused() async throws {
            let chain = try InProcessChain(validators: 4, running: 3)
            do { try await refusals(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        func refusals(_ chain: InProcessChain) async throws {
            let height = { chain.nodes.map { $0.view.current.height }.max() ?? 0 }
            try await Harness.eventually(timeout: .seconds(30), "three of four validators commit") { height() >= 2 }
            let target = PeerAddress(key: try chain.key(0).publicKey, endpoint: "127.0.0.1:\(chain.p2pPorts[0])")!
            let reader = SigningKey()
            let peer = HostilePeer(key: reader, chainID: "emc-test", target: target)
            let node = chain.nodes[0]

            // Status frames alone: the link stays up until the client ends it.
            let quiet = await peer.send { [PeerFrame.status(height: 1 << 40), PeerFrame.status(height: 3)] }
            #expect(quiet.error == nil, "status frames from a read-only key must not end its stream: \(String(describing: quiet.error))")
            #expect(node.peers.reportedHeight(of: reader.nodeID) == nil, "a read-only key is no sync source")

            // A vote in its own name (well formed, for the next height): the stream ends, with the code.
            let vote = SignedVote(signing: VoteBody(chainID: "emc-test", type: .prevote, height: height() + 1, round: 0,
                                                    value: nil, validator: reader.nodeID), with: reader)
            let voted = await peer.send { [PeerFrame.consensus(ConsensusMessage.vote(vote).canonicalBytes)] + Array(repeating: PeerFrame.status(height: 1), count: 5) }
            let voteError = try #require(voted.error as? RPCError, "the consensus frame must end the stream: \(String(describing: voted.error))")
            #expect(voteError.code == .permissionDenied)
            #expect(voteError.message.hasPrefix("read_only_peer"), "\(voteError.message)")
            #expect(node.readOnlyPeers.refusals(.consensusFrame) == 1)

            // A valid, funded transfer gossiped by the read-only key: refused, and it never reaches a mempool.
            let bob = Account(owner: SigningKey().publicKey)
            let tx = transfer(try chain.funded, to: bob, amount: Amount(emc: 3), chainID: "emc-test")
            let gossiped = await peer.send { [PeerFrame.tx(tx.encoded)] }
            let txError = try #require(gossiped.error as? RPCError)
            #expect(txError.code == .permissionDenied)
            #expect(txError.message.hasPrefix("read_only_peer"), "\(txError.message)")
            #expect(node.readOnlyPeers.refusals(.transactionFrame) == 1)

            let before = height()
            try await Harness.eventually(timeout: .seconds(30), "the chain keeps finalising") { height() >= before + 3 }
            for i in 0..<3 {
                #expect(!chain.nodes[i].mempool.contains(tx.id))
                let answer = try await Harness.request(.GET, chain.url(i) + "/txs/\(tx.id.hex)")
                #expect(answer.status == 404, "validator \(i + 1): \(answer.text.prefix(200))")
                #expect(try await Harness.request(.GET, chain.url(i) + "/accounts/\(bob)/balance").json?["balance"] as? String == "0.00000000")
            }
        }

        // MARK: (c) GetBlocks in a tight loop from read-only keys

        /// Catches: read-only GetBlocks served without a per-key limit (the flood is all served), a block cap not
        /// applied to read-only answers, an unbounded read-only table, a limit that also throttles validators, and a
        /// flood that stalls the chain.
        @Test("a read-only key calling GetBlocks in a tight loop is rate limited and counted, gets at most the read-only block cap, and the table of read-only keys is bounded; validators are not limited and the chain keeps finalising")
        func getBlocksRateLimited() async throws {
            let limits = ReadOnlyPeerLimits(maxPeers: 2, callsPerSecond: 20, burst: 20, maxBlocksPerCall: 3, idleEviction: .seconds(1))
            let chain = try InProcessChain(validators: 4, running: 3, readOnlyPeers: limits)
            do { try await flood(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        func flood(_ chain: InProcessChain) async throws {
            let height = { chain.nodes.map { $0.view.current.height }.max() ?? 0 }
            try await Harness.eventually(timeout: .seconds(30), "three of four validators commit") { height() >= 5 }
            let validatorOne = try chain.key(0).publicKey
            let node = chain.nodes[0]
            var logger = Logger(label: "test.reader")
            logger.logLevel = .critical
            func network(_ key: SigningKey) throws -> PeerNetwork {
                PeerNetwork(key: key, tls: try NodeTLS.make(key: key), chainID: "emc-test",
                            peers: [PeerAddress(key: validatorOne, endpoint: "127.0.0.1:\(chain.p2pPorts[0])")!], readOnly: true, logger: logger)
            }
            let flooder = try network(SigningKey())
            let second = try network(SigningKey())
            // The fourth genesis validator's key (not running): a validator peer, never read-only.
            let validator = try network(try chain.key(3))
            let flooderTask = Task { await flooder.run() }
            let secondTask = Task { await second.run() }
            let validatorTask = Task { await validator.run() }
            defer { flooderTask.cancel(); secondTask.cancel(); validatorTask.cancel() }
            try await Harness.eventually(timeout: .seconds(10), "all three connect") {
                flooder.connectedCount == 1 && second.connectedCount == 1 && validator.connectedCount == 1
            }
            #expect(node.readOnlyPeers.count == 2)

            // Four tasks call GetBlocks as fast as answers come for three seconds, while the chain runs.
            let before = height()
            let started = ContinuousClock.now
            let (ok, no, largest) = await withTaskGroup(of: (Int, Int, Int).self) { group in
                for _ in 0..<4 {
                    group.addTask {
                        var (served, refused, largest) = (0, 0, 0)
                        while ContinuousClock.now - started < .seconds(3) {
                            if let answer = try? await flooder.fetchBlocks(from: validatorOne.nodeID, start: 1, limit: 1_000) {
                                served += 1
                                largest = max(largest, answer.blocks.count)
                            } else {
                                refused += 1
                            }
                        }
                        return (served, refused, largest)
                    }
                }
                return await group.reduce(into: (0, 0, 0)) { $0 = ($0.0 + $1.0, $0.1 + $1.1, max($0.2, $1.2)) }
            }
            let seconds = Double((ContinuousClock.now - started).components.seconds) + 1
            #expect(ok >= 20, "the burst is served (\(ok))")
            #expect(Double(ok) <= 20 + 20 * seconds + 2, "at most burst + rate × time is served: \(ok) in about \(seconds) s")
            #expect(no > ok, "most of a tight loop is refused (\(no) refused, \(ok) served)")
            #expect(node.readOnlyPeers.refusals(.rateLimited) >= no - 5, "every refusal is counted")
            #expect(largest == 3, "a read-only answer holds at most maxBlocksPerCall blocks")
            // The refusal is RESOURCE_EXHAUSTED with the stable code.
            let limited = await #expect(throws: RPCError.self) {
                for _ in 0..<100 { _ = try await flooder.fetchBlocks(from: validatorOne.nodeID, start: 1, limit: 1) }
            }
            #expect(limited?.code == .resourceExhausted)
            #expect(limited?.message.hasPrefix("rate_limited") == true, "\(limited?.message ?? "")")

            // A validator peer is not limited, and gets more than the read-only cap.
            for _ in 0..<60 {
                let answer = try #require(try await validator.fetchBlocks(from: validatorOne.nodeID, start: 1, limit: 1_000))
                #expect(answer.blocks.count > 3)
            }
            // The chain finalised during the flood and still does.
            try await Harness.eventually(timeout: .seconds(20), "the chain keeps finalising") { height() >= before + 3 }

            // The table is full (two read-only keys holding streams): a third key gets nothing.
            let third = try network(SigningKey())
            let thirdTask = Task { await third.run() }
            defer { thirdTask.cancel() }
            try await Task.sleep(for: .seconds(2))
            #expect(third.connectedCount == 0)
            await #expect(throws: (any Error).self) { _ = try await third.fetchBlocks(from: validatorOne.nodeID, start: 1, limit: 1) }
            #expect(node.readOnlyPeers.count == 2)
            // Once the second key leaves and stays idle, the third takes its place.
            secondTask.cancel()
            try await Harness.eventually(timeout: .seconds(20), "the third key gets in after the second leaves") { third.connectedCount == 1 }
            #expect(try await third.fetchBlocks(from: validatorOne.nodeID, start: 1, limit: 1) != nil)
            #expect(node.readOnlyPeers.count == 2)
        }

        // MARK: (d) POST /txs on a full node

        /// Catches: a full node that admits transactions into a mempool of its own (they would sit there, or be
        /// gossiped by a node that must send nothing but status), or answers with an unclear error.
        @Test("POST /txs on a full node is refused with 403 read_only_node and changes nothing anywhere")
        func postRefused() async throws {
            let chain = try InProcessChain(validators: 1, running: 1)
            let full = try InProcessFullNode(genesis: chain.genesis, directory: chain.directory + "/full")
            do { try await readOnlyAPI(chain, full) } catch {
                await full.stop()
                await chain.stop()
                throw error
            }
            await full.stop()
            await chain.stop()
        }

        func readOnlyAPI(_ chain: InProcessChain, _ full: InProcessFullNode) async throws {
            try await Harness.eventually(timeout: .seconds(30), "the full node syncs") { full.node.view.current.height >= 2 }
            let funded = try chain.funded
            let bob = Account(owner: SigningKey().publicKey)
            let tx = transfer(funded, to: bob, amount: Amount(emc: 2), chainID: "emc-test")
            let fundedBefore = try await Harness.request(.GET, chain.url() + "/accounts/\(Account(owner: funded.publicKey))/balance").json?["balance"] as? String
            for body in [Array(Hex.encode(tx.encoded).utf8), tx.encoded, Array("garbage".utf8)] {
                let answer = try await Harness.request(.POST, full.url + "/txs", body: body)
                #expect(answer.status == 403, "\(answer.text)")
                #expect(ChainAPITests.code(answer) == "read_only_node", "\(answer.text)")
            }
            // The Swift API refuses too.
            #expect(throws: MempoolRejection.self) { _ = try full.node.submit(tx.encoded) }
            let reached = full.node.view.current.height
            try await Harness.eventually(timeout: .seconds(20), "blocks keep coming") { full.node.view.current.height >= reached + 2 }
            #expect(full.node.mempool.count == 0)
            #expect(!chain.nodes[0].mempool.contains(tx.id))
            #expect(try await Harness.request(.GET, chain.url() + "/txs/\(tx.id.hex)").status == 404)
            #expect(try await Harness.request(.GET, full.url + "/txs/\(tx.id.hex)").status == 404)
            #expect(try await Harness.request(.GET, full.url + "/accounts/\(bob)/balance").json?["balance"] as? String == "0.00000000")
            #expect(try await Harness.request(.GET, chain.url() + "/accounts/\(Account(owner: funded.publicKey))/balance").json?["balance"] as? String
                    == fundedBefore)
            // Reads work on the full node.
            let status = try await Harness.request(.GET, full.url + "/status").json
            #expect(status?["role"] as? String == "full")
            #expect(status?["mempool_size"] as? Int == 0)
            #expect(try await Harness.request(.GET, full.url + "/validators").status == 200)
        }

        // MARK: (e) a full node never votes, even with an elected key

        /// Catches: a full node whose engine signs with its key (a validator key run with `--role full` would vote,
        /// and the operator who chose read-only would be voting, or double-signing beside the real validator).
        @Test("a full node run with a genesis validator's key never votes: one of two equal validators plus that full node commit nothing")
        func fullNodeNeverVotes() async throws {
            let chain = try InProcessChain(validators: 2, running: 1)
            let full = try InProcessFullNode(genesis: chain.genesis, directory: chain.directory + "/full", key: try chain.key(1))
            do {
                try await Harness.eventually(timeout: .seconds(20), "both serve HTTP") {
                    try await Harness.request(.GET, full.url + "/health", timeout: .seconds(1)).status == 200
                }
                try await Task.sleep(for: .seconds(6))
                #expect(chain.nodes[0].view.current.height == 0, "the full node's vote would make 2 of 2")
                #expect(full.node.view.current.height == 0)
            } catch {
                await full.stop()
                await chain.stop()
                throw error
            }
            await full.stop()
            await chain.stop()
            // Not even signed and kept: its WAL, where a voting engine records every message it signs, holds none.
            let records = try FileWAL(path: chain.directory + "/full/consensus.wal").replay()
            let signed = records.filter { if case .signed = $0 { true } else { false } }
            #expect(signed.isEmpty, "the full node signed \(signed.count) consensus messages")
        }
    }
}
