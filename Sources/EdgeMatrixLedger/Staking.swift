import EdgeMatrixCore

/// Stake power in fixed point with 4 decimals (`scaled` = power × 10,000), computed with integer math only:
/// validator amt·100/1,000,000; router amt·10/100,000; compute amt·10/100,000 × the lock-tier multiplier
/// (amounts in EMC). For validators `scaled` equals the whole EMC staked, and it is their consensus voting power.
public struct StakePower: Hashable, Comparable, Sendable, CustomStringConvertible, Codable {
    public static let scale: UInt64 = 10_000
    public static let zero = StakePower(scaled: 0)
    public var scaled: UInt64

    public init(scaled: UInt64) { self.scaled = scaled }

    public var description: String {
        let fraction = String(scaled % Self.scale)
        return "\(scaled / Self.scale).\(String(repeating: "0", count: 4 - fraction.count))\(fraction)"
    }

    public static func < (lhs: StakePower, rhs: StakePower) -> Bool { lhs.scaled < rhs.scaled }

    /// Power of `amount` staked for `role` with a `lockDays` lock under `staking`.
    public static func of(role: NodeRole, amount: Amount, lockDays: UInt32, staking: StakingParameters) -> StakePower {
        // scaled = baseUnits × numerator × 10,000 / denominator, with a 128-bit intermediate.
        let numerator: UInt64, denominator: UInt64
        switch role {
        case .validator:
            (numerator, denominator) = (100 * scale, 1_000_000 * Amount.unitsPerEMC)
        case .router:
            (numerator, denominator) = (10 * scale, 100_000 * Amount.unitsPerEMC)
        case .compute:
            let multiplier = staking.computeLockTiers.last(where: { $0.days <= lockDays })?.multiplierBps ?? 0
            (numerator, denominator) = (10 * UInt64(multiplier), 100_000 * Amount.unitsPerEMC)
        }
        let product = amount.baseUnits.multipliedFullWidth(by: numerator)
        // The quotient is at most baseUnits × 10 × 10 for any sane multiplier, far inside UInt64 for 2.1e17 units.
        guard product.high < denominator else { return StakePower(scaled: .max) }
        return StakePower(scaled: denominator.dividingFullWidth(product).quotient)
    }
}

public enum StakeStatus: String, Codable, Sendable, Hashable {
    case bonded
    /// Counts for nothing any more; withdrawable once the lock has ended. Still slashable until withdrawn.
    case unbonding
}

public struct Stake: Hashable, Sendable, Codable {
    public let id: UInt64
    public let owner: Account
    public let role: NodeRole
    public internal(set) var amount: Amount
    public let lockDays: UInt32
    public let bondedAtMillis: UInt64
    public let unlocksAtMillis: UInt64
    public internal(set) var status: StakeStatus

    public func power(_ staking: StakingParameters) -> StakePower {
        status == .bonded ? StakePower.of(role: role, amount: amount, lockDays: lockDays, staking: staking) : .zero
    }

    enum CodingKeys: String, CodingKey {
        case id, owner, role, amount
        case lockDays = "lock_days"
        case bondedAtMillis = "bonded_at_ms"
        case unlocksAtMillis = "unlocks_at_ms"
        case status
    }
}

public enum NodeStatus: String, Codable, Sendable, Hashable {
    case active
    case retired
}

/// A node in the registry. Its id is `nodeKey.nodeID`.
public struct NodeRecord: Hashable, Sendable, Codable {
    public let nodeKey: PublicKey
    public let owner: PublicKey
    public let role: NodeRole
    public internal(set) var endpoints: [String]
    public internal(set) var stakeID: UInt64
    public let registeredAt: TxLocation
    public internal(set) var status: NodeStatus
    /// A compute node's prices (`set_prices`); empty = it charges nothing.
    public internal(set) var prices: PriceList = .empty
    /// A router's fee in basis points of what it settles (`set_router_fee`); 0 for other roles.
    public internal(set) var routerFeeBps: UInt32 = 0
    /// The price list `prices` replaced: receipts priced under it stay valid leaves (a node cannot make its router's
    /// settlement of work it did at its old prices look fraudulent by changing prices). Not in the JSON.
    public internal(set) var priorPrices: PriceList = .empty

    public var nodeID: NodeID { nodeKey.nodeID }

    enum CodingKeys: String, CodingKey {
        case nodeKey = "node_key"
        case owner, role, endpoints
        case stakeID = "stake_id"
        case registeredAt = "registered_at"
        case status
        case prices
        case routerFeeBps = "router_fee_bps"
    }
}

/// A validator and its voting power (`StakePower.scaled`, = whole EMC staked), keyed by its consensus (node) key.
/// Used both for the set in force and for epoch updates, where power 0 means "removed". Consensus has its own
/// `ValidatorUpdate(publicKey:votingPower:)`; map field for field.
public struct StakedValidator: Hashable, Sendable, Codable {
    public var nodeKey: PublicKey
    public var power: UInt64

    public init(nodeKey: PublicKey, power: UInt64) {
        self.nodeKey = nodeKey
        self.power = power
    }

    enum CodingKeys: String, CodingKey {
        case nodeKey = "node_key"
        case power
    }
}


/// Consensus-reported equivocation (two signed votes for one height/round/step) by `validator`.
public struct Misbehaviour: Hashable, Sendable, Codable {
    public var validator: PublicKey
    /// Hash of the evidence, so the same evidence never slashes twice.
    public var evidenceID: Hash32

    public init(validator: PublicKey, evidenceID: Hash32) {
        self.validator = validator
        self.evidenceID = evidenceID
    }
}

public struct SlashOutcome: Hashable, Sendable {
    public var validator: PublicKey
    public var stakeID: UInt64
    public var slashed: Amount
    public var remaining: Amount
}
