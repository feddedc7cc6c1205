import EdgeMatrixCore
import Foundation

/// A validator present from block 1: its node key (which signs consensus messages), the account that owns
/// its stake, and the stake, bonded at genesis time for `lockDays`.
public struct GenesisValidator: Codable, Sendable, Hashable {
    public var nodeKey: PublicKey
    public var owner: Account
    public var stake: Amount
    public var lockDays: UInt32
    public var endpoints: [String]

    public init(nodeKey: PublicKey, owner: Account, stake: Amount, lockDays: UInt32, endpoints: [String] = []) {
        self.nodeKey = nodeKey
        self.owner = owner
        self.stake = stake
        self.lockDays = lockDays
        self.endpoints = endpoints
    }

    enum CodingKeys: String, CodingKey {
        case nodeKey = "node_key"
        case owner, stake
        case lockDays = "lock_days"
        case endpoints
    }
}

public struct GenesisAllocation: Codable, Sendable, Hashable {
    public var account: Account
    public var amount: Amount
    /// Free text for people reading the file ("pool:transaction-mining", "faucet", …); not interpreted.
    public var label: String?

    public init(account: Account, amount: Amount, label: String? = nil) {
        self.account = account
        self.amount = amount
        self.label = label
    }
}

public enum GenesisError: Error, Equatable, Sendable, CustomStringConvertible {
    /// `field` is the JSON path of the offending value, e.g. `validators[2].stake`.
    case invalid(field: String, reason: String)
    case malformedJSON(field: String, reason: String)

    public var field: String {
        switch self {
        case .invalid(let field, _), .malformedJSON(let field, _): field
        }
    }

    public var description: String {
        switch self {
        case .invalid(let field, let reason): "\(field): \(reason)"
        case .malformedJSON(let field, let reason): "genesis JSON \(field.isEmpty ? "" : "at \(field) ")is malformed: \(reason)"
        }
    }
}

/// The genesis file: everything a validator needs to build block 0's state. JSON keys are snake_case;
/// amounts are EMC strings with up to 8 decimals; keys are hex; accounts are ICRC-1 text.
public struct Genesis: Codable, Sendable, Hashable {
    public var chainID: String
    public var genesisTimeMillis: UInt64
    public var parameters: LedgerParameters
    public var validators: [GenesisValidator]
    public var allocations: [GenesisAllocation]

    public init(chainID: String, genesisTimeMillis: UInt64, parameters: LedgerParameters = .standard,
                validators: [GenesisValidator], allocations: [GenesisAllocation]) {
        self.chainID = chainID
        self.genesisTimeMillis = genesisTimeMillis
        self.parameters = parameters
        self.validators = validators
        self.allocations = allocations
    }

    enum CodingKeys: String, CodingKey {
        case chainID = "chain_id"
        case genesisTimeMillis = "genesis_time_ms"
        case parameters, validators, allocations
    }

    // MARK: Devnet

    /// A devnet validator: its node key and the key owning its stake.
    public struct DevnetValidator: Sendable, Hashable {
        public var nodeKey: PublicKey
        public var owner: PublicKey
        public var endpoints: [String]
        public init(nodeKey: PublicKey, owner: PublicKey, endpoints: [String] = []) {
            self.nodeKey = nodeKey
            self.owner = owner
            self.endpoints = endpoints
        }
    }

    /// A devnet genesis with standard parameters: each validator bonds exactly the validator minimum for the
    /// minimum lock and gets `validatorBalance` for fees; each funded account gets `fundedAmount`; pools get
    /// their shares; the treasury pool takes the rest, so everything sums to the supply.
    public static func devnet(chainID: String = "emc-devnet", genesisTimeMillis: UInt64,
                              validators: [DevnetValidator], fundedAccounts: [Account] = [],
                              fundedAmount: Amount = Amount(emc: 10_000_000),
                              validatorBalance: Amount = Amount(emc: 1_000),
                              parameters: LedgerParameters = .standard) -> Genesis {
        let requirement = parameters.staking.validator
        let genesisValidators = validators.map {
            GenesisValidator(nodeKey: $0.nodeKey, owner: Account(owner: $0.owner), stake: requirement.minimumStake,
                             lockDays: requirement.minimumLockDays, endpoints: $0.endpoints)
        }
        var allocations = parameters.pools.map {
            GenesisAllocation(account: $0.pool.account, amount: parameters.share(of: $0.shareBps), label: "pool:\($0.pool.rawValue)")
        }
        allocations += validators.map { GenesisAllocation(account: Account(owner: $0.owner), amount: validatorBalance, label: "validator owner") }
        allocations += fundedAccounts.map { GenesisAllocation(account: $0, amount: fundedAmount, label: "devnet funded") }
        let used = allocations.reduce(UInt64(0)) { $0 + $1.amount.baseUnits }
            + genesisValidators.reduce(UInt64(0)) { $0 + $1.stake.baseUnits }
        let rest = parameters.totalSupply.baseUnits >= used ? parameters.totalSupply.baseUnits - used : 0
        allocations.append(GenesisAllocation(account: Pool.treasury.account, amount: Amount(baseUnits: rest), label: "pool:treasury (remainder)"))
        return Genesis(chainID: chainID, genesisTimeMillis: genesisTimeMillis, parameters: parameters,
                       validators: genesisValidators, allocations: allocations)
    }

    // MARK: JSON

    public static func decode(json: Data) throws(GenesisError) -> Genesis {
        let genesis: Genesis
        do { genesis = try JSONDecoder().decode(Genesis.self, from: json) } catch let error as Swift.DecodingError {
            throw Self.describe(error)
        } catch {
            throw .malformedJSON(field: "", reason: "\(error)")
        }
        try genesis.validate()
        return genesis
    }

    public func encodedJSON() -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return try! encoder.encode(self)  // every field encodes to plain strings and integers
    }

    private static func describe(_ error: Swift.DecodingError) -> GenesisError {
        func path(_ keys: [any CodingKey]) -> String {
            keys.reduce("") { text, key in
                if let index = key.intValue { return "\(text)[\(index)]" }
                return text.isEmpty ? key.stringValue : "\(text).\(key.stringValue)"
            }
        }
        switch error {
        case .keyNotFound(let key, let context):
            let parent = path(context.codingPath)
            return .malformedJSON(field: parent.isEmpty ? key.stringValue : "\(parent).\(key.stringValue)", reason: "missing field '\(key.stringValue)'")
        case .typeMismatch(_, let context), .valueNotFound(_, let context), .dataCorrupted(let context):
            return .malformedJSON(field: path(context.codingPath), reason: context.debugDescription)
        @unknown default:
            return .malformedJSON(field: "", reason: "\(error)")
        }
    }

    // MARK: Validation

    /// Checks every rule a genesis must satisfy; the error names the exact field.
    public func validate() throws(GenesisError) {
        func fail(_ field: String, _ reason: String) -> GenesisError { .invalid(field: field, reason: reason) }
        let p = parameters

        guard !chainID.isEmpty, chainID.utf8.count <= 64,
              chainID.unicodeScalars.allSatisfy({ ("a"..."z").contains($0) || ("0"..."9").contains($0) || $0 == "-" || $0 == "_" || $0 == "." })
        else { throw fail("chain_id", "must be 1 to 64 characters of a-z, 0-9, '-', '_' or '.'") }

        guard !p.tokenName.isEmpty else { throw fail("parameters.token_name", "must not be empty") }
        guard !p.tokenSymbol.isEmpty else { throw fail("parameters.token_symbol", "must not be empty") }
        guard Int(p.decimals) == Amount.decimals else {
            throw fail("parameters.decimals", "must be \(Amount.decimals): every amount in EdgeMatrix has 8 decimals")
        }
        guard p.totalSupply > .zero else { throw fail("parameters.total_supply", "must be positive") }
        guard p.transferFee < p.totalSupply else { throw fail("parameters.transfer_fee", "must be below the total supply") }
        guard p.epochLengthBlocks > 0 else { throw fail("parameters.epoch_length_blocks", "must be at least 1") }
        guard p.slashFractionBps <= 10_000 else { throw fail("parameters.slash_fraction_bps", "must be at most 10000 (100%)") }
        guard p.dedupWindowMillis > 0 else { throw fail("parameters.dedup_window_ms", "must be positive") }
        guard p.maxMemoBytes >= 32, p.maxMemoBytes <= UInt32(TransactionLimits.maxMemoBytes) else {
            throw fail("parameters.max_memo_bytes", "must be between 32 (ICRC-1's minimum) and \(TransactionLimits.maxMemoBytes)")
        }

        // Settlement
        guard p.protocolFeeBps <= 10_000 else { throw fail("parameters.protocol_fee_bps", "must be at most 10000 (100%)") }
        let maxBlocks = LedgerParameters.maxWindowBlocks
        guard p.epochLengthBlocks <= maxBlocks else { throw fail("parameters.epoch_length_blocks", "must be at most \(maxBlocks)") }
        for (field, value, minimum) in [("challenge_window_blocks", p.challengeWindowBlocks, UInt64(1)),
                                        ("audit_window_blocks", p.auditWindowBlocks, 0),
                                        ("settlement_deadline_blocks", p.settlementDeadlineBlocks, 1)] {
            guard value >= minimum, value <= maxBlocks else {
                throw fail("parameters.\(field)", "must be between \(minimum) and \(maxBlocks) blocks")
            }
        }
        guard p.challengeBond > .zero else {
            throw fail("parameters.challenge_bond", "must be more than 0: a free challenge would let anyone stall settlements at no cost")
        }
        guard p.routerEscrowCapMultiple >= 1 else {
            throw fail("parameters.router_escrow_cap_multiple", "must be at least 1: a router may hold escrow up to this many times its bonded stake")
        }

        // Pools
        var poolTotal: UInt64 = 0
        var seenPools = Set<Pool>()
        for (i, share) in p.pools.enumerated() {
            guard seenPools.insert(share.pool).inserted else { throw fail("parameters.pools[\(i)].pool", "pool '\(share.pool.rawValue)' is listed twice") }
            poolTotal += UInt64(share.shareBps)
        }
        guard poolTotal <= 10_000 else { throw fail("parameters.pools", "shares add up to \(poolTotal) bps, more than 10000 (100%)") }

        // Staking
        for role in NodeRole.allCases {
            let r = p.staking.requirement(for: role)
            guard r.minimumStake > .zero else { throw fail("parameters.staking.\(role).minimum_stake", "must be positive") }
            guard r.minimumLockDays > 0 else { throw fail("parameters.staking.\(role).minimum_lock_days", "must be at least 1") }
        }
        let tiers = p.staking.computeLockTiers
        guard !tiers.isEmpty else { throw fail("parameters.staking.compute_lock_tiers", "needs at least one tier") }
        for (i, tier) in tiers.enumerated() {
            let field = "parameters.staking.compute_lock_tiers[\(i)]"
            guard tier.multiplierBps >= 10_000 else { throw fail("\(field).multiplier_bps", "must be at least 10000 (1×)") }
            if i > 0 {
                guard tier.days > tiers[i - 1].days else { throw fail("\(field).days", "tiers must be in strictly ascending order of days") }
                guard tier.multiplierBps >= tiers[i - 1].multiplierBps else { throw fail("\(field).multiplier_bps", "a longer lock must not lower the multiplier") }
            }
        }
        guard tiers[0].days <= p.staking.compute.minimumLockDays else {
            throw fail("parameters.staking.compute.minimum_lock_days", "is below the first lock tier (\(tiers[0].days) days), which would leave such stakes without a multiplier")
        }
        guard p.staking.maxValidators > 0 else { throw fail("parameters.staking.max_validators", "must be at least 1") }

        // Rewards
        let r = p.rewards
        guard r.stageDays > 0 else { throw fail("parameters.rewards.stage_days", "must be at least 1") }
        guard r.firstStageIndex >= 1 else { throw fail("parameters.rewards.first_stage_index", "must be at least 1") }
        guard !r.transactionMiningPeriods.isEmpty else { throw fail("parameters.rewards.transaction_mining_periods", "needs at least one period") }
        for (i, period) in r.transactionMiningPeriods.enumerated() {
            let field = "parameters.rewards.transaction_mining_periods[\(i)]"
            guard period.lengthDays > 0 else { throw fail("\(field).length_days", "must be at least 1") }
            guard period.rewardRateBps <= 10_000 else { throw fail("\(field).p_bps", "must be at most 10000 (100%)") }
            guard period.userShareBps <= 10_000 else { throw fail("\(field).df_bps", "must be at most 10000 (100%)") }
        }
        guard r.miningFeeCapBps < 10_000 else {
            throw fail("parameters.rewards.mining_fee_cap_bps", "must be below 10000: rewards above the fee paid make self-dealing profitable")
        }

        // Validators
        guard !validators.isEmpty else { throw fail("validators", "at least one validator is needed to produce blocks") }
        var nodeKeys = [PublicKey: Int]()
        var total: UInt64 = 0
        for (i, v) in validators.enumerated() {
            let field = "validators[\(i)]"
            if let first = nodeKeys[v.nodeKey] { throw fail("\(field).node_key", "duplicate of validators[\(first)].node_key") }
            nodeKeys[v.nodeKey] = i
            guard v.stake >= p.staking.validator.minimumStake else {
                throw fail("\(field).stake", "below the validator minimum of \(p.staking.validator.minimumStake) EMC")
            }
            guard v.lockDays >= p.staking.validator.minimumLockDays else {
                throw fail("\(field).lock_days", "below the validator minimum lock of \(p.staking.validator.minimumLockDays) days")
            }
            if let problem = NodeRegistrationStatement.endpointProblem(v.endpoints) { throw fail("\(field).endpoints", problem) }
            let (sum, overflow) = total.addingReportingOverflow(v.stake.baseUnits)
            guard !overflow else { throw fail("\(field).stake", "stakes overflow the amount range") }
            total = sum
        }

        // Allocations
        var seenAccounts = [Account: Int]()
        for (i, a) in allocations.enumerated() {
            let field = "allocations[\(i)]"
            if let first = seenAccounts[a.account] { throw fail("\(field).account", "duplicate of allocations[\(first)].account; merge them") }
            seenAccounts[a.account] = i
            guard a.amount > .zero else { throw fail("\(field).amount", "must be positive") }
            guard a.account != .minting else { throw fail("\(field).account", "is the minting account; funds sent there are burned") }
            let (sum, overflow) = total.addingReportingOverflow(a.amount.baseUnits)
            guard !overflow else { throw fail("\(field).amount", "allocations overflow the amount range") }
            total = sum
        }
        for share in p.pools {
            let expected = p.share(of: share.shareBps)
            guard let i = allocations.firstIndex(where: { $0.account == share.pool.account }) else {
                throw fail("allocations", "no allocation to the \(share.pool.rawValue) pool account \(share.pool.account); it must receive \(expected) EMC")
            }
            guard allocations[i].amount == expected else {
                throw fail("allocations[\(i)].amount", "the \(share.pool.rawValue) pool must receive \(share.shareBps) bps of the supply = \(expected) EMC, not \(allocations[i].amount) EMC")
            }
        }
        guard total == p.totalSupply.baseUnits else {
            throw fail("allocations", "allocations plus validator stakes sum to \(Amount(baseUnits: total)) EMC, not the total supply of \(p.totalSupply) EMC")
        }
    }
}

extension LedgerParameters {
    /// `bps` basis points of the total supply, rounded down.
    public func share(of bps: UInt32) -> Amount {
        let product = totalSupply.baseUnits.multipliedFullWidth(by: UInt64(min(bps, 10_000)))  // validate() rejects > 10000
        return Amount(baseUnits: UInt64(10_000).dividingFullWidth(product).quotient)
    }
}
