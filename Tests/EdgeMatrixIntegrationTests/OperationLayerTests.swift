import AsyncHTTPClient
import NIOCore
import EdgeMatrixClient
import EdgeMatrixCore
import Foundation
import EdgeMatrixStore
import Testing

/// The operation layer end to end: real `emc` router and compute-node processes in front of real local models.
/// Every integration suite nests here, so that they run one at a time: they share the model servers and 2 cores.
@Suite("Integration", .serialized)
enum Integration {}

extension Integration {
@Suite("Operation layer, end to end", .serialized)
struct OperationLayerTests {
    let chatModel = "smollm2-135m-instruct"
    let embeddingModel = "all-minilm-l6-v2"

    func chatBody(_ prompt: String, maxTokens: Int = 16, stream: Bool = false) -> [UInt8] {
        Harness.json(["model": chatModel, "messages": [["role": "user", "content": prompt]], "max_tokens": maxTokens,
                      "temperature": 0, "seed": 1, "stream": stream])
    }

    @Test("chat, streaming chat, completions, embeddings and models work through router and compute nodes")
    func openAIRoutes() async throws {
        let network = try await TestNetwork(name: "routes")
        defer { network.stopAll() }
        try await network.startRouter()
        try await network.startComputeNode()
        try await network.startComputeNode()
        try await network.waitForNodes(2)
        let client = EdgeMatrixClient(baseURL: network.baseURL, apiKey: network.apiKey, httpClient: Harness.http)

        let models = try await client.models().map(\.id)
        #expect(models == [embeddingModel, chatModel].sorted())

        let messages = [ChatMessage(role: "user", content: "Name a colour.")]
        let chat = try await client.chat(model: chatModel, messages: messages, maxTokens: 16, temperature: 0, seed: 1)
        #expect(!chat.text.isEmpty)
        #expect((chat.usage?.completionTokens ?? 0) > 0)

        // Greedy decoding follows the same argmax path, so the streamed deltas reassemble into the same text.
        // llama.cpp's prompt cache can make the model emit end-of-sequence a few tokens earlier on a repeated
        // prompt, so one answer may stop short of the other, but neither may diverge from the other.
        var streamed = ""
        var deltas = 0
        for try await delta in client.streamChat(model: chatModel, messages: messages, maxTokens: 16, temperature: 0, seed: 1) {
            streamed += delta
            deltas += 1
        }
        #expect(deltas > 1)
        #expect(!streamed.isEmpty)
        #expect(streamed.hasPrefix(chat.text) || chat.text.hasPrefix(streamed), "streamed \(streamed) vs \(chat.text)")

        let completion = try await client.completion(model: chatModel, prompt: "The capital of France is", maxTokens: 8, temperature: 0)
        let completionText = completion.choices.first?.text ?? ""
        #expect(!completionText.isEmpty)

        // Embeddings through the network are bit-identical to calling the embeddings server directly.
        let body = Harness.json(["model": embeddingModel, "input": ["edge computing", "a decentralized network"]])
        let routed = try await Harness.request(.POST, network.baseURL + "/embeddings", key: network.apiKey, body: body)
        let direct = try await Harness.request(.POST, network.models.embeddingsURL + "/v1/embeddings", body: body)
        #expect(routed.status == 200)
        let routedData = try #require(routed.json?["data"] as? [[String: Any]])
        let directData = try #require(direct.json?["data"] as? [[String: Any]])
        #expect(routedData.count == 2)
        let routedVectors = routedData.map { ($0["embedding"] as? [NSNumber])?.map(\.floatValue) ?? [] }
        let directVectors = directData.map { ($0["embedding"] as? [NSNumber])?.map(\.floatValue) ?? [] }
        #expect(routedVectors.first?.count == 384)
        #expect(routedVectors.map { $0.map(\.bitPattern) } == directVectors.map { $0.map(\.bitPattern) })

        // Every answered request left a signed, countersigned receipt at the router.
        let requestID = try #require(routed.header("x-emc-request-id"))
        try await Harness.eventually(timeout: .seconds(10), "receipt for \(requestID)") {
            try await ReceiptFile(path: network.routerDirectory + "/router.sqlite").requestIDs().contains(requestID)
        }
        let stored = try await ReceiptFile(path: network.routerDirectory + "/router.sqlite").receipts()
        let receipt = try #require(stored.first { String($0.body.sequence) == requestID })
        #expect(receipt.body.app == "embeddings")
        // The operator's key (made with `emc keys api new --data-dir`) is bound to the router's own account.
        #expect(receipt.body.payer == Account(owner: network.routerKey.publicKey))
        #expect(receipt.body.attempt == 0)
        #expect(receipt.body.units.items == 2)
        #expect(receipt.body.responseHash == Hash32.of(routed.body))
        let nodeKey = try #require(network.nodeKeys().first { $0.nodeID == receipt.body.nodeID })
        #expect(throws: Never.self) { try receipt.verify(nodeKey: nodeKey, routerKey: network.routerKey.publicKey) }
        // Honest nodes' receipts (chat, streamed chat, completions, embeddings) all pass the router's checks.
        #expect(try await network.misbehaviourCounts().isEmpty, "\(network.logs)")
    }

    @Test("REST apps are reachable through the pass-through route, with method, path, query and body kept")
    func restPassThrough() async throws {
        let network = try await TestNetwork(name: "rest")
        defer { network.stopAll() }
        try await network.startRouter()
        // The embeddings server doubles as a plain REST app here.
        try await network.startComputeNode(extraApps: [.init(name: "vectors", kind: .rest, baseURL: network.models.embeddingsURL,
                                                       healthPath: "/health")])
        try await network.waitForNodes(1)

        let health = try await Harness.request(.GET, network.baseURL + "/apps/vectors/health?probe=1", key: network.apiKey)
        #expect(health.status == 200)
        #expect(health.json?["status"] as? String == "ok")
        let body = Harness.json(["model": embeddingModel, "input": ["pass", "through"]])
        let routed = try await Harness.request(.POST, network.baseURL + "/apps/vectors/v1/embeddings", key: network.apiKey, body: body)
        let direct = try await Harness.request(.POST, network.models.embeddingsURL + "/v1/embeddings", body: body)
        #expect(routed.status == 200)
        #expect(routed.body == direct.body)
        // The app's root is reachable too (forwarded as "/").
        let root = try await Harness.request(.GET, network.baseURL + "/apps/vectors", key: network.apiKey)
        #expect(root.status == 404)
        #expect((root.json?["error"] as? [String: Any])?["code"] as? String == "unknown_url")
        let missing = try await Harness.request(.GET, network.baseURL + "/apps/nope/x", key: network.apiKey)
        #expect(missing.status == 404)
        #expect((missing.json?["error"] as? [String: Any])?["code"] as? String == "app_not_found")
        let unauthorized = try await Harness.request(.GET, network.baseURL + "/apps/vectors/health")
        #expect(unauthorized.status == 401)
    }

    @Test("errors come back in OpenAI's shape with stable codes")
    func errorShapes() async throws {
        let network = try await TestNetwork(name: "errors")
        defer { network.stopAll() }
        try await network.startRouter()
        try await network.startComputeNode()
        try await network.waitForNodes(1)

        let unauthorized = try await Harness.request(.POST, network.baseURL + "/chat/completions", key: "emc-sk-not-a-key",
                                                     body: chatBody("hi"))
        #expect(unauthorized.status == 401)
        #expect((unauthorized.json?["error"] as? [String: Any])?["code"] as? String == "invalid_api_key")
        let noKey = try await Harness.request(.GET, network.baseURL + "/models")
        #expect(noKey.status == 401)

        let malformed = try await Harness.request(.POST, network.baseURL + "/chat/completions", key: network.apiKey,
                                                  body: Array("{\"model\": ".utf8))
        #expect(malformed.status == 400)
        let malformedError = try #require(malformed.json?["error"] as? [String: Any])
        #expect(malformedError["code"] as? String == "invalid_json")
        #expect(malformedError["type"] as? String == "invalid_request_error")
        #expect(malformedError["message"] is String)

        let unknownModel = try await Harness.request(.POST, network.baseURL + "/chat/completions", key: network.apiKey,
                                                     body: Harness.json(["model": "gpt-17", "messages": [["role": "user", "content": "hi"]]]))
        #expect(unknownModel.status == 404)
        let unknownError = try #require(unknownModel.json?["error"] as? [String: Any])
        #expect(unknownError["code"] as? String == "model_not_found")
        #expect(unknownError["param"] as? String == "model")

        let missingModel = try await Harness.request(.POST, network.baseURL + "/embeddings", key: network.apiKey,
                                                     body: Harness.json(["input": "x"]))
        #expect(missingModel.status == 400)
        #expect((missingModel.json?["error"] as? [String: Any])?["code"] as? String == "missing_parameter")

        // Bodies are capped per route (16 MiB on OpenAI routes): 413 in OpenAI's shape, before any node is bothered.
        let oversized = try await Harness.request(.POST, network.baseURL + "/chat/completions", key: network.apiKey,
                                                  body: [UInt8](repeating: UInt8(ascii: " "), count: (16 << 20) + 1))
        #expect(oversized.status == 413)
        #expect((oversized.json?["error"] as? [String: Any])?["code"] as? String == "request_too_large")
    }

    // Bug caught: the router cached valid keys in clear for ever, so a revoked key kept working until a restart.
    @Test("a key revoked with `emc keys api revoke` is refused by the running router within a second")
    func revocationTakesEffect() async throws {
        let network = try await TestNetwork(name: "revoke")
        defer { network.stopAll() }
        try await network.startRouter()
        let models = network.baseURL + "/models"
        #expect(try await Harness.request(.GET, models, key: network.apiKey).status == 200)
        _ = try TestNetwork.runEMC(["keys", "api", "revoke", network.apiKey, "--data-dir", network.routerDirectory])
        let revokedAt = ContinuousClock.now
        try await Harness.eventually(timeout: .seconds(3), "the revoked key to be refused") {
            try await Harness.request(.GET, models, key: network.apiKey, timeout: .seconds(2)).status == 401
        }
        #expect(ContinuousClock.now - revokedAt < .milliseconds(1500))
    }

    // Bugs caught: a router that charged the router's (or anyone's) account for a key an account bound; answers
    // without x-emc-request-id, or with one that is not the receipt's sequence number; a router storing a binding
    // signed by another key, naming another router, or malformed.
    @Test("a key bound remotely by an account (emc keys api new --router) bills that account; every answer names its sequence")
    func boundKeysAndRequestIDs() async throws {
        let network = try await TestNetwork(name: "bound-keys")
        defer { network.stopAll() }
        try await network.startRouter()
        try await network.startComputeNode()
        try await network.waitForNodes(1)
        let routerURL = "http://127.0.0.1:\(network.httpPort)"
        let keys = { try CLIRun.emc(["keys", "api", "list", "--data-dir", network.routerDirectory, "--json"]).array }
        let before = try keys().count

        // Refused bindings store nothing: signed by another key, naming another router, malformed.
        let owner = SigningKey()
        let ownerFile = network.root + "/owner.key"
        try KeyFile.write(owner, to: ownerFile)
        func post(_ object: [String: Any]) async throws -> Harness.HTTPResult {
            try await Harness.request(.POST, routerURL + "/v1/keys", body: Harness.json(object), timeout: .seconds(10))
        }
        func binding(router: PublicKey) -> APIKeyBinding {
            APIKeyBinding(router: router, account: Account(owner: owner.publicKey), keyHash: APIKeyBinding.hash(ofSecret: APIKeyBinding.newSecret()),
                          spendLimitPerEpoch: 1, createdAtMillis: 1)
        }
        let forged = SignedAPIKeyBinding(signing: binding(router: network.routerKey.publicKey), with: SigningKey())
        let elsewhere = SignedAPIKeyBinding(signing: binding(router: SigningKey().publicKey), with: owner)
        let cases: [(String, [String: Any])] = [
            ("bad_signature", ["binding": Hex.encode(forged.bytes), "signature": Hex.encode(forged.signature)]),
            ("wrong_router", ["binding": Hex.encode(elsewhere.bytes), "signature": Hex.encode(elsewhere.signature)]),
            ("invalid_binding", ["binding": Hex.encode(forged.bytes.dropLast()), "signature": Hex.encode(forged.signature)]),
            ("invalid_binding", ["binding": "zz", "signature": Hex.encode(forged.signature)]),
            ("invalid_binding", ["binding": 12, "signature": "00"]),
            ("missing_parameter", ["binding": Hex.encode(forged.bytes)]),
        ]
        for (code, object) in cases {
            let refused = try await post(object)
            #expect(refused.status == 400, "\(code): \(refused.text)")
            #expect((refused.json?["error"] as? [String: Any])?["code"] as? String == code, "\(refused.text)")
        }
        let notJSON = try await Harness.request(.POST, routerURL + "/v1/keys", body: Array("binding=1".utf8))
        #expect(notJSON.status == 400)
        #expect(try keys().count == before, "a refused binding was stored")

        // The account binds a key remotely, through the CLI; the router stores the hash, never the secret.
        let run = try CLIRun.emc(["keys", "api", "new", "--account", ownerFile, "--router", network.baseURL, "--spend-limit", "2.5",
                                  "--label", "remote"])
        #expect(run.status == 0, "\(run)")
        let secret = run.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(secret.hasPrefix("emc-sk-"))
        let listed = try keys()
        let entry = try #require(listed.first { $0["label"] as? String == "remote" })
        #expect(entry["account"] as? String == Account(owner: owner.publicKey).description)
        #expect(entry["spend_limit_per_epoch"] as? String == "2.50000000")
        #expect(!String(describing: listed).contains(secret))
        // The same signed binding again changes nothing.
        let replay = SignedAPIKeyBinding(signing: binding(router: network.routerKey.publicKey), with: owner)
        let replayBody: [String: Any] = ["binding": Hex.encode(replay.bytes), "signature": Hex.encode(replay.signature)]
        #expect(try await post(replayBody).status == 201)
        #expect(try await post(replayBody).status == 409)

        // The router charges an account only from its escrow with this router on chain: none yet, so 402
        // insufficient_quota and no sequence number; once the escrow is open (and the router has read the block that
        // opened it), the same key is served.
        try await RegistryChain.shared.enrollRouter(network.routerKey, tunnelAddress: "127.0.0.1:\(network.tunnelPort)")
        let noEscrow = try await Harness.request(.POST, network.baseURL + "/embeddings", key: secret,
                                                 body: Harness.json(["model": embeddingModel, "input": "no escrow"]))
        #expect(noEscrow.status == 402, "\(noEscrow.text)")
        #expect((noEscrow.json?["error"] as? [String: Any])?["code"] as? String == "insufficient_quota", "\(noEscrow.text)")
        #expect(noEscrow.header("x-emc-request-id") == nil)
        try await RegistryChain.shared.fundEscrow(owner, router: network.routerKey.publicKey, amount: Amount(emc: 5))
        try await Harness.eventually(timeout: .seconds(15), "the router reading the new escrow") {
            try await Harness.request(.POST, network.baseURL + "/embeddings", key: secret,
                                      body: Harness.json(["model": embeddingModel, "input": "escrow open"])).status == 200
        }

        // Every answer on a work route names its sequence number: success, stream, and errors after acceptance.
        var sequences = [UInt64]()
        let embedded = try await Harness.request(.POST, network.baseURL + "/embeddings", key: secret,
                                                 body: Harness.json(["model": embeddingModel, "input": "bound"]))
        #expect(embedded.status == 200)
        let streamed = try await Harness.request(.POST, network.baseURL + "/chat/completions", key: secret, body: chatBody("hi", maxTokens: 4, stream: true))
        #expect(streamed.status == 200)
        #expect(streamed.text.contains("data: "))
        let unknown = try await Harness.request(.POST, network.baseURL + "/chat/completions", key: secret,
                                                body: Harness.json(["model": "gpt-17", "messages": [["role": "user", "content": "x"]]]))
        #expect(unknown.status == 404)
        let malformed = try await Harness.request(.POST, network.baseURL + "/embeddings", key: secret, body: Array("{".utf8))
        #expect(malformed.status == 400)
        for answer in [embedded, streamed, unknown, malformed] {
            let header = try #require(answer.header("x-emc-request-id"), "no x-emc-request-id on \(answer.status): \(answer.text.prefix(200))")
            sequences.append(try #require(UInt64(header)))
        }
        // Contiguous: each accepted request took the next number.
        #expect(sequences == Array(sequences[0]...(sequences[0] + 3)), "\(sequences)")
        // No sequence for a request that was never accepted.
        let unauthenticated = try await Harness.request(.POST, network.baseURL + "/embeddings", key: "emc-sk-nope", body: Array("{}".utf8))
        #expect(unauthenticated.status == 401)
        #expect(unauthenticated.header("x-emc-request-id") == nil)

        // The receipts of the served requests carry the binding's account and the answer's sequence.
        let database = network.routerDirectory + "/router.sqlite"
        try await Harness.eventually(timeout: .seconds(10), "receipts for the bound key's requests") {
            Set(try await ReceiptFile(path: database).requestIDs()).isSuperset(of: [String(sequences[0]), String(sequences[1])])
        }
        let receipts = try await ReceiptFile(path: database).receipts().filter { sequences.prefix(2).contains($0.body.sequence) }
        #expect(receipts.count == 2)
        for receipt in receipts {
            #expect(receipt.body.payer == Account(owner: owner.publicKey))
            #expect(throws: Never.self) { try receipt.verify() }
        }
        #expect(receipts.first { $0.body.sequence == sequences[0] }?.body.responseHash == Hash32.of(embedded.body))
        #expect(try await network.misbehaviourCounts().isEmpty, "\(network.logs)")

        // A key whose spend limit is used up gets 402 insufficient_quota in OpenAI's shape (not 429, which clients
        // retry), and no sequence number: nothing was accepted.
        let broke = try CLIRun.emc(["keys", "api", "new", "--data-dir", network.routerDirectory, "--account", ownerFile, "--spend-limit", "0"])
        #expect(broke.status == 0, "\(broke)")
        let refused = try await Harness.request(.POST, network.baseURL + "/embeddings", key: broke.stdout.trimmingCharacters(in: .whitespacesAndNewlines),
                                                body: Harness.json(["model": embeddingModel, "input": "no budget"]))
        #expect(refused.status == 402, "\(refused.text)")
        #expect((refused.json?["error"] as? [String: Any])?["code"] as? String == "insufficient_quota", "\(refused.text)")
        #expect(refused.header("x-emc-request-id") == nil)
    }

    @Test("killing a compute node mid-load: requests that had not started answering fail over; later requests succeed")
    func failover() async throws {
        let network = try await TestNetwork(name: "failover")
        defer { network.stopAll() }
        try await network.startRouter()
        let first = try await network.startComputeNode(maxConcurrent: 4)
        try await network.startComputeNode(maxConcurrent: 4)
        try await network.waitForNodes(2)

        // Non-streaming answers start only when generation is done, so every in-flight request on the killed
        // node is one that had not started answering: each must be retried on the survivor and succeed.
        let statuses = try await withThrowingTaskGroup(of: Int.self) { group in
            for i in 0..<8 {
                group.addTask {
                    try await Harness.request(.POST, network.baseURL + "/chat/completions", key: network.apiKey,
                                              body: chatBody("Count to \(i + 3).", maxTokens: 24)).status
                }
            }
            try await Task.sleep(for: .milliseconds(600))
            first.kill9()
            var statuses = [Int]()
            for try await status in group { statuses.append(status) }
            return statuses
        }
        #expect(statuses == Array(repeating: 200, count: 8), "\(network.logs)")

        try await Harness.eventually(timeout: .seconds(10), "router to drop the killed node") {
            try await network.connectedNodes().count == 1
        }
        for i in 0..<4 {
            let later = try await Harness.request(.POST, network.baseURL + "/chat/completions", key: network.apiKey,
                                                  body: chatBody("Say \(i).", maxTokens: 4))
            #expect(later.status == 200)
        }
        let metrics = try await Harness.request(.GET, "http://127.0.0.1:\(network.httpPort)/metrics")
        #expect(metrics.text.contains("emc_router_requests_total"))
        #expect(metrics.text.contains("emc_router_request_duration_seconds"))
        #expect(metrics.text.contains("emc_router_node_inflight"))
        // The kill really did force failovers (at least one request was in flight on the killed node).
        let failovers = metrics.text.split(separator: "\n").first { $0.hasPrefix("emc_router_failovers_total ") }
            .flatMap { Double($0.split(separator: " ").last ?? "") } ?? 0
        #expect(failovers >= 1, "\(metrics.text)")
        // A failed-over request is receipted by the node that served it, as a later attempt of the same sequence.
        try await Harness.eventually(timeout: .seconds(10), "a receipt of a failed-over attempt") {
            try await ReceiptFile(path: network.routerDirectory + "/router.sqlite").receipts().contains { $0.body.attempt >= 1 }
        }
        let keys = try await ReceiptFile(path: network.routerDirectory + "/router.sqlite").receipts().map { "\($0.body.sequence).\($0.body.attempt)" }
        #expect(keys.count == Set(keys).count, "two receipts for one (sequence, attempt)")
    }

    @Test("a compute node dying mid-stream ends the SSE stream with a clear error event")
    func midStreamDisconnect() async throws {
        let network = try await TestNetwork(name: "midstream")
        defer { network.stopAll() }
        try await network.startRouter()
        try await network.startComputeNode()
        try await network.startComputeNode()
        try await network.waitForNodes(2)
        let keys = try network.nodeKeys()

        var request = HTTPClientRequest(url: network.baseURL + "/completions")
        request.method = .POST
        request.headers.add(name: "authorization", value: "Bearer \(network.apiKey)")
        request.headers.add(name: "content-type", value: "application/json")
        request.body = .bytes(ByteBuffer(bytes: Harness.json([
            "model": chatModel, "prompt": "Chapter one. The sea was", "max_tokens": 400, "temperature": 0, "stream": true,
        ])))
        let response = try await Harness.http.execute(request, timeout: .seconds(120))
        #expect(response.status == .ok)
        let serving = try #require(response.headers.first(name: "x-emc-node"))
        let index = try #require(keys.firstIndex { $0.nodeID.description == serving })
        var received = [UInt8]()
        var killed = false
        for try await chunk in response.body {
            received += Array(buffer: chunk)
            // Kill the serving node once the answer has visibly begun (a few events in).
            if !killed, String(decoding: received, as: UTF8.self).components(separatedBy: "data: ").count > 4 {
                network.computeNodes[index].kill9()
                killed = true
            }
        }
        let text = String(decoding: received, as: UTF8.self)
        #expect(killed, "\(text)")
        #expect(!text.contains("[DONE]"), "\(text)")
        let lastEvent = try #require(text.components(separatedBy: "\n\n").last { $0.hasPrefix("data: ") })
        let error = try #require((try JSONSerialization.jsonObject(with: Data(lastEvent.dropFirst(6).utf8)) as? [String: Any])?["error"] as? [String: Any])
        #expect(error["code"] as? String == "node_disconnected")
        #expect(error["type"] as? String == "server_error")
    }

    @Test("router kill -9 with receipts in flight: no receipt the node saw acknowledged is lost, and every unacknowledged one is re-delivered")
    func receiptsSurviveRouterCrash() async throws {
        let network = try await TestNetwork(name: "crash")
        defer { network.stopAll() }
        try await network.startRouter()
        // Debug logging makes the node print what it signed and what the router acknowledged: the node's own record.
        let node = try await network.startComputeNode(maxConcurrent: 4, environment: ["LOG_LEVEL": "debug"])
        try await network.waitForNodes(1)
        let database = network.routerDirectory + "/router.sqlite"

        // Some receipts are acknowledged before the crash...
        for i in 0..<2 {
            let result = try await Harness.request(.POST, network.baseURL + "/embeddings", key: network.apiKey,
                                                   body: Harness.json(["model": embeddingModel, "input": "sentence \(i)"]))
            #expect(result.status == 200)
        }
        try await Harness.eventually(timeout: .seconds(10), "the node to see 2 receipts acknowledged") {
            node.requestIDs(logged: "receipt acknowledged").count == 2
        }
        // ...and some are in flight: freeze the router while the node is generating, so the node signs receipts
        // that the router cannot acknowledge, then kill it.
        let router = try #require(network.router)
        let requests = (0..<4).map { i in
            Task { try? await Harness.request(.POST, network.baseURL + "/chat/completions", key: network.apiKey,
                                              body: chatBody("Count to \(i + 5).", maxTokens: 12), timeout: .seconds(120)) }
        }
        try await Harness.eventually(timeout: .seconds(30), "the node to be assigned the chat requests") {
            node.requestIDs(logged: "request assigned").count >= 2 + 3
        }
        kill(router.pid, SIGSTOP)
        let assigned = node.requestIDs(logged: "request assigned")
        try await Harness.eventually(timeout: .seconds(90), "the node to sign a receipt for every assigned request") {
            node.requestIDs(logged: "receipt signed").isSuperset(of: assigned)
        }
        let signed = node.requestIDs(logged: "receipt signed")
        let acknowledged = node.requestIDs(logged: "receipt acknowledged")
        router.kill9()
        for request in requests { request.cancel() }
        #expect(acknowledged.count >= 2)
        #expect(signed.subtracting(acknowledged).count >= 3, "receipts must really be in flight at the kill")

        // What the node saw acknowledged was durable before the acknowledgement.
        #expect(Set(try await ReceiptFile(path: database).requestIDs()).isSuperset(of: acknowledged))
        try await network.startRouter()
        try await network.waitForNodes(1)
        // The rest arrive by re-delivery on the new control stream, are stored once each and acknowledged.
        try await Harness.eventually(timeout: .seconds(20), "every signed receipt stored after the restart") {
            Set(try await ReceiptFile(path: database).requestIDs()).isSuperset(of: signed)
        }
        try await Harness.eventually(timeout: .seconds(10), "the node to see every receipt acknowledged") {
            node.requestIDs(logged: "receipt acknowledged").isSuperset(of: signed)
        }
        #expect(node.log.contains("re-delivering unacknowledged receipts"))
        #expect(try await network.misbehaviourCounts().isEmpty, "an honest re-delivery was refused\n\(network.logs)")
        let stored = try await ReceiptFile(path: database).requestIDs()
        #expect(stored.count == Set(stored).count, "a receipt was stored twice")

        let after = try await Harness.request(.POST, network.baseURL + "/embeddings", key: network.apiKey,
                                              body: Harness.json(["model": embeddingModel, "input": "after the crash"]))
        #expect(after.status == 200)
        let afterID = try #require(after.header("x-emc-request-id"))
        try await Harness.eventually(timeout: .seconds(10), "receipt after restart") {
            try await ReceiptFile(path: database).requestIDs().contains(afterID)
        }
    }

    // Bug caught: a receipt the router can never accept was re-sent after every reconnect, and each time the
    // router dropped the node for it, so the node could never serve that router again.
    @Test("a router that lost its assignment records refuses re-delivered receipts by id; the node drops them and serves again")
    func routerLostItsRecords() async throws {
        let network = try await TestNetwork(name: "lost-records")
        defer { network.stopAll() }
        try await network.startRouter()
        let node = try await network.startComputeNode(maxConcurrent: 4, environment: ["LOG_LEVEL": "debug"])
        try await network.waitForNodes(1)
        let router = try #require(network.router)
        let requests = (0..<3).map { i in
            Task { try? await Harness.request(.POST, network.baseURL + "/chat/completions", key: network.apiKey,
                                              body: chatBody("Count to \(i + 5).", maxTokens: 12), timeout: .seconds(120)) }
        }
        try await Harness.eventually(timeout: .seconds(30), "the node to be assigned the chat requests") {
            node.requestIDs(logged: "request assigned").count >= 3
        }
        kill(router.pid, SIGSTOP)
        let assigned = node.requestIDs(logged: "request assigned")
        try await Harness.eventually(timeout: .seconds(90), "the node to sign their receipts") {
            node.requestIDs(logged: "receipt signed").isSuperset(of: assigned)
        }
        router.kill9()
        for request in requests { request.cancel() }
        // The router comes back without its assignment records (restored from an old backup, say).
        let python = Process()
        python.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        python.arguments = ["python3", "-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('DELETE FROM assignment'); c.commit()",
                            network.routerDirectory + "/router.sqlite"]
        try python.run()
        python.waitUntilExit()
        #expect(python.terminationStatus == 0)
        try await network.startRouter()

        // The node redials with backoff (up to 10 s) after the router died: allow a loaded machine some room.
        try await Harness.eventually(timeout: .seconds(90), "the node to drop the refused receipts") {
            node.log.contains("router refused a receipt; dropped it")
        }
        // After the misbehaviour cooldown the node registers again, re-sends nothing, and serves.
        try await Harness.eventually(timeout: .seconds(60), "the node to serve again") {
            try await Harness.request(.POST, network.baseURL + "/embeddings", key: network.apiKey,
                                      body: Harness.json(["model": embeddingModel, "input": "back"]), timeout: .seconds(10)).status == 200
        }
        let stored = Set(try await ReceiptFile(path: network.routerDirectory + "/router.sqlite").requestIDs())
        #expect(stored.isDisjoint(with: assigned.subtracting(node.requestIDs(logged: "receipt acknowledged"))))
    }

    @Test("the official openai Python package works against the router, streaming and not")
    func officialOpenAIClient() async throws {
        let network = try await TestNetwork(name: "openai-py")
        defer { network.stopAll() }
        try await network.startRouter()
        try await network.startComputeNode()
        try await network.waitForNodes(1)

        let process = Process()
        process.executableURL = URL(fileURLWithPath: Harness.python)
        process.arguments = [Harness.packageRoot + "/Tests/python/openai_client_check.py", "--check-request-ids"]
        process.environment = ProcessInfo.processInfo.environment.merging(
            ["OPENAI_BASE_URL": network.baseURL, "OPENAI_API_KEY": network.apiKey]) { $1 }
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(process.terminationStatus == 0, "openai client check failed:\n\(output)\n\(network.logs)")
    }
}

}

extension TestProcess {
    /// How many log lines carry `message` (sequence numbers are per router, so with two routers ids repeat).
    func count(logged message: String) -> Int {
        log.split(separator: "\n").filter { $0.contains(message) }.count
    }

    /// Request ids on this process's log lines that carry `message` (swift-log prints metadata as `request=...`).
    func requestIDs(logged message: String) -> Set<String> {
        Set(log.split(separator: "\n").filter { $0.contains(message) }.compactMap { line -> String? in
            guard let start = line.range(of: "request=")?.upperBound else { return nil }
            return String(line[start...].prefix { !$0.isWhitespace })
        })
    }
}

extension TestNetwork {
    func nodeKeys() throws -> [PublicKey] {
        try (1...computeNodes.count).map { try KeyFile.read(from: root + "/compute-\($0)/node.key").publicKey }
    }
}

/// Reads the router's receipts from its SQLite file through the router's own store, from outside the router
/// process (as an auditor or a restarted router would).
struct ReceiptFile {
    let store: ReceiptStore

    init(path: String) throws { store = ReceiptStore(database: try RouterDatabase(path: path)) }

    func receipts() async throws -> [Receipt] { try await store.list(limit: 100_000).map(\.receipt) }

    /// The router sequence numbers of the stored receipts, as text (what `x-emc-request-id` and the node's logs show).
    func requestIDs() async throws -> [String] { try await receipts().map { String($0.body.sequence) } }
}
