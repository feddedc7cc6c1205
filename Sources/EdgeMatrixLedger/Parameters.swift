import EdgeMatrixCore

/// The role a stake or a node plays in the network.
public enum NodeRole: String, Codable, Sendable, CaseIterable, Comparable, CustomStringConvertible {
    case validator
    case router
    case compute

    var tag: UInt8 {
        switch self {
        case .validator: 1
        case .router: 2
        case .compute: 3
        }
    }

    init(tag: UInt8) throws(DecodingError) {
        switch tag {
        case 1: self = .validator
        case 2: self = .router
        case 3: self = .compute
        default: throw .invalidValue("node role \(tag) (expected 1 validator, 2 router or 3 compute)")
        }
    }

    public var description: String { rawValue }
    public static func < (lhs: NodeRole, rhs: NodeRole) -> Bool { lhs.tag < rhs.tag }
}

/// Named pools funded at genesis. Their accounts belong to the protocol owner (see `Account.protocolOwner`),
/// a public key nobody holds the private key of, so only ledger rules can ever move their funds.
public enum Pool: String, Codable, Sendable, CaseIterable, Comparable {
    case transactionMining = "transaction-mining"
    case nodeRewards = "node-rewards"
    case ecosystem
    case treasury

    public var account: Account { Account(owner: Account.protocolOwner, subaccount: Account.protocolSubaccount(rawValue)) }
    public static func < (lhs: Pool, rhs: Pool) -> Bool { lhs.rawValue < rhs.rawValue }
}

extension Account {
    /// SHA-256("edgematrix/protocol-account/v1") read as an Ed25519 public key. Finding its private key is the
    /// discrete-log problem, so no signature from it can ever verify: protocol accounts move only by ledger rules.
    public static let protocolOwner: PublicKey = {
        try! PublicKey(rawRepresentation: Hash32.of(Array("edgematrix/protocol-account/v1".utf8)).bytes)
    }()

    /// ICRC-1's minting account: transfers to it are burns. Nobody can sign for it, so nothing is ever minted
    /// after genesis (the supply is fixed; fees and slashes only burn).
    public static let minting = Account(owner: protocolOwner)

    /// A protocol subaccount named by ASCII text, right-aligned so its hex form stays readable.
    static func protocolSubaccount(_ name: String) -> Subaccount {
        let raw = Array(name.utf8.prefix(Subaccount.byteCount))
        return Subaccount(bytes: [UInt8](repeating: 0, count: Subaccount.byteCount - raw.count) + raw)!
    }
}

/// Minimum stake and lock for a role.
public struct RoleRequirement: Codable, Sendable, Hashable {
    public var minimumStake: Amount
    public var minimumLockDays: UInt32

    public init(minimumStake: Amount, minimumLockDays: UInt32) {
        self.minimumStake = minimumStake
        self.minimumLockDays = minimumLockDays
    }

    enum CodingKeys: String, CodingKey {
        case minimumStake = "minimum_stake"
        case minimumLockDays = "minimum_lock_days"
    }
}

/// A compute-node lock tier: locking at least `days` multiplies stake power by `multiplierBps / 10000`.
public struct LockTier: Codable, Sendable, Hashable {
    public var days: UInt32
    public var multiplierBps: UInt32

    public init(days: UInt32, multiplierBps: UInt32) {
        self.days = days
        self.multiplierBps = multiplierBps
    }

    enum CodingKeys: String, CodingKey {
        case days
        case multiplierBps = "multiplier_bps"
    }
}

public struct StakingParameters: Codable, Sendable, Hashable {
    public var validator: RoleRequirement
    public var router: RoleRequirement
    public var compute: RoleRequirement
    /// Ascending by days; the first tier's days is the compute minimum lock.
    public var computeLockTiers: [LockTier]
    /// At most this many validators (highest stake power first) are active in an epoch.
    public var maxValidators: UInt32

    public init(validator: RoleRequirement, router: RoleRequirement, compute: RoleRequirement,
                computeLockTiers: [LockTier], maxValidators: UInt32) {
        self.validator = validator
        self.router = router
        self.compute = compute
        self.computeLockTiers = computeLockTiers
        self.maxValidators = maxValidators
    }

    public func requirement(for role: NodeRole) -> RoleRequirement {
        switch role {
        case .validator: validator
        case .router: router
        case .compute: compute
        }
    }

    /// DESIGN.md defaults: validator ≥ 1,000,000 EMC for ≥ 360 days; router ≥ 100,000 EMC for ≥ 180 days;
    /// compute 7 d 1.4×, 30 d 2.7×, 90 d 6.2×, 180 d 10×. The compute minimum (100 EMC) is ours: it keeps dust out.
    public static let standard = StakingParameters(
        validator: RoleRequirement(minimumStake: Amount(emc: 1_000_000), minimumLockDays: 360),
        router: RoleRequirement(minimumStake: Amount(emc: 100_000), minimumLockDays: 180),
        compute: RoleRequirement(minimumStake: Amount(emc: 100), minimumLockDays: 7),
        computeLockTiers: [LockTier(days: 7, multiplierBps: 14_000), LockTier(days: 30, multiplierBps: 27_000),
                           LockTier(days: 90, multiplierBps: 62_000), LockTier(days: 180, multiplierBps: 100_000)],
        maxValidators: 100)

    enum CodingKeys: String, CodingKey {
        case validator, router, compute
        case computeLockTiers = "compute_lock_tiers"
        case maxValidators = "max_validators"
    }
}

/// One row of the transaction-mining decay table: for `lengthDays` days, a settled transaction of value M pays
/// M·P(n) in total rewards, df(n) of it to the user and the rest to the provider (both in basis points).
public struct MiningPeriod: Codable, Sendable, Hashable {
    public var lengthDays: UInt32
    public var rewardRateBps: UInt32
    public var userShareBps: UInt32

    public init(lengthDays: UInt32, rewardRateBps: UInt32, userShareBps: UInt32) {
        self.lengthDays = lengthDays
        self.rewardRateBps = rewardRateBps
        self.userShareBps = userShareBps
    }

    enum CodingKeys: String, CodingKey {
        case lengthDays = "length_days"
        case rewardRateBps = "p_bps"
        case userShareBps = "df_bps"
    }
}

public struct RewardSchedule: Codable, Sendable, Hashable {
    /// Node (proof-of-computing) rewards per day during the bootstrap (50,000 EMC for 60 days).
    public var bootstrapDailyReward: Amount
    public var bootstrapDays: UInt32
    /// After bootstrap: `stageDailyBase × fib(s−1)/fib(s)` per day in stage s, each `stageDays` long.
    public var stageDailyBase: Amount
    public var stageDays: UInt32
    /// Index s of the first stage after bootstrap. With fib(0)=0, fib(1)=fib(2)=1, stage 1 would pay nothing,
    /// so the default first stage is s = 2 (ratio 1/1), then 1/2, 2/3, 3/5, … → 0.618.
    public var firstStageIndex: UInt32
    public var transactionMiningPeriods: [MiningPeriod]
    /// α: transaction-mining rewards never exceed this share of the protocol fee actually paid (must be < 100%).
    public var miningFeeCapBps: UInt32

    public init(bootstrapDailyReward: Amount, bootstrapDays: UInt32, stageDailyBase: Amount, stageDays: UInt32,
                firstStageIndex: UInt32, transactionMiningPeriods: [MiningPeriod], miningFeeCapBps: UInt32) {
        self.bootstrapDailyReward = bootstrapDailyReward
        self.bootstrapDays = bootstrapDays
        self.stageDailyBase = stageDailyBase
        self.stageDays = stageDays
        self.firstStageIndex = firstStageIndex
        self.transactionMiningPeriods = transactionMiningPeriods
        self.miningFeeCapBps = miningFeeCapBps
    }

    public static let standard = RewardSchedule(
        bootstrapDailyReward: Amount(emc: 50_000), bootstrapDays: 60,
        stageDailyBase: Amount(emc: 720_000), stageDays: 90, firstStageIndex: 2,
        transactionMiningPeriods: [
            MiningPeriod(lengthDays: 180, rewardRateBps: 10_000, userShareBps: 5_000),
            MiningPeriod(lengthDays: 180, rewardRateBps: 5_000, userShareBps: 5_000),
            MiningPeriod(lengthDays: 360, rewardRateBps: 2_500, userShareBps: 4_000),
            MiningPeriod(lengthDays: 720, rewardRateBps: 1_250, userShareBps: 3_000),
        ],
        miningFeeCapBps: 5_000)

    /// Node-reward emission for chain day `day` (0 = genesis day), in base units, integer math only.
    public func dailyNodeReward(day: UInt64) -> Amount {
        if day < UInt64(bootstrapDays) { return bootstrapDailyReward }
        guard stageDays > 0 else { return .zero }
        let stage = UInt64(firstStageIndex) + (day - UInt64(bootstrapDays)) / UInt64(stageDays)
        // fib(92) is the last that fits in UInt64; the ratio has long converged (to ~1e-38) by then.
        let s = min(stage, 92)
        guard s >= 1 else { return .zero }
        let (numerator, denominator) = (Self.fibonacci(s - 1), Self.fibonacci(s))
        let product = stageDailyBase.baseUnits.multipliedFullWidth(by: numerator)
        let (quotient, _) = denominator.dividingFullWidth(product)
        return Amount(baseUnits: quotient)
    }

    /// fib(0) = 0, fib(1) = 1; n ≤ 92.
    static func fibonacci(_ n: UInt64) -> UInt64 {
        var (a, b): (UInt64, UInt64) = (0, 1)
        for _ in 0..<n { (a, b) = (b, a &+ b) }
        return a
    }

    enum CodingKeys: String, CodingKey {
        case bootstrapDailyReward = "bootstrap_daily_reward"
        case bootstrapDays = "bootstrap_days"
        case stageDailyBase = "stage_daily_base"
        case stageDays = "stage_days"
        case firstStageIndex = "first_stage_index"
        case transactionMiningPeriods = "transaction_mining_periods"
        case miningFeeCapBps = "mining_fee_cap_bps"
    }
}

/// A pool's share of the total supply.
public struct PoolShare: Codable, Sendable, Hashable {
    public var pool: Pool
    public var shareBps: UInt32

    public init(pool: Pool, shareBps: UInt32) {
        self.pool = pool
        self.shareBps = shareBps
    }

    enum CodingKeys: String, CodingKey {
        case pool
        case shareBps = "share_bps"
    }
}

/// Every economic and protocol number of the chain. All integers: amounts in base units, ratios in basis points.
public struct LedgerParameters: Codable, Sendable, Hashable {
    public var tokenName: String
    public var tokenSymbol: String
    public var decimals: UInt8
    public var totalSupply: Amount
    /// Charged on every transaction and burned (not paid to anyone): total supply falls by every fee.
    public var transferFee: Amount
    /// Pools whose genesis allocation must equal `shareBps` of the supply (18% transaction mining by default).
    public var pools: [PoolShare]
    public var staking: StakingParameters
    public var rewards: RewardSchedule
    /// Validator-set changes take effect at heights divisible by this (900 one-second blocks = 15 minutes).
    public var epochLengthBlocks: UInt64
    public var slashFractionBps: UInt32
    /// ICRC-1 TX_WINDOW: transactions are deduplicated over this much chain time.
    public var dedupWindowMillis: UInt64
    /// ICRC-1 PERMITTED_DRIFT: how far a transaction's created_at_time may run ahead of block time.
    public var permittedDriftMillis: UInt64
    public var maxMemoBytes: UInt32

    // Settlement (docs/SETTLEMENT.md)

    /// Share of every settled amount that is burned in full (nothing else is ever paid from it).
    public var protocolFeeBps: UInt32
    /// Blocks after a settlement's inclusion during which a fraud proof can revert it; the money moves after.
    public var challengeWindowBlocks: UInt64
    /// Blocks a node owner's payout is held after the challenge window (proof of computing may forfeit it).
    public var auditWindowBlocks: UInt64
    /// Blocks after an epoch ends within which its router must settle the epoch's batch; after that the router's
    /// compute nodes may settle their own router-countersigned receipts.
    public var settlementDeadlineBlocks: UInt64
    /// k: the escrow all payers together hold with one router is at most k × the router's bonded stake.
    public var routerEscrowCapMultiple: UInt32
    /// What a challenger posts with a fraud proof: returned with a reward when upheld, burned when dismissed. Also the
    /// least a router loses for an upheld challenge (its stake permitting).
    public var challengeBond: Amount

    /// Largest value any `*_blocks` settlement parameter may take (about 31 years of one-second blocks), so that a
    /// height plus any sum of them always fits in 64 bits.
    public static let maxWindowBlocks: UInt64 = 1_000_000_000

    public init(tokenName: String, tokenSymbol: String, decimals: UInt8, totalSupply: Amount, transferFee: Amount,
                pools: [PoolShare], staking: StakingParameters, rewards: RewardSchedule, epochLengthBlocks: UInt64,
                slashFractionBps: UInt32, dedupWindowMillis: UInt64, permittedDriftMillis: UInt64, maxMemoBytes: UInt32,
                protocolFeeBps: UInt32 = 500, challengeWindowBlocks: UInt64 = 600, auditWindowBlocks: UInt64 = 3_600,
                settlementDeadlineBlocks: UInt64 = 3_600, routerEscrowCapMultiple: UInt32 = 1, challengeBond: Amount = Amount(emc: 10)) {
        self.tokenName = tokenName
        self.tokenSymbol = tokenSymbol
        self.decimals = decimals
        self.totalSupply = totalSupply
        self.transferFee = transferFee
        self.pools = pools
        self.staking = staking
        self.rewards = rewards
        self.epochLengthBlocks = epochLengthBlocks
        self.slashFractionBps = slashFractionBps
        self.dedupWindowMillis = dedupWindowMillis
        self.permittedDriftMillis = permittedDriftMillis
        self.maxMemoBytes = maxMemoBytes
        self.protocolFeeBps = protocolFeeBps
        self.challengeWindowBlocks = challengeWindowBlocks
        self.auditWindowBlocks = auditWindowBlocks
        self.settlementDeadlineBlocks = settlementDeadlineBlocks
        self.routerEscrowCapMultiple = routerEscrowCapMultiple
        self.challengeBond = challengeBond
    }

    /// DESIGN.md's defaults. Pool split besides the 18% transaction-mining pool is ours and only a default.
    public static let standard = LedgerParameters(
        tokenName: "EdgeMatrix Coin", tokenSymbol: "EMC", decimals: 8,
        totalSupply: Amount(emc: 2_100_000_000),
        transferFee: Amount(baseUnits: 10_000),  // 0.0001 EMC
        pools: [PoolShare(pool: .transactionMining, shareBps: 1_800), PoolShare(pool: .nodeRewards, shareBps: 4_000),
                PoolShare(pool: .ecosystem, shareBps: 1_500)],
        staking: .standard, rewards: .standard,
        epochLengthBlocks: 900, slashFractionBps: 500,
        dedupWindowMillis: 24 * 3_600_000, permittedDriftMillis: 120_000, maxMemoBytes: 32,
        protocolFeeBps: 500, challengeWindowBlocks: 600, auditWindowBlocks: 3_600, settlementDeadlineBlocks: 3_600,
        routerEscrowCapMultiple: 1, challengeBond: Amount(emc: 10))

    /// The standard parameters with devnet timing: short epochs (20 blocks by default) and windows of half an epoch
    /// (challenge 10, audit 10 blocks), and two epochs to settle (40 blocks), so a settlement finishes in seconds.
    public static func devnet(epochLengthBlocks: UInt64 = 20) -> LedgerParameters {
        var p = LedgerParameters.standard
        p.epochLengthBlocks = max(epochLengthBlocks, 1)
        p.challengeWindowBlocks = max(p.epochLengthBlocks / 2, 1)
        p.auditWindowBlocks = p.epochLengthBlocks / 2
        p.settlementDeadlineBlocks = p.epochLengthBlocks.multipliedReportingOverflow(by: 2).overflow ? .max : p.epochLengthBlocks * 2
        return p
    }

    /// Blocks between an escrow withdrawal request and the return of the escrow: one epoch plus the challenge
    /// window, so that every batch that may still charge the escrow has been settled and can no longer be challenged.
    public var escrowWithdrawDelayBlocks: UInt64 { epochLengthBlocks.addingSaturating(challengeWindowBlocks) }

    public static let millisPerDay: UInt64 = 86_400_000

    enum CodingKeys: String, CodingKey {
        case tokenName = "token_name"
        case tokenSymbol = "token_symbol"
        case decimals
        case totalSupply = "total_supply"
        case transferFee = "transfer_fee"
        case pools, staking, rewards
        case epochLengthBlocks = "epoch_length_blocks"
        case slashFractionBps = "slash_fraction_bps"
        case dedupWindowMillis = "dedup_window_ms"
        case permittedDriftMillis = "permitted_drift_ms"
        case maxMemoBytes = "max_memo_bytes"
        case protocolFeeBps = "protocol_fee_bps"
        case challengeWindowBlocks = "challenge_window_blocks"
        case auditWindowBlocks = "audit_window_blocks"
        case settlementDeadlineBlocks = "settlement_deadline_blocks"
        case routerEscrowCapMultiple = "router_escrow_cap_multiple"
        case challengeBond = "challenge_bond"
    }
}
