import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNode
import EdgeMatrixRouter
import Logging
import ServiceLifecycle
import Testing

/// A router names in each assignment (and so in each receipt) the prices that the node's owner registered on chain,
/// picking the item price by the kind of work the route does.
@Suite("Registry prices reach the router", .serialized)
struct RegistryPricesTests {
    // Bugs caught: the router's price book not following the registry (every request settled at zero, or at stale
    // prices); the wrong item price for a route (an embedding billed as a REST call); a node priced with another
    // node's list.
    @Test("the router's price book follows the node's registered price list, per route kind")
    func priceBookFollowsRegistry() async throws {
        let priced = SigningKey(), unpriced = SigningKey()
        try await RegistryChain.shared.enroll(priced)
        try await RegistryChain.shared.enroll(unpriced)
        let list = PriceList(entries: [
            PriceEntry(name: "*", perMillionPromptTokens: Amount(baseUnits: 7), perMillionCompletionTokens: Amount(baseUnits: 11),
                       perEmbeddingInput: Amount(baseUnits: 13), perImage: Amount(baseUnits: 17), perRestCall: Amount(baseUnits: 19)),
            PriceEntry(name: "special-model", perMillionPromptTokens: Amount(baseUnits: 23)),
        ])
        try await RegistryChain.shared.setPrices(priced.publicKey, list)

        let book = RegistryPriceBook()
        let admitted = RegisteredNodes()
        let quiet = Logger(label: "test") { _ in SwiftLogNoOpLogHandler() }
        let follower = RegistryFollower(nodeURL: try await RegistryChain.shared.url(), admitted: admitted, prices: book, logger: quiet)
        let group = ServiceGroup(services: [follower], logger: quiet)
        let running = Task { try await group.run() }
        defer { running.cancel() }

        let node = priced.publicKey.nodeID
        try await Harness.eventually(timeout: .seconds(10), "the price list read from the registry") {
            await book.prices(node: node, app: "llm", model: "any", path: "/v1/chat/completions") != .free
        }
        #expect(await book.prices(node: node, app: "llm", model: "any", path: "/v1/chat/completions")
                == UnitPrices(perMillionPromptTokens: 7, perMillionCompletionTokens: 11, perItem: 0))
        #expect(await book.prices(node: node, app: "embeddings", model: "any", path: "/v1/embeddings") == UnitPrices(perItem: 13))
        #expect(await book.prices(node: node, app: "img", model: "any", path: "/v1/images/generations") == UnitPrices(perItem: 17))
        #expect(await book.prices(node: node, app: "api", model: "any", path: "/v1/anything/else?x=1") == UnitPrices(perItem: 19))
        #expect(await book.prices(node: node, app: "llm", model: "special-model", path: "/v1/chat/completions")
                == UnitPrices(perMillionPromptTokens: 23))
        #expect(await book.prices(node: unpriced.publicKey.nodeID, app: "llm", model: "any", path: "/v1/chat/completions") == .free)
    }
}
