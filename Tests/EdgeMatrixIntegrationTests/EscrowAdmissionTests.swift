import AsyncHTTPClient
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixStore
import Foundation
import Testing

extension Integration {
/// Router admission with real `emc` processes, a real model and the test chain (docs/SETTLEMENT.md § 8): a payer's
/// concurrent requests never spend more than its escrow, and `X-EMC-Max-Price` keeps requests off dearer nodes.
@Suite("Router admission, end to end", .serialized)
struct EscrowAdmissionTests {
    let chatModel = "smollm2-135m-instruct"

    func chatBody(_ prompt: String, maxTokens: Int) -> [UInt8] {
        Harness.json(["model": chatModel, "messages": [["role": "user", "content": prompt]], "max_tokens": maxTokens,
                      "temperature": 0, "seed": 1])
    }

    static func code(_ result: Harness.HTTPResult) -> String? { (result.json?["error"] as? [String: Any])?["code"] as? String }

    // Bug caught: admission checked only `unsettled < available`, so a burst of concurrent requests all passed while
    // nothing was unsettled yet, and their receipts together cost more than the escrow holds (a loss no settlement
    // can collect).
    @Test("64 parallel requests against a small escrow: some get 402, and the stored receipts never cost more than the escrow")
    func parallelRequestsNeverOverspend() async throws {
        let network = try await TestNetwork(name: "admission-escrow")
        defer { network.stopAll() }
        try await network.startRouter()
        try await RegistryChain.shared.enrollRouter(network.routerKey, tunnelAddress: "127.0.0.1:\(network.tunnelPort)")
        try await network.startComputeNode(maxConcurrent: 4)
        try await network.waitForNodes(1)
        let node = try KeyFile.loadOrCreate(at: network.root + "/compute-1/node.key")
        // 1 base unit per prompt token, 100 per completion token: a request's worst case (its bytes + 4096 prompt
        // tokens, 8 completion tokens) is about 5,000 base units; what it meters is under 1,000.
        try await RegistryChain.shared.setPrices(node.publicKey, PriceList(entries: [
            PriceEntry(name: "*", perMillionPromptTokens: Amount(baseUnits: 1_000_000), perMillionCompletionTokens: Amount(baseUnits: 100_000_000)),
        ]))
        // The router has read the prices once nothing is within a maximum of 0 (the operator's key is not escrow-checked).
        try await Harness.eventually(timeout: .seconds(30), "the router reading the node's prices") {
            Self.code(try await Harness.request(.POST, network.baseURL + "/chat/completions", key: network.apiKey,
                                                body: chatBody("hi", maxTokens: 8), headers: [("X-EMC-Max-Price", "0")])) == "no_node_within_max_price"
        }

        let owner = SigningKey()
        let ownerFile = network.root + "/owner.key"
        try KeyFile.write(owner, to: ownerFile)
        let made = try CLIRun.emc(["keys", "api", "new", "--data-dir", network.routerDirectory, "--account", ownerFile])
        #expect(made.status == 0, "\(made)")
        let secret = made.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let escrow = Amount(baseUnits: 30_000)
        try await RegistryChain.shared.fundEscrow(owner, router: network.routerKey.publicKey, amount: escrow)
        try await Harness.eventually(timeout: .seconds(20), "the router reading the new escrow") {
            try await Harness.request(.POST, network.baseURL + "/chat/completions", key: secret,
                                      body: chatBody("Say hello.", maxTokens: 8)).status == 200
        }

        let results = try await withThrowingTaskGroup(of: Harness.HTTPResult.self) { group in
            for index in 0..<64 {
                group.addTask {
                    try await Harness.request(.POST, network.baseURL + "/chat/completions", key: secret,
                                              body: chatBody("Write a long story about the sea, part \(index).", maxTokens: 8))
                }
            }
            return try await group.reduce(into: [Harness.HTTPResult]()) { $0.append($1) }
        }
        let served = results.filter { $0.status == 200 }
        let refused = results.filter { $0.status == 402 }
        #expect(served.count + refused.count == 64, "\(results.map(\.status))")
        #expect(!served.isEmpty, "\(results.map { $0.text.prefix(300) })")
        #expect(!refused.isEmpty, "64 requests of ~5,000 base units' worst case each all fit a 30,000 escrow?")
        for refusal in refused {
            #expect(Self.code(refusal) == "insufficient_quota", "\(refusal.text)")
            #expect(refusal.text.contains("may cost up to"), "\(refusal.text)")
            #expect(refusal.header("x-emc-request-id") == nil)
        }

        // Every served request's receipt is stored; together the payer's receipts cost no more than the escrow.
        let sequences = Set(served.compactMap { $0.header("x-emc-request-id").flatMap { UInt64($0) } })
        #expect(sequences.count == served.count)
        let payer = Account(owner: owner.publicKey)
        let database = network.routerDirectory + "/router.sqlite"
        try await Harness.eventually(timeout: .seconds(20), "receipts of the served requests") {
            Set(try await ReceiptFile(path: database).receipts().filter { $0.body.payer == payer }.map(\.body.sequence)).isSuperset(of: sequences)
        }
        let receipts = try await ReceiptFile(path: database).receipts().filter { $0.body.payer == payer }
        var total: UInt64 = 0
        for receipt in receipts {
            let cost = try #require(receipt.body.cost)
            total = try #require(total.addingReportingOverflow(cost).overflow ? nil : total + cost)
        }
        #expect(total > 0)
        #expect(total <= escrow.baseUnits, "receipts cost \(total) base units of a \(escrow.baseUnits) escrow")
        #expect(try await network.misbehaviourCounts().isEmpty, "\(network.logs)")
    }

    // Bugs caught: X-EMC-Max-Price ignored (a dear node served a request capped below its price); a malformed value
    // read as "no maximum" or crashing the router; a request no node can serve at its maximum answered with a status
    // OpenAI's clients retry.
    @Test("X-EMC-Max-Price keeps requests off a node whose worst case is above it; malformed values get 400")
    func maxPriceFiltersNodes() async throws {
        let network = try await TestNetwork(name: "admission-max-price")
        defer { network.stopAll() }
        try await network.startRouter()
        try await network.startComputeNode(maxConcurrent: 2)
        try await network.startComputeNode(maxConcurrent: 2)
        try await network.waitForNodes(2)
        let cheap = try KeyFile.loadOrCreate(at: network.root + "/compute-1/node.key")
        let dear = try KeyFile.loadOrCreate(at: network.root + "/compute-2/node.key")
        // Completion tokens only: with max_tokens 4 the worst case is 4 base units at the cheap node, 4,000 at the dear one.
        try await RegistryChain.shared.setPrices(cheap.publicKey, PriceList(entries: [
            PriceEntry(name: "*", perMillionCompletionTokens: Amount(baseUnits: 1_000_000)),
        ]))
        try await RegistryChain.shared.setPrices(dear.publicKey, PriceList(entries: [
            PriceEntry(name: "*", perMillionCompletionTokens: Amount(baseUnits: 1_000_000_000)),
        ]))
        let body = chatBody("Name a colour.", maxTokens: 4)
        func ask(_ maxPrice: String?) async throws -> Harness.HTTPResult {
            try await Harness.request(.POST, network.baseURL + "/chat/completions", key: network.apiKey, body: body,
                                      headers: maxPrice.map { [("X-EMC-Max-Price", $0)] } ?? [])
        }
        // Both prices are read once no node is within 1 base unit (an unread node is free, so within it).
        try await Harness.eventually(timeout: .seconds(30), "the router reading both nodes' prices") {
            Self.code(try await ask("0.00000001")) == "no_node_within_max_price"
        }
        let none = try await ask("0.00000001")
        #expect(none.status == 400, "\(none.text)")
        #expect(none.header("x-emc-request-id") == nil)

        // 10 base units: only the cheap node qualifies, whichever node selection would have picked.
        for _ in 0..<8 {
            let result = try await ask("0.0000001")
            #expect(result.status == 200, "\(result.text)")
            #expect(result.header("x-emc-node") == cheap.publicKey.nodeID.description, "served by \(result.header("x-emc-node") ?? "?")")
        }
        // Without a maximum both serve; at 0.0001 EMC (10,000 base units) both qualify.
        try await Harness.eventually(timeout: .seconds(60), "the dear node serving a request without a maximum") {
            try await ask(Bool.random() ? nil : "0.0001").header("x-emc-node") == dear.publicKey.nodeID.description
        }

        for malformed in ["-1", "abc", "0.000000001", "1e-3", "99999999999999999999999", "", "0.1, 0.2", String(repeating: "9", count: 64)] {
            let result = try await ask(malformed)
            #expect(result.status == 400, "\(malformed): \(result.text)")
            #expect(Self.code(result) == "invalid_max_price", "\(malformed): \(result.text)")
            #expect(result.header("x-emc-request-id") == nil)
        }
        #expect(network.router?.isRunning == true)
        #expect(try await ask(nil).status == 200)
    }
}
}
