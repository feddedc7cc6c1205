import EdgeMatrixCore

/// Where the router finds a compute node's unit prices for a request, at the moment it assigns the request. The
/// assignment and the node's receipt both name these prices, and settlement charges them. The registry's signed
/// price lists are the source once they are wired in; until then every node works for free.
public protocol PriceBook: Sendable {
    /// `path` is the API route the request came in on; it tells which kind of work (and so which item price) applies.
    func prices(node: NodeID, app: String, model: String, path: String) async -> UnitPrices
}

/// Every node, app and model at price zero.
public struct FreePriceBook: PriceBook {
    public init() {}
    public func prices(node: NodeID, app: String, model: String, path: String) async -> UnitPrices { .free }
}

/// The same prices for every node (tests, single-operator deployments).
public struct FixedPriceBook: PriceBook {
    public let unitPrices: UnitPrices
    public init(_ unitPrices: UnitPrices) { self.unitPrices = unitPrices }
    public func prices(node: NodeID, app: String, model: String, path: String) async -> UnitPrices { unitPrices }
}

/// The router-local epoch that API-key spend limits count in. Settlement epochs (blocks) come with escrow; until
/// then a limit is a budget for the key's life.
public protocol SpendEpochs: Sendable {
    func current() -> UInt64
}

/// One epoch that never ends: a key's spend limit is a total.
public struct SingleSpendEpoch: SpendEpochs {
    public init() {}
    public func current() -> UInt64 { 0 }
}

/// What each payer's escrow with this router has available on chain, as the router last read it. The router serves
/// a payer only while that exceeds what its unsettled receipts cost; while the chain is unreachable the last reading
/// holds (the router keeps serving up to what it last knew).
public protocol EscrowView: Sendable {
    /// Base units available to charge, 0 for a payer without an escrow here; nil while the router has not read the
    /// chain yet (it then does not check).
    func available(payer: Account) -> UInt64?
}

/// No escrow check: routers run without a chain (tests of the serving path alone).
public struct UncheckedEscrow: EscrowView {
    public init() {}
    public func available(payer: Account) -> UInt64? { nil }
}
