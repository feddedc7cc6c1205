import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixRouter
import Foundation
import Synchronization

/// The compute nodes' signed price lists as the router last read them from the chain's registry (`GET /nodes`),
/// so that each assignment and receipt names the prices the ledger will charge. A node without a list, or a request
/// no entry matches, is free, as the ledger's `PriceList.unitPrices` rules.
public final class RegistryPriceBook: PriceBook {
    private let lists = Mutex([NodeID: PriceList]())

    public init() {}

    /// Replaces every list with those in one registry read.
    public func update(_ newLists: [NodeID: PriceList]) {
        lists.withLock { $0 = newLists }
    }

    public func prices(node: NodeID, app: String, model: String, path: String) async -> UnitPrices {
        guard let list = lists.withLock({ $0[node] }) else { return .free }
        return list.unitPrices(model: model, app: app, kind: Self.kind(ofPath: path))
    }

    /// The kind of work an API route does, which picks the item price: an embedding input, an image, a REST call.
    static func kind(ofPath path: String) -> PricedWorkKind {
        let route = path.split(separator: "?", maxSplits: 1).first.map(String.init) ?? path
        switch route {
        case "/v1/chat/completions", "/v1/completions": return .chat
        case "/v1/embeddings": return .embeddings
        case "/v1/images/generations", "/sdapi/v1/txt2img": return .images
        default: return .rest
        }
    }

    /// The price lists in a `/nodes` answer, by node id. An entry whose list does not parse is left out (free):
    /// the chain validated every list it stored, so that only happens with a validator this router cannot read.
    static func priceLists(_ nodes: [[String: Any]]) -> [NodeID: PriceList] {
        var lists = [NodeID: PriceList]()
        for node in nodes {
            guard let hex = node["node_key"] as? String, let key = try? PublicKey(hex: hex),
                  let list = priceList(ofNode: node), !list.entries.isEmpty else { continue }
            lists[key.nodeID] = list
        }
        return lists
    }

    /// The `prices` of one `/nodes` entry, nil when absent or unreadable.
    static func priceList(ofNode node: [String: Any]) -> PriceList? {
        guard let prices = node["prices"], JSONSerialization.isValidJSONObject(["p": prices]),
              let data = try? JSONSerialization.data(withJSONObject: prices) else { return nil }
        return try? JSONDecoder().decode(PriceList.self, from: data)
    }
}
