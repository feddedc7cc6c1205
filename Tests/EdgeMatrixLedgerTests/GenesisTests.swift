import EdgeMatrixCore
import Foundation
@testable import EdgeMatrixLedger
import Testing

@Suite("Genesis")
struct GenesisTests {
    @Test("a devnet genesis sums to 2.1B EMC, with 378M in the transaction-mining pool")
    func devnetSupply() throws {
        let f = Fixture()
        let genesis = f.genesis
        try genesis.validate()
        #expect(genesis.parameters.totalSupply == Amount(emc: 2_100_000_000))
        let allocated = genesis.allocations.reduce(UInt64(0)) { $0 + $1.amount.baseUnits }
        let staked = genesis.validators.reduce(UInt64(0)) { $0 + $1.stake.baseUnits }
        #expect(allocated + staked == Amount(emc: 2_100_000_000).baseUnits)
        let pool = genesis.allocations.first { $0.account == Pool.transactionMining.account }
        #expect(pool?.amount == Amount(emc: 378_000_000))
        #expect(pool?.amount.description == "378000000.00000000")
        // The ledger built from it agrees.
        #expect(f.ledger.totalSupply == Amount(emc: 2_100_000_000))
        #expect(f.ledger.balance(of: Pool.transactionMining.account) == Amount(emc: 378_000_000))
        #expect(f.ledger.validators.count == 4)
        #expect(f.ledger.validators.allSatisfy { $0.power == 1_000_000 })  // 100.0000 stake power each
    }

    @Test("genesis carries every economic parameter of DESIGN.md")
    func parameters() {
        let p = LedgerParameters.standard
        #expect(p.decimals == 8 && p.tokenSymbol == "EMC")
        #expect(p.staking.validator == RoleRequirement(minimumStake: Amount(emc: 1_000_000), minimumLockDays: 360))
        #expect(p.staking.router == RoleRequirement(minimumStake: Amount(emc: 100_000), minimumLockDays: 180))
        #expect(p.staking.computeLockTiers.map { [$0.days, $0.multiplierBps] } == [[7, 14_000], [30, 27_000], [90, 62_000], [180, 100_000]])
        #expect(p.dedupWindowMillis == 24 * hour)
        #expect(p.maxMemoBytes == 32)
        #expect(p.pools.first { $0.pool == .transactionMining }?.shareBps == 1_800)
        #expect(p.rewards.bootstrapDailyReward == Amount(emc: 50_000) && p.rewards.bootstrapDays == 60)
        #expect(p.rewards.stageDailyBase == Amount(emc: 720_000) && p.rewards.stageDays == 90)
    }

    @Test("settlement parameters: defaults, the devnet's short windows, the derived withdrawal delay, JSON keys")
    func settlementParameters() throws {
        let p = LedgerParameters.standard
        #expect(p.protocolFeeBps == 500 && p.challengeWindowBlocks == 600 && p.auditWindowBlocks == 3_600)
        #expect(p.settlementDeadlineBlocks == 3_600 && p.routerEscrowCapMultiple == 1)
        #expect(p.escrowWithdrawDelayBlocks == 900 + 600)
        let d = LedgerParameters.devnet()
        #expect(d.epochLengthBlocks == 20 && d.challengeWindowBlocks == 10 && d.auditWindowBlocks == 10 && d.settlementDeadlineBlocks == 40)
        #expect(d.escrowWithdrawDelayBlocks == 30)
        // Extremes the validation allows never overflow the derived delay.
        var extreme = p
        extreme.epochLengthBlocks = LedgerParameters.maxWindowBlocks
        extreme.challengeWindowBlocks = LedgerParameters.maxWindowBlocks
        #expect(extreme.escrowWithdrawDelayBlocks == 2 * LedgerParameters.maxWindowBlocks)
        // Every new parameter is a top-level key of `parameters` in the genesis JSON, and a missing one is named.
        var genesis = Fixture().genesis
        genesis.parameters = d
        let text = String(decoding: genesis.encodedJSON(), as: UTF8.self)
        for key in ["\"protocol_fee_bps\" : 500", "\"challenge_window_blocks\" : 10", "\"audit_window_blocks\" : 10",
                    "\"settlement_deadline_blocks\" : 40", "\"router_escrow_cap_multiple\" : 1"] {
            #expect(text.contains(key), "\(key)")
        }
        #expect(try Genesis.decode(json: genesis.encodedJSON()) == genesis)
        let missing = text.replacingOccurrences(of: "\"protocol_fee_bps\" : 500,", with: "")
        let error = #expect(throws: GenesisError.self) { try Genesis.decode(json: Data(missing.utf8)) }
        #expect(error?.field == "parameters.protocol_fee_bps")
    }

    @Test("node rewards: 50,000 EMC/day for 60 days, then 720,000 × fib(s−1)/fib(s) per 90-day stage")
    func nodeRewardSchedule() {
        let r = RewardSchedule.standard
        #expect(r.dailyNodeReward(day: 0) == Amount(emc: 50_000))
        #expect(r.dailyNodeReward(day: 59) == Amount(emc: 50_000))
        // Bootstrap total: 3M EMC.
        #expect((0..<60).reduce(UInt64(0)) { $0 + r.dailyNodeReward(day: $1).baseUnits } == Amount(emc: 3_000_000).baseUnits)
        #expect(r.dailyNodeReward(day: 60) == Amount(emc: 720_000))          // s=2: 1/1
        #expect(r.dailyNodeReward(day: 149) == Amount(emc: 720_000))
        #expect(r.dailyNodeReward(day: 150) == Amount(emc: 360_000))         // s=3: 1/2
        #expect(r.dailyNodeReward(day: 240) == Amount(emc: 480_000))         // s=4: 2/3
        #expect(r.dailyNodeReward(day: 330) == Amount(emc: 432_000))         // s=5: 3/5
        #expect(r.dailyNodeReward(day: 420).description == "450000.00000000")  // s=6: 5/8
        // Far out it settles at 720,000 × 0.618… and never traps.
        #expect(r.dailyNodeReward(day: 1_000_000).description.hasPrefix("444984."))
    }

    @Test("a validator below the stake minimum is named exactly")
    func validatorBelowMinimum() {
        var genesis = Fixture().genesis
        genesis.validators[2].stake = Amount(emc: 999_999)
        #expect(throws: GenesisError.invalid(field: "validators[2].stake", reason: "below the validator minimum of 1000000.00000000 EMC")) {
            try genesis.validate()
        }
        #expect((try? genesis.validate()) == nil)
        do { try genesis.validate() } catch {
            #expect(error.description == "validators[2].stake: below the validator minimum of 1000000.00000000 EMC")
        }
    }

    typealias Mutation = @Sendable (inout Genesis) -> Void
    static let badFields: [(String, Mutation)] = [
        ("validators[1].lock_days", { g in g.validators[1].lockDays = 359 }),
        ("validators[3].node_key", { g in g.validators[3].nodeKey = g.validators[0].nodeKey }),
        ("allocations", { g in g.allocations[g.allocations.count - 1].amount = Amount(emc: 1) }),
        ("allocations[0].amount", { g in g.allocations[0].amount = Amount(emc: 377_000_000) }),
        ("chain_id", { g in g.chainID = "Bad Chain!" }),
        ("parameters.decimals", { g in g.parameters.decimals = 18 }),
        ("parameters.slash_fraction_bps", { g in g.parameters.slashFractionBps = 10_001 }),
        ("parameters.epoch_length_blocks", { g in g.parameters.epochLengthBlocks = 0 }),
        ("parameters.rewards.mining_fee_cap_bps", { g in g.parameters.rewards.miningFeeCapBps = 10_000 }),
        ("parameters.rewards.transaction_mining_periods[1].df_bps", { g in g.parameters.rewards.transactionMiningPeriods[1].userShareBps = 20_000 }),
        ("parameters.staking.compute_lock_tiers[2].days", { g in g.parameters.staking.computeLockTiers[2].days = 30 }),
        ("validators", { g in g.validators = [] }),
        ("parameters.protocol_fee_bps", { g in g.parameters.protocolFeeBps = 10_001 }),
        ("parameters.challenge_window_blocks", { g in g.parameters.challengeWindowBlocks = 0 }),
        ("parameters.challenge_window_blocks", { g in g.parameters.challengeWindowBlocks = LedgerParameters.maxWindowBlocks + 1 }),
        ("parameters.audit_window_blocks", { g in g.parameters.auditWindowBlocks = .max }),
        ("parameters.settlement_deadline_blocks", { g in g.parameters.settlementDeadlineBlocks = 0 }),
        ("parameters.router_escrow_cap_multiple", { g in g.parameters.routerEscrowCapMultiple = 0 }),
        ("parameters.epoch_length_blocks", { g in g.parameters.epochLengthBlocks = .max }),
    ]

    @Test("bad fields are named exactly", arguments: badFields)
    func namesField(field: String, mutate: @Sendable (inout Genesis) -> Void) {
        var genesis = Fixture().genesis
        mutate(&genesis)
        #expect(throws: GenesisError.self) { try genesis.validate() }
        do { try genesis.validate() } catch { #expect(error.field == field, "\(error)") }
    }

    @Test("allocations that do not sum to the supply say by how much")
    func allocationsNotSummingToSupply() {
        var genesis = Fixture().genesis
        genesis.allocations.removeLast()
        do {
            try genesis.validate()
            Issue.record("accepted a genesis short of the supply")
        } catch {
            #expect(error.field == "allocations")
            #expect(error.description.contains("not the total supply of 2100000000.00000000 EMC"))
        }
    }

    @Test("JSON round trip; amounts are 8-decimal strings; malformed JSON names the field")
    func json() throws {
        let genesis = Fixture().genesis
        let data = genesis.encodedJSON()
        let text = String(decoding: data, as: UTF8.self)
        #expect(text.contains("\"total_supply\" : \"2100000000.00000000\""))
        #expect(text.contains("\"chain_id\" : \"emc-test\""))
        #expect(try Genesis.decode(json: data) == genesis)

        let broken = text.replacingOccurrences(of: "\"total_supply\" : \"2100000000.00000000\"", with: "\"total_supply\" : 2100000000")
        #expect(throws: GenesisError.self) { try Genesis.decode(json: Data(broken.utf8)) }
        do { _ = try Genesis.decode(json: Data(broken.utf8)) } catch { #expect(error.field == "parameters.total_supply") }

        // Valid JSON but an invalid genesis is refused too.
        var bad = genesis
        bad.validators[0].stake = Amount(emc: 5)
        do { _ = try Genesis.decode(json: bad.encodedJSON()) } catch { #expect(error.field == "validators[0].stake") }
    }
}
