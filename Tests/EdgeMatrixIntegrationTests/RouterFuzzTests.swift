import EdgeMatrixCore
import Foundation
import NIOHTTP1
import Testing

extension Integration {
    @Suite("Router HTTP API under random JSON", .serialized)
    struct RouterFuzzTests {
        /// A random JSON value from `random`, nested at most `depth` deep: the shapes clients get wrong.
        static func value(_ random: inout SeededRandom, depth: Int) -> Any {
            switch random.next() % (depth > 0 ? 9 : 6) {
            case 0: return NSNull()
            case 1: return random.next() % 2 == 0
            case 2: return Int64(bitPattern: random.next())
            case 3: return [0, -1, Int64.max, Int64.min, 1 << 53, 4096][Int(random.next() % 6)]
            case 4: return Double(Int64(bitPattern: random.next())) / 7
            case 5: return String(decoding: random.bytes(Int(random.next() % 40)).map { $0 % 95 + 32 }, as: UTF8.self)
            case 6: return (0..<Int(random.next() % 4)).map { _ in value(&random, depth: depth - 1) }
            default:
                let keys = ["model", "messages", "prompt", "input", "stream", "max_tokens", "temperature", "role", "content", "n", "x",
                            "binding", "signature", "label"]
                var object = [String: Any]()
                for _ in 0..<Int(random.next() % 6) { object[keys[Int(random.next() % UInt64(keys.count))]] = value(&random, depth: depth - 1) }
                return object
            }
        }

        // Bug caught: a shape of JSON that reaches a trap or an unhandled error path in the gateway (a 500, or a
        // dead router), or that changes what the router serves afterwards.
        @Test("seeded random JSON at every route: no 500, the router lives, and it serves the same afterwards")
        func randomJSON() async throws {
            let network = try await TestNetwork(name: "router-fuzz")
            defer { network.stopAll() }
            try await network.startRouter()
            try await network.startComputeNode()
            try await network.waitForNodes(1)
            let modelsBefore = try await Harness.request(.GET, network.baseURL + "/models", key: network.apiKey).text
            var random = SeededRandom(seed: 0xF022)
            let routes: [(HTTPMethod, String)] = [(.POST, "/chat/completions"), (.POST, "/completions"), (.POST, "/embeddings"),
                                                  (.GET, "/models"), (.GET, "/network/nodes"), (.POST, "/apps/none/x"),
                                                  (.POST, "/no/such/route"), (.POST, "/keys")]
            var statuses = [Int: Int]()
            for i in 0..<240 {
                let (method, path) = routes[i % routes.count]
                var body: [UInt8]
                if i % 5 == 0 {
                    body = random.bytes(Int(random.next() % 200))  // not JSON at all
                } else {
                    var object = (Self.value(&random, depth: 3) as? [String: Any]) ?? [:]
                    // Often a real model, so that the request gets past model lookup to the node and back.
                    if i % 3 == 0 { object["model"] = path == "/embeddings" ? "all-minilm-l6-v2" : "smollm2-135m-instruct" }
                    if object["max_tokens"] != nil, i % 3 == 0 { object["max_tokens"] = 4 }
                    body = (try? JSONSerialization.data(withJSONObject: object)).map(Array.init) ?? []
                }
                let key: String? = i % 11 == 0 ? "emc-sk-" + Hex.encode(random.bytes(8)) : network.apiKey
                let result = try await Harness.request(method, network.baseURL + path, key: key, body: method == .POST ? body : nil,
                                                       timeout: .seconds(60))
                statuses[result.status, default: 0] += 1
                // An answer a node relayed from its app carries x-emc-node and is the app's own (llama.cpp answers
                // some bad requests with 500 and `code: null`); everything the router answers itself must be a
                // 4xx/5xx in OpenAI's shape with a stable code, and never a 500.
                let relayed = result.headers.contains { $0.0.lowercased() == "x-emc-node" }
                if !relayed {
                    #expect(result.status != 500, "\(method) \(path) with \(String(decoding: body.prefix(300), as: UTF8.self)): \(result.text.prefix(300))")
                    if result.status >= 400 {
                        #expect((result.json?["error"] as? [String: Any])?["code"] is String, "\(path): \(result.text.prefix(300))")
                    }
                }
            }
            #expect(statuses.keys.contains { $0 < 300 }, "some requests must have been served: \(statuses)")
            #expect(try await Harness.request(.GET, "http://127.0.0.1:\(network.httpPort)/health").status == 200)
            // The same models once the node's health probes see its apps idle again (a busy app can miss a probe).
            try await Harness.eventually(timeout: .seconds(60), "the router lists the same models as before") {
                try await Harness.request(.GET, network.baseURL + "/models", key: network.apiKey).text == modelsBefore
            }
            #expect(try await network.connectedNodes().count == 1, "the honest node is still there")
            // Random bodies at POST /v1/keys bound no key: only the test's own key exists.
            let keys = try CLIRun.emc(["keys", "api", "list", "--data-dir", network.routerDirectory, "--json"])
            #expect(keys.array.count == 1, "\(keys)")
        }
    }
}
