import AsyncHTTPClient
import EdgeMatrixCompute
import EdgeMatrixCore
import EdgeMatrixNetwork
import EdgeMatrixRouter
import EdgeMatrixStore
import Foundation
import Logging
import NIOCore
import ServiceLifecycle
import Testing

/// The real router and compute node, in process over real TCP and TLS, with a canned app: what a receipt says
/// about payer, prices and units, from the key's binding, the price book and the bytes relayed.
@Suite("Receipt terms, router and compute node in process", .serialized)
struct ReceiptTermsTests {
    /// An app that answers one fixed body and reports whatever usage that body claims.
    struct CannedApp: LocalApp {
        let name = "llm"
        let kind = AppDescriptor.Kind.openai
        let answer: [UInt8]
        func probe() async -> AppProbe { AppProbe(healthy: true, models: ["m"], detail: "canned") }
        func send(_ request: WorkRequest) async throws -> LocalAnswer {
            LocalAnswer(status: 200, contentType: "application/json", body: .bytes(ByteBuffer(bytes: answer)))
        }
        var metersAnswerBytes: Bool { true }
        func meter(_ request: WorkRequest, answer: [UInt8], isSSE: Bool) -> WorkUnits { UsageMeter.openAI(answer: answer, isSSE: isSSE) }
    }

    // Bugs caught: the price book's prices not reaching the assignment and the node's receipt (settled at zero, or
    // at whatever the node likes); a node signing the app's reported usage as it is (the router then refuses the
    // honest node's receipt); a receipt billing someone other than the key's bound account.
    @Test("the receipt names the bound account, the price book's prices and units clamped to the relayed bytes")
    func termsReachTheReceipt() async throws {
        let routerKey = SigningKey(), nodeKey = SigningKey(), owner = SigningKey()
        let prices = UnitPrices(perMillionPromptTokens: 2_000_000, perMillionCompletionTokens: 5_000_000, perItem: 0)
        let directory = Harness.temporaryDirectory("receipt-terms")
        let quiet = Logger(label: "test") { _ in SwiftLogNoOpLogHandler() }
        let admission = RegisteredNodes()
        admission.update([nodeKey.publicKey], height: 1)
        let configuration = RouterConfiguration(httpHost: "127.0.0.1", httpPort: 0, tunnelHost: "127.0.0.1",
                                                tunnelPort: Harness.freePort(), dataDirectory: directory)
        let secret = try APIKeyStore(database: RouterDatabase(path: configuration.databasePath))
            .create(label: "owner", router: routerKey.publicKey, signer: owner)
        let (ready, readySink) = AsyncStream<RouterEndpoints>.makeStream()
        let router = try RouterService(configuration: configuration, key: routerKey, admission: admission,
                                       priceBook: FixedPriceBook(prices), metricsText: { [] }, logger: quiet) { readySink.yield($0) }
        // The app claims a million tokens each way in a body of under 200 bytes.
        let answer = Array(#"{"object":"chat.completion","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":1000000,"completion_tokens":1000000}}"#.utf8)
        let node = ComputeNode(configuration: ComputeConfiguration(routers: [.init(address: "127.0.0.1:\(configuration.tunnelPort)",
                                                                                   key: routerKey.publicKey)],
                                                                   maxConcurrent: 2, apps: [], probeIntervalSeconds: 1),
                               key: nodeKey, apps: [CannedApp(answer: answer)],
                               hardware: HardwareInfo(cpuCores: 1, memoryMiB: 1, gpus: []), logger: quiet)
        let group = ServiceGroup(services: [router, node], logger: quiet)
        let running = Task { try await group.run() }
        defer { running.cancel() }

        var endpoints = ready.makeAsyncIterator()
        let httpPort = try #require(await endpoints.next()).httpPort
        let base = "http://127.0.0.1:\(httpPort)/v1"
        try await Harness.eventually(timeout: .seconds(20), "the node serving model m") {
            try await Harness.request(.GET, base + "/models", key: secret, timeout: .seconds(2)).text.contains("\"m\"")
        }
        let body = Harness.json(["model": "m", "messages": [["role": "user", "content": "hi"]]])
        let result = try await Harness.request(.POST, base + "/chat/completions", key: secret, body: body, timeout: .seconds(20))
        #expect(result.status == 200, "\(result.text)")
        #expect(result.body == answer)
        let sequence = try #require(result.header("x-emc-request-id").flatMap { UInt64($0) })

        let store = ReceiptStore(database: try RouterDatabase(path: configuration.databasePath))
        var stored: Receipt?
        try await Harness.eventually(timeout: .seconds(10), "the receipt stored") {
            stored = try await store.list().first { $0.receipt.body.sequence == sequence }?.receipt
            return stored != nil
        }
        let receipt = try #require(stored)
        #expect(receipt.body.payer == Account(owner: owner.publicKey))
        #expect(receipt.body.prices == prices)
        #expect(receipt.body.attempt == 0)
        // The request named no completion limit, so the router forwarded it with `"max_tokens":4096` appended.
        let forwardedBytes = body.count + #","max_tokens":4096"#.utf8.count
        #expect(receipt.body.units == WorkUnits(promptTokens: UInt64(forwardedBytes) + BilledUnits.promptTemplateAllowance,
                                                completionTokens: UInt64(answer.count), items: 0))
        #expect(receipt.body.cost == prices.cost(of: receipt.body.units))
        #expect(throws: Never.self) { try receipt.verify(nodeKey: nodeKey.publicKey, routerKey: routerKey.publicKey) }
        await group.triggerGracefulShutdown()
        _ = await running.result
    }
}
