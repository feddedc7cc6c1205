import EdgeMatrixChain
import EdgeMatrixCore
import EdgeMatrixLedger
import Foundation
import ServiceLifecycle

/// Puts a node key on chain the way an operator joins: bond a stake of the node's role from the owner's account,
/// then register the node (the node key signs the statement, the owner signs the transaction). Idempotent: a node
/// that is already registered and eligible is left as it is, and an unused bonded stake of the role is reused.
public struct NodeEnrollment: Sendable {
    public let client: ChainClient
    public let owner: SigningKey

    public init(client: ChainClient, owner: SigningKey) {
        self.client = client
        self.owner = owner
    }

    public enum Failure: Error, CustomStringConvertible {
        case retired(NodeID)
        case notEligible(NodeID, String)
        case failed(String, reason: String)

        public var description: String {
            switch self {
            case .retired(let id): "node \(id) is retired on chain; retired nodes cannot come back: use a new node key"
            case .notEligible(let id, let why): "node \(id) is registered but cannot serve: \(why)"
            case .failed(let what, let reason): "\(what) failed: \(reason)"
            }
        }
    }

    /// Makes `node` an eligible registered node of `role`; `progress` hears each step.
    public func enroll(node: SigningKey, role: NodeRole, stake: Amount, lockDays: UInt32, endpoints: [String],
                       progress: @Sendable (String) -> Void = { _ in }) async throws {
        let chainID = try await client.chainID()
        let nodes = try await client.nodes()
        if let record = nodes.first(where: { $0["node_key"] as? String == node.publicKey.hex }) {
            if record["status"] as? String == "retired" { throw Failure.retired(node.nodeID) }
            if record["eligible"] as? Bool == true {
                progress("node \(node.nodeID) is already registered as \(record["role"] as? String ?? "?")")
                return
            }
            throw Failure.notEligible(node.nodeID, "its stake \(record["stake_id"] ?? "?") is \(record["stake_status"] ?? "missing") "
                                      + "with \(record["stake"] ?? "nothing"); bond more and `emc tx node update --stake-id`")
        }
        let used = Set(nodes.compactMap { ($0["stake_id"] as? NSNumber)?.uint64Value })
        let stakeID: UInt64
        if let reusable = try await unusedStake(role: role, atLeast: stake, used: used) {
            stakeID = reusable
            progress("reusing bonded \(role.rawValue) stake \(stakeID)")
        } else {
            progress("bonding \(stake) EMC as \(role.rawValue) stake for \(lockDays) days")
            try await commit(.bond(Bond(role: role, amount: stake, lockDays: lockDays)), chainID: chainID, what: "bond")
            guard let fresh = try await unusedStake(role: role, atLeast: stake, used: used) else {
                throw Failure.failed("bond", reason: "the bonded stake does not show in /stakes")
            }
            stakeID = fresh
        }
        progress("registering node \(node.nodeID) (\(role.rawValue)) backed by stake \(stakeID)")
        let statement = NodeRegistrationStatement(chainID: chainID, owner: owner.publicKey, nodeKey: node.publicKey, role: role,
                                                  endpoints: endpoints, stakeID: stakeID)
        try await commit(.registerNode(NodeRegistration(statement: statement, nodeKey: node)), chainID: chainID, what: "registration")
    }

    /// Makes the owner's escrow with `router` (a registered router's node key) hold at least `amount` available:
    /// opens it, or tops it up by exactly the shortfall; an escrow that already has `amount` available is left as
    /// it is (so calling this at every start-up never grows it). Returns the escrow's available EMC afterwards.
    @discardableResult
    public func ensureEscrow(router: PublicKey, amount: Amount, progress: @Sendable (String) -> Void = { _ in }) async throws -> Amount {
        let account = Account(owner: owner.publicKey)
        func available() async throws -> Amount {
            let escrow = try await client.escrows(of: account).first { $0["router"] as? String == router.hex }
            guard let text = escrow?["available"] as? String else { return .zero }
            do { return try Amount(parsing: text) } catch {
                throw Failure.failed("escrow", reason: "the chain reported an unreadable available amount '\(text)'")
            }
        }
        let current = try await available()
        guard let shortfall = amount.subtracting(current), shortfall > .zero else {
            progress("escrow with router \(router.nodeID) already holds \(current) EMC available")
            return current
        }
        progress("escrow with router \(router.nodeID): adding \(shortfall) EMC (to \(amount) EMC)")
        try await commit(.escrowOpen(EscrowOpen(router: router, amount: shortfall)), chainID: try await client.chainID(), what: "escrow open")
        return try await available()
    }

    /// Makes `node`'s registered price list equal to `prices` (sends `set_prices` only when the chain holds another
    /// list, so calling this at every start-up sends nothing once it is in place).
    public func ensurePrices(node: PublicKey, prices: PriceList, progress: @Sendable (String) -> Void = { _ in }) async throws {
        let registered = try await client.nodes().first { $0["node_key"] as? String == node.hex }
        if let registered, RegistryPriceBook.priceList(ofNode: registered)?.sorted == prices.sorted {
            progress("prices of node \(node.nodeID) already registered")
            return
        }
        progress("registering prices of node \(node.nodeID) (\(prices.entries.count) entries)")
        try await commit(.setPrices(SetPrices(nodeKey: node, prices: prices.sorted)), chainID: try await client.chainID(), what: "set prices")
    }

    /// Makes router `node`'s registered fee `bps` (sends `set_router_fee` only when the chain holds another fee).
    public func ensureRouterFee(node: PublicKey, bps: UInt32, progress: @Sendable (String) -> Void = { _ in }) async throws {
        let registered = try await client.nodes().first { $0["node_key"] as? String == node.hex }
        if let registered, (registered["router_fee_bps"] as? NSNumber)?.uint32Value == bps {
            progress("router fee of node \(node.nodeID) already \(bps) bps")
            return
        }
        progress("setting the router fee of node \(node.nodeID) to \(bps) bps")
        try await commit(.setRouterFee(SetRouterFee(nodeKey: node, feeBps: bps)), chainID: try await client.chainID(), what: "set router fee")
    }

    /// The newest bonded stake of `role` owned by the owner, not backing a node, of at least `amount`.
    private func unusedStake(role: NodeRole, atLeast amount: Amount, used: Set<UInt64>) async throws -> UInt64? {
        let stakes = try await client.stakes(ownedBy: owner.publicKey)
        return stakes.compactMap { stake -> UInt64? in
            guard stake["role"] as? String == role.rawValue, stake["status"] as? String == "bonded",
                  let id = (stake["id"] as? NSNumber)?.uint64Value, !used.contains(id),
                  let text = stake["amount"] as? String, let value = try? Amount(parsing: text), value >= amount else { return nil }
            return id
        }.max()
    }

    /// Tops `account` up from the owner to at least `amount` (a compute node's key account posts its watchtower's
    /// challenge bonds); returns what it sent.
    @discardableResult
    public func ensureBalance(of account: Account, atLeast amount: Amount, progress: @Sendable (String) -> Void = { _ in }) async throws -> Amount {
        let answer = try await client.get("/accounts/\(account.description)/balance")
        let balance = (answer["balance_base_units"] as? NSNumber)?.uint64Value ?? 0
        guard balance < amount.baseUnits else { return .zero }
        let shortfall = Amount(baseUnits: amount.baseUnits - balance)
        progress("funding \(account) with \(shortfall) EMC")
        try await commit(.transfer(Transfer(to: account, amount: shortfall)), chainID: try await client.chainID(), what: "transfer")
        return shortfall
    }

    private func commit(_ kind: TransactionKind, chainID: String, what: String) async throws {
        let tx = Transaction(signing: TransactionBody(chainID: chainID, createdAtMillis: wallClockMillis(),
                                                      kind: kind), with: owner)
        let result = try await client.waitForCommit(hash: try await client.submit(tx))
        guard result["status"] as? String == "committed" else {
            throw Failure.failed(what, reason: ((result["error"] as? [String: Any])?["message"] as? String) ?? "\(result)")
        }
    }
}

/// The devnet's own nodes join the chain at start-up like anyone else's: once the validators commit, the funded
/// account bonds and registers the router (publishing its tunnel address and HTTP API) and each compute node, whose
/// node-key accounts it funds with `watchtowerFunds` so their watchtowers can post challenge bonds. Until then the
/// router admits nobody and the compute nodes retry.
struct DevnetEnrollment: Service {
    /// What the devnet's compute nodes charge: 0.5 EMC per 1M prompt tokens, 1.5 EMC per 1M completion tokens,
    /// 0.0001 EMC per embedding input, for every model.
    static let computePrices = PriceList(entries: [
        PriceEntry(name: PriceList.wildcard, perMillionPromptTokens: Amount(baseUnits: 50_000_000),
                   perMillionCompletionTokens: Amount(baseUnits: 150_000_000), perEmbeddingInput: Amount(baseUnits: 10_000)),
    ])
    /// What each devnet compute node's key account holds for its watchtower's challenge bonds (10 EMC each).
    static let watchtowerFunds = Amount(emc: 100)
    /// The devnet router's fee: 2.5% of what it settles.
    static let routerFeeBps: UInt32 = 250
    let client: ChainClient
    let owner: SigningKey
    /// The router's tunnel address (first, as compute nodes dial the first HOST:PORT endpoint) and its HTTP API, which
    /// watchtowers read batches from (PROTOCOL.md § 12).
    let router: (key: SigningKey, tunnelAddress: String, httpURL: String)
    let computeNodes: [SigningKey]
    let say: @Sendable (String) -> Void

    func run() async throws {
        try await cancelWhenGracefulShutdown {
            while !Task.isCancelled, ((try? await client.status()["height"] as? Int) ?? 0) < 1 {
                try? await Task.sleep(for: .milliseconds(200))
            }
            let enrollment = NodeEnrollment(client: client, owner: owner)
            let requirement = LedgerParameters.standard.staking
            try await enrollment.enroll(node: router.key, role: .router, stake: requirement.router.minimumStake,
                                        lockDays: requirement.router.minimumLockDays, endpoints: [router.tunnelAddress, router.httpURL]) { say("chain: " + $0) }
            try await enrollment.ensureRouterFee(node: router.key.publicKey, bps: Self.routerFeeBps) { say("chain: " + $0) }
            for node in computeNodes {
                try await enrollment.enroll(node: node, role: .compute, stake: Amount(emc: 1_000), lockDays: 30, endpoints: []) { say("chain: " + $0) }
                try await enrollment.ensurePrices(node: node.publicKey, prices: Self.computePrices) { say("chain: " + $0) }
                try await enrollment.ensureBalance(of: Account(owner: node.publicKey), atLeast: Self.watchtowerFunds) { say("chain: " + $0) }
            }
            // The funded account pays for the devnet's OPENAI_API_KEY from this escrow.
            try await enrollment.ensureEscrow(router: router.key.publicKey, amount: Amount(emc: 1_000)) { say("chain: " + $0) }
        }
        try? await gracefulShutdown()
    }
}
