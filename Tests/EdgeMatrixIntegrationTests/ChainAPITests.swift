import EdgeMatrixApplication
import AsyncHTTPClient
@testable import EdgeMatrixChain
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNetwork
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import ServiceLifecycle
import Testing

/// Validators run inside the test process (fast); the HTTP API is called over real TCP.
final class InProcessChain: @unchecked Sendable {
    let directory: String
    let genesis: Genesis
    let layout: DevnetGenesis.Layout
    let nodes: [ValidatorNode]
    let httpPorts: [Int]
    let p2pPorts: [Int]
    private let group: ServiceGroup
    private let task: Task<Void, any Error>

    /// `validators` in the genesis, of which the first `running` are started.
    init(validators: Int, running: Int, maxPeerFramesPerSecond: Int? = nil, readOnlyPeers: ReadOnlyPeerLimits? = nil) throws {
        directory = Harness.temporaryDirectory("chain-inproc")
        httpPorts = (0..<validators).map { _ in Harness.freePort() }
        p2pPorts = (0..<validators).map { _ in Harness.freePort() }
        genesis = try DevnetGenesis.create(directory: directory, chainID: "emc-test", endpoints: p2pPorts.map { "127.0.0.1:\($0)" })
        layout = DevnetGenesis.Layout(directory: directory)
        var logger = Logger(label: "test.chain")
        logger.logLevel = .warning
        var nodes = [ValidatorNode]()
        for i in 0..<running {
            let key = try KeyFile.read(from: layout.validatorKeyPath(i + 1))
            var configuration = ValidatorConfiguration(genesis: genesis, dataDirectory: layout.validatorDirectory(i + 1),
                                                       httpPort: httpPorts[i], p2pPort: p2pPorts[i])
            if let maxPeerFramesPerSecond { configuration.maxPeerFramesPerSecond = maxPeerFramesPerSecond }
            if let readOnlyPeers { configuration.readOnlyPeers = readOnlyPeers }
            nodes.append(try ValidatorNode(configuration: configuration, key: key, logger: logger))
        }
        self.nodes = nodes
        let group = ServiceGroup(configuration: .init(services: nodes.map { .init(service: $0) }, logger: logger))
        self.group = group
        task = Task { try await group.run() }
    }

    func url(_ i: Int = 0) -> String { "http://127.0.0.1:\(httpPorts[i])" }
    func key(_ i: Int) throws -> SigningKey { try KeyFile.read(from: layout.validatorKeyPath(i + 1)) }
    var funded: SigningKey { get throws { try KeyFile.read(from: layout.fundedKeyPath) } }

    func stop() async {
        await group.triggerGracefulShutdown()
        _ = try? await task.value
    }
}

func transfer(_ from: SigningKey, to: Account, amount: Amount, chainID: String, memo: String? = nil) -> Transaction {
    Transaction(signing: TransactionBody(chainID: chainID, createdAtMillis: UInt64(Date().timeIntervalSince1970 * 1000),
                                         kind: .transfer(Transfer(to: to, amount: amount, memo: memo.map { Array($0.utf8) }))),
                with: from)
}

extension Integration {
    @Suite("Chain HTTP API and peer authentication", .serialized)
    struct ChainAPITests {
        @Test("HTTP API: submit, query, stable error codes, SSE")
        func httpAPI() async throws {
            let chain = try InProcessChain(validators: 1, running: 1)
            do { try await api(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        func api(_ chain: InProcessChain) async throws {
            let base = chain.url()
            try await Harness.eventually(timeout: .seconds(20), "single validator commits") {
                (try await Harness.request(.GET, base + "/status", timeout: .seconds(1)).json?["height"] as? Int ?? 0) >= 2
            }
            // SSE: the next block arrives as an event.
            var sse = HTTPClientRequest(url: base + "/events/blocks")
            sse.method = .GET
            let stream = try await Harness.http.execute(sse, timeout: .seconds(10))
            #expect(stream.headers.first(name: "content-type") == "text/event-stream")
            var text = ""
            for try await chunk in stream.body {
                text += String(buffer: chunk)
                if text.contains("\n\n") { break }
            }
            #expect(text.hasPrefix("event: block\ndata: {"), "\(text)")

            let funded = try chain.funded
            let bob = Account(owner: SigningKey().publicKey)
            let tx = transfer(funded, to: bob, amount: try Amount(parsing: "12.5"), chainID: "emc-test", memo: "hi")
            let accepted = try await Harness.request(.POST, base + "/txs", body: Array(Hex.encode(tx.encoded).utf8))
            #expect(accepted.status == 202, "\(accepted.text)")
            #expect(accepted.json?["hash"] as? String == tx.id.hex)
            try await Harness.eventually(timeout: .seconds(10), "transfer committed") {
                try await Harness.request(.GET, base + "/txs/\(tx.id.hex)").json?["status"] as? String == "committed"
            }
            let balance = try await Harness.request(.GET, base + "/accounts/\(bob)/balance")
            #expect(balance.json?["balance"] as? String == "12.50000000")
            let txJSON = try await Harness.request(.GET, base + "/txs/\(tx.id.hex)").json
            #expect((txJSON?["transaction"] as? [String: Any])?["amount"] as? String == "12.50000000")

            // Raw bytes work too; resubmitting is refused with a stable code.
            let again = try await Harness.request(.POST, base + "/txs", body: tx.encoded)
            #expect(again.status == 400)
            #expect(Self.code(again) == "duplicate", "\(again.text)")

            let poor = transfer(SigningKey(), to: bob, amount: Amount(emc: 1), chainID: "emc-test")
            #expect(Self.code(try await Harness.request(.POST, base + "/txs", body: Array(Hex.encode(poor.encoded).utf8))) == "insufficient_funds")
            let otherChain = transfer(funded, to: bob, amount: Amount(emc: 1), chainID: "other")
            #expect(Self.code(try await Harness.request(.POST, base + "/txs", body: otherChain.encoded)) == "wrong_chain")
            #expect(Self.code(try await Harness.request(.POST, base + "/txs", body: Array("hello".utf8))) == "malformed")
            // A forged signature on a transaction never seen before: only the signature check can refuse it.
            let unseen = transfer(funded, to: bob, amount: Amount(emc: 2), chainID: "emc-test", memo: "unseen")
            var forged = unseen.encoded
            forged[forged.count - 1] ^= 1
            let forgedResult = try await Harness.request(.POST, base + "/txs", body: forged)
            #expect(forgedResult.status == 400)
            #expect(Self.code(forgedResult) == "bad_signature", "\(forgedResult.text)")
            // ...and refusing it does not block the genuine copy, which commits.
            #expect(try await Harness.request(.POST, base + "/txs", body: unseen.encoded).status == 202)
            try await Harness.eventually(timeout: .seconds(10), "the genuine copy commits") {
                try await Harness.request(.GET, base + "/txs/\(unseen.id.hex)").json?["status"] as? String == "committed"
            }

            let missing = try await Harness.request(.GET, base + "/blocks/99999999")
            #expect(missing.status == 404)
            #expect(Self.code(missing) == "not_found")
            #expect(Self.code(try await Harness.request(.GET, base + "/txs/zz")) == "invalid_hash")
            #expect(Self.code(try await Harness.request(.GET, base + "/accounts/nope/balance")) == "invalid_account")
            #expect(Self.code(try await Harness.request(.GET, base + "/no/such/route")) == "not_found")

            let blocks = try await Harness.request(.GET, base + "/blocks?from=1&limit=5").json
            let listed = (blocks?["blocks"] as? [[String: Any]]) ?? []
            #expect(listed.count >= 2 && listed.count <= 5)
            #expect(listed.first?["height"] as? Int == 1)
            let validators = try await Harness.request(.GET, base + "/validators").json
            #expect((validators?["validators"] as? [Any])?.count == 1)
            let nodes = try await Harness.request(.GET, base + "/nodes").json
            #expect((nodes?["nodes"] as? [Any])?.count == 1)
            let owner = try KeyFile.read(from: chain.layout.validatorDirectory(1) + "/owner.key")
            let stakes = try await Harness.request(.GET, base + "/stakes/\(Account(owner: owner.publicKey))").json
            #expect((stakes?["stakes"] as? [Any])?.count == 1)
            let status = try await Harness.request(.GET, base + "/status").json
            #expect(status?["chain_id"] as? String == "emc-test")
            #expect((status?["state_root"] as? String)?.count == 64)
        }

        @Test("Peer transport: validator keys get full service, other TLS-bound keys read-only; no client certificate, a handshake key that is not the TLS key, or a wrong pin gets nothing")
        func peerAuthentication() async throws {
            let chain = try InProcessChain(validators: 2, running: 1)
            do { try await peers(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        func peers(_ chain: InProcessChain) async throws {
            try await Harness.eventually(timeout: .seconds(20), "validator 1 serving") {
                try await Harness.request(.GET, chain.url() + "/health", timeout: .seconds(1)).status == 200
            }
            let logger = Logger(label: "test.peer")
            let target = "127.0.0.1:\(chain.p2pPorts[0])"
            let validatorOne = try chain.key(0).publicKey

            func network(_ key: SigningKey, tlsKey: SigningKey? = nil, pinning pinned: PublicKey) throws -> PeerNetwork {
                PeerNetwork(key: key, tls: try NodeTLS.make(key: tlsKey ?? key), chainID: "emc-test",
                            peers: [PeerAddress(key: pinned, endpoint: target)!], logger: logger)
            }
            // An outsider key is let in read-only (a full node).
            let outsider = try network(SigningKey(), pinning: validatorOne)
            // Validator 2's real key is let in as a validator.
            let insider = try network(try chain.key(1), pinning: validatorOne)
            // A client that pins another key refuses validator 1.
            let wrongKey = SigningKey().publicKey
            let wrongPin = try network(try chain.key(1), pinning: wrongKey)
            // Catches: a handshake checked apart from the TLS identity (validator 2's handshake over an outsider's
            // certificate would get a validator's service on a link TLS bound to someone else).
            let mixed = try network(try chain.key(1), tlsKey: SigningKey(), pinning: validatorOne)
            let tasks = [Task { await outsider.run() }, Task { await insider.run() }, Task { await wrongPin.run() }, Task { await mixed.run() }]
            defer { for t in tasks { t.cancel() } }
            try await Harness.eventually(timeout: .seconds(10), "the genuine validator connects") { insider.connectedCount == 1 }
            try await Harness.eventually(timeout: .seconds(10), "the outsider connects read-only") { outsider.connectedCount == 1 }
            try await Task.sleep(for: .seconds(2))
            #expect(wrongPin.connectedCount == 0)
            #expect(mixed.connectedCount == 0)
            #expect(chain.nodes[0].readOnlyPeers.count >= 1)
            // Both learn validator 1's height (0: one of two equal validators cannot commit) from its status frames;
            // the refused clients learn nothing.
            try await Harness.eventually(timeout: .seconds(10), "status frames reach the insider and the read-only peer") {
                insider.reportedHeight(of: validatorOne.nodeID) == 0 && outsider.reportedHeight(of: validatorOne.nodeID) == 0
            }
            #expect(wrongPin.reportedHeight(of: validatorOne.nodeID) == nil)
            #expect(mixed.reportedHeight(of: validatorOne.nodeID) == nil)
            // GetBlocks has no handshake of its own: a client that pinned another key gets nothing (its TLS handshake
            // fails), the admitted key and the read-only key get blocks.
            await #expect(throws: (any Error).self) { _ = try await wrongPin.fetchBlocks(from: wrongKey.nodeID, start: 0, limit: 1) }
            #expect(try await insider.fetchBlocks(from: validatorOne.nodeID, start: 0, limit: 1) != nil)
            #expect(try await outsider.fetchBlocks(from: validatorOne.nodeID, start: 0, limit: 1) != nil)
            // Catches: a server that stops requiring a client certificate: without one, not even GetBlocks is served.
            let anonymous = GRPCClient(transport: try HTTP2ClientTransport.Posix(
                target: peerTarget(host: "127.0.0.1", port: chain.p2pPorts[0]),
                transportSecurity: NodeTLS.clientSecurity(pinnedServer: validatorOne)))
            let running = Task { try await anonymous.runConnections() }
            defer { anonymous.beginGracefulShutdown(); running.cancel() }
            var options = CallOptions.defaults
            options.timeout = .seconds(5)
            await #expect(throws: (any Error).self) {
                _ = try await anonymous.unary(
                    request: ClientRequest(message: BlockRangeRequest(from: 1, limit: 1)), descriptor: PeerService.getBlocks,
                    serializer: ProtobufWireSerializer<BlockRangeRequest>(), deserializer: ProtobufWireDeserializer<BlockRangeResponse>(),
                    options: options) { try $0.message }
            }
        }

        @Test("Block codec round-trips and never traps on random bytes")
        func blockCodec() throws {
            let block = ChainBlock(height: 7, timeMillis: 123, proposer: SigningKey().nodeID, transactions: [[1, 2, 3], []], evidence: [])
            #expect(try ChainBlock(canonicalBytes: block.canonicalBytes) == block)
            var generator = SystemRandomNumberGenerator()
            for _ in 0..<2000 {
                let bytes = (0..<Int.random(in: 0..<200, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) }
                _ = try? ChainBlock(canonicalBytes: bytes)
                _ = try? PeerFrame(protobufBytes: bytes)
                _ = try? BlockRangeResponse(protobufBytes: bytes)
            }
            var truncated = block.canonicalBytes
            truncated.removeLast()
            #expect(throws: (any Error).self) { try ChainBlock(canonicalBytes: truncated) }
        }

        static func code(_ result: Harness.HTTPResult) -> String? {
            (result.json?["error"] as? [String: Any])?["code"] as? String
        }
    }
}
