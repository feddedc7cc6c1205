import EdgeMatrixCore
import Foundation
@testable import EdgeMatrixLedger
import Testing

@Suite("Price lists and router fees")
struct PriceListTests {
    static let llama = PriceEntry(name: "llama3.2:3b", perMillionPromptTokens: emc("0.5"), perMillionCompletionTokens: emc("1.5"),
                                  perEmbeddingInput: emc("0.001"), perImage: emc("0.02"), perRestCall: emc("0.003"))

    func setPrices(_ r: RouterFixture, _ node: SigningKey, _ entries: [PriceEntry], signer: SigningKey? = nil) -> Transaction {
        r.f.tx(signer ?? r.f.alice, .setPrices(SetPrices(nodeKey: node.publicKey, prices: PriceList(entries: entries))))
    }

    @Test("the owner sets a compute node's prices; they are in the registry and the state root")
    func setAndRead() throws {
        var r = RouterFixture()
        let node = r.computeNode()
        let root = r.f.ledger.stateRoot()
        let outcome = try r.f.submit(setPrices(r, node, [Self.llama])).get()
        #expect(outcome.effect == .pricesSet(nodeKey: node.publicKey, entries: 1))
        #expect(r.f.ledger.node(node.publicKey)?.prices == PriceList(entries: [Self.llama]))
        #expect(r.f.ledger.stateRoot() != root)
        // Replacing with an empty list clears them (the node then charges nothing).
        #expect(r.f.submit(setPrices(r, node, [])).value != nil)
        #expect(r.f.ledger.node(node.publicKey)?.prices == .empty)
    }

    @Test("zero and the largest prices are accepted; 64 entries are, 65 are not")
    func bounds() throws {
        var r = RouterFixture()
        let node = r.computeNode()
        let max = Amount(baseUnits: .max)
        let extremes = [PriceEntry(name: "free"), PriceEntry(name: "max", perMillionPromptTokens: max, perMillionCompletionTokens: max,
                                                              perEmbeddingInput: max, perImage: max, perRestCall: max)]
        #expect(r.f.submit(setPrices(r, node, extremes)).value != nil)
        #expect(r.f.ledger.node(node.publicKey)?.prices.entries == extremes)
        let names = (0..<65).map { String(format: "model-%03d", $0) }
        #expect(r.f.submit(setPrices(r, node, names.prefix(64).map { PriceEntry(name: $0, perImage: emc("1")) })).value != nil)
        #expect(r.f.ledger.node(node.publicKey)?.prices.entries.count == 64)
        let huge = setPrices(r, node, names.map { PriceEntry(name: $0) })
        #expect(r.f.submit(huge).failure == .invalidPriceList(field: "prices", reason: "at most 64 entries, got 65; list fewer models or use a \"*\" entry"))
        #expect(r.f.ledger.node(node.publicKey)?.prices.entries.count == 64)
        // A list beyond the decoder's bound never gets past decoding.
        var writer = ByteWriter()
        writer.write(UInt32(1_025))
        var reader = ByteReader(writer.bytes)
        #expect(throws: EdgeMatrixCore.DecodingError.self) { try PriceList(from: &reader) }
    }

    static let badNames: [(String, [String], String)] = [
        ("empty", ["a", ""], "prices[1].name"),
        ("space", ["llama 3"], "prices[0].name"),
        ("non-ASCII", ["lläma"], "prices[0].name"),
        ("too long", [String(repeating: "m", count: 129)], "prices[0].name"),
        ("unsorted", ["b", "a"], "prices[1].name"),
        ("duplicate", ["a", "a"], "prices[1].name"),
    ]

    @Test("bad names are refused, naming the entry", arguments: badNames)
    func refusesBadName(_ label: String, names: [String], field: String) {
        var r = RouterFixture()
        let node = r.computeNode()
        let result = r.f.submit(setPrices(r, node, names.map { PriceEntry(name: $0) }))
        guard case .invalidPriceList(let got, _) = result.failure else {
            Issue.record("\(label): expected invalid_price_list, got \(result)")
            return
        }
        #expect(got == field, "\(label)")
        #expect(r.f.ledger.node(node.publicKey)?.prices == .empty)
    }

    @Test("a 128-byte name is the longest accepted")
    func longestName() {
        var r = RouterFixture()
        let node = r.computeNode()
        #expect(r.f.submit(setPrices(r, node, [PriceEntry(name: String(repeating: "m", count: 128))])).value != nil)
    }

    @Test("only the owner of an active compute node sets its prices")
    func who() {
        var r = RouterFixture()
        let node = r.computeNode()
        #expect(r.f.submit(setPrices(r, node, [Self.llama], signer: r.f.bob)).failure == .notNodeOwner(nodeKey: node.publicKey))
        #expect(r.f.submit(setPrices(r, r.router, [Self.llama])).failure
                == .wrongNodeRole(nodeKey: r.router.publicKey, role: .router, expected: .compute))
        let ghost = testKey(98)
        #expect(r.f.submit(setPrices(r, ghost, [Self.llama])).failure == .unknownNode(nodeKey: ghost.publicKey))
        #expect(r.f.submit(r.f.tx(r.f.alice, .retireNode(nodeKey: node.publicKey))).value != nil)
        #expect(r.f.submit(setPrices(r, node, [Self.llama])).failure == .nodeRetired(nodeKey: node.publicKey))
    }

    @Test("lookup: the model's entry, else the app's, else *, else free; the item price follows the work's kind")
    func lookup() {
        let list = PriceList(entries: [PriceEntry(name: "*", perRestCall: emc("0.5")), Self.llama,
                                       PriceEntry(name: "sd", perImage: emc("0.07"))])
        #expect(list.unitPrices(model: "llama3.2:3b", app: "ollama", kind: .chat)
                == UnitPrices(perMillionPromptTokens: 50_000_000, perMillionCompletionTokens: 150_000_000, perItem: 0))
        #expect(list.unitPrices(model: "llama3.2:3b", app: "ollama", kind: .embeddings) == UnitPrices(perItem: 100_000))
        #expect(list.unitPrices(model: "llama3.2:3b", app: "ollama", kind: .images) == UnitPrices(perItem: 2_000_000))
        #expect(list.unitPrices(model: "llama3.2:3b", app: "ollama", kind: .rest) == UnitPrices(perItem: 300_000))
        // Model unknown: the app's entry.
        #expect(list.unitPrices(model: "sdxl", app: "sd", kind: .images) == UnitPrices(perItem: 7_000_000))
        // Neither: the wildcard.
        #expect(list.unitPrices(model: "", app: "weather", kind: .rest) == UnitPrices(perItem: 50_000_000))
        #expect(list.unitPrices(model: "", app: "weather", kind: .chat) == .free)
        // No wildcard: nothing listed is free.
        #expect(PriceList(entries: [Self.llama]).unitPrices(model: "other", app: "x", kind: .chat) == .free)
        #expect(PriceList.empty.unitPrices(model: "llama3.2:3b", app: "ollama", kind: .chat) == .free)
    }

    @Test("a price file: sorted for the chain, prices as EMC strings, every mistake named by its field")
    func parseFile() throws {
        let json = #"{"prices": [{"model": "zeta", "per_image": "0.02"}, {"app": "sd", "per_rest_call": "1"}, {"model": "*"}]}"#
        let list = try PriceList.parse(json: Data(json.utf8))
        #expect(list.entries.map(\.name) == ["*", "sd", "zeta"])
        #expect(list.entries[2].perImage == emc("0.02") && list.entries[1].perRestCall == emc("1") && list.entries[0] == PriceEntry(name: "*"))
        #expect(try PriceList.parse(json: Data(#"[{"name": "a"}]"#.utf8)).entries.count == 1)
        let cases: [(String, String)] = [
            (#"{"prices": [{"model": "a", "per_image": 0.02}]}"#, "prices[0].per_image"),
            (#"{"prices": [{"model": "a", "per_imag": "1"}]}"#, "prices[0].per_imag"),
            (#"{"prices": [{"model": "a", "per_image": "0.000000001"}]}"#, "prices[0].per_image"),
            (#"{"prices": [{"model": "a", "app": "b"}]}"#, "prices[0]"),
            (#"{"prices": [{"model": "b"}, {"model": "a"}, {"model": "b"}]}"#, "prices[2].name"),
            (#"{"prices": [{"model": "ok"}, {"model": "with space"}]}"#, "prices[1].name"),
            (#"{"prices": [1]}"#, "prices[0]"),
            (#"{"price": []}"#, ""),
        ]
        for (text, field) in cases {
            let error = #expect(throws: PriceList.FileError.self) { try PriceList.parse(json: Data(text.utf8)) }
            #expect(error?.field == field, "\(text): \(String(describing: error))")
        }
    }

    @Test("set_prices round-trips through the wire encoding")
    func encoding() throws {
        let r = RouterFixture()
        let tx = setPrices(r, testKey(91), [PriceEntry(name: "*"), Self.llama])
        let decoded = try Transaction(decoding: tx.encoded)
        #expect(decoded.body == tx.body)
        // Kind 10: tag ‖ node key ‖ count u32 ‖ (name string ‖ 5 × u64)…
        let tail = Array(tx.bodyBytes.suffix(1 + 32 + 4 + (4 + 1 + 40) + (4 + 11 + 40)))
        #expect(tail[0] == 10)
        #expect(Array(tail[33..<37]) == [0, 0, 0, 2])
        #expect(Array(tail[37..<42]) == [0, 0, 0, 1, 0x2a])  // "*"
    }

    @Test("router fee: owner only, routers only, at most 10000 minus the protocol fee")
    func routerFee() throws {
        var r = RouterFixture()  // protocol fee 500 bps
        func fee(_ bps: UInt32, node: SigningKey? = nil, signer: SigningKey? = nil) -> Transaction {
            r.f.tx(signer ?? r.f.alice, .setRouterFee(SetRouterFee(nodeKey: (node ?? r.router).publicKey, feeBps: bps)))
        }
        #expect(try r.f.submit(fee(250)).get().effect == .routerFeeSet(nodeKey: r.router.publicKey, feeBps: 250))
        #expect(r.f.ledger.node(r.router.publicKey)?.routerFeeBps == 250)
        #expect(r.f.submit(fee(9_500)).value != nil)
        #expect(r.f.submit(fee(9_501)).failure == .invalidRouterFee(got: 9_501, maximum: 9_500))
        #expect(r.f.submit(fee(UInt32.max)).failure == .invalidRouterFee(got: .max, maximum: 9_500))
        #expect(r.f.ledger.node(r.router.publicKey)?.routerFeeBps == 9_500)
        #expect(r.f.submit(fee(0)).value != nil)
        #expect(r.f.submit(fee(100, signer: r.f.bob)).failure == .notNodeOwner(nodeKey: r.router.publicKey))
        let compute = r.computeNode()
        #expect(r.f.submit(fee(100, node: compute)).failure == .wrongNodeRole(nodeKey: compute.publicKey, role: .compute, expected: .router))
        let decoded = try Transaction(decoding: fee(77).encoded)
        #expect(decoded.body.kind == .setRouterFee(SetRouterFee(nodeKey: r.router.publicKey, feeBps: 77)))
        #expect(Array(fee(77).bodyBytes.suffix(37)) == [11] + r.router.publicKey.rawRepresentation + [0, 0, 0, 77])
    }
}
