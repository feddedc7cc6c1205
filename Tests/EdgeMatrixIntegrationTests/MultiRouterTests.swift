import EdgeMatrixCompute
import EdgeMatrixCore
import Foundation
import Testing

extension Integration {
@Suite("One compute node, two routers", .serialized)
struct MultiRouterTests {
    /// Starts a compute node that dials both routers (each pinned to its own key).
    func startNode(routers: [TestNetwork], in root: String) async throws -> TestProcess {
        let directory = root + "/compute-multi"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        try await routers[0].enroll(try KeyFile.loadOrCreate(at: directory + "/node.key"))  // both routers follow one chain
        let models = routers[0].models
        let config = ComputeConfiguration(
            routers: routers.map { .init(address: "127.0.0.1:\($0.tunnelPort)", key: $0.routerKey.publicKey) },
            maxConcurrent: 4,
            apps: [
                .init(name: "llm", kind: .openai, baseURL: models.chatURL, models: ["smollm2-135m-instruct"]),
                .init(name: "embeddings", kind: .openai, baseURL: models.embeddingsURL, models: ["all-minilm-l6-v2"]),
            ],
            probeIntervalSeconds: 1)
        try JSONEncoder().encode(config).write(to: URL(fileURLWithPath: directory + "/config.json"))
        return try TestProcess(name: "compute-multi", executable: Harness.emcBinary, arguments: [
            "node", "--role", "compute", "--config", directory + "/config.json", "--data-dir", directory,
        ], logDirectory: root, environment: ["LOG_LEVEL": "debug"])
    }

    func embed(_ network: TestNetwork, _ text: String) async throws -> Int {
        try await Harness.request(.POST, network.baseURL + "/embeddings", key: network.apiKey,
                                  body: Harness.json(["model": "all-minilm-l6-v2", "input": text]), timeout: .seconds(30)).status
    }

    // Bug caught: the node re-delivered every unacknowledged receipt to every router it reconnected to, so a
    // router refused another router's receipt and dropped the honest node as misbehaving.
    @Test("receipts for one router are never sent to another; with one router gone for good the node serves through the other")
    func receiptsStayWithTheirRouter() async throws {
        let a = try await TestNetwork(name: "router-a")
        let b = try await TestNetwork(name: "router-b")
        defer {
            a.stopAll()
            b.stopAll()
        }
        try await a.startRouter()
        try await b.startRouter()
        let node = try await startNode(routers: [a, b], in: a.root)
        defer { node.terminate() }
        try await Harness.eventually(timeout: .seconds(60), "the node registered with both routers") {
            let onA = try await a.connectedNodes().count
            let onB = try await b.connectedNodes().count
            return onA == 1 && onB == 1
        }
        #expect(try await embed(a, "to a") == 200)

        // Leave receipts for router B unacknowledged in the node's outbox: freeze B while the node answers it.
        let routerB = try #require(b.router)
        // Counted in log lines: sequence numbers are per router, so A's and B's requests share numbers.
        let before = node.count(logged: "request assigned")
        // Chat answers take long enough to freeze B before their receipts are acknowledged.
        let requests = (0..<3).map { i in
            Task {
                try? await Harness.request(.POST, b.baseURL + "/chat/completions", key: b.apiKey, body: Harness.json([
                    "model": "smollm2-135m-instruct", "messages": [["role": "user", "content": "Count to \(i + 5)."]],
                    "max_tokens": 12, "temperature": 0,
                ]), timeout: .seconds(120))
            }
        }
        try await Harness.eventually(timeout: .seconds(30), "the node to be assigned B's requests") {
            node.count(logged: "request assigned") >= before + 3
        }
        kill(routerB.pid, SIGSTOP)
        let assigned = node.requestIDs(logged: "request assigned")
        try await Harness.eventually(timeout: .seconds(90), "receipts signed for B's requests") {
            node.requestIDs(logged: "receipt signed").isSuperset(of: assigned)
        }
        let pendingForB = node.requestIDs(logged: "receipt signed").subtracting(node.requestIDs(logged: "receipt acknowledged"))
        #expect(!pendingForB.isEmpty, "no receipt for B was left unacknowledged")

        // Router A restarts: the node re-registers and re-delivers what it owes A, and nothing of B's.
        try #require(a.router).kill9()
        try await a.startRouter()
        try await Harness.eventually(timeout: .seconds(30), "the node back on router A") { try await a.connectedNodes().count == 1 }
        #expect(try await embed(a, "after A's restart") == 200)
        #expect(try await a.misbehaviourCounts().isEmpty, "router A refused a receipt meant for B:\n\(a.logs)\n\(node.log.suffix(3000))")
        let storedAtA = try await ReceiptFile(path: a.routerDirectory + "/router.sqlite").receipts()
        #expect(storedAtA.allSatisfy { $0.body.routerID == a.routerKey.nodeID })

        // B is gone for good: the node keeps serving through A.
        routerB.kill9()
        for request in requests { request.cancel() }
        for i in 0..<3 { #expect(try await embed(a, "B is gone \(i)") == 200) }
        #expect(try await a.connectedNodes().count == 1)
    }
}
}
