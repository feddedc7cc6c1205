import EdgeMatrixCore
@testable import EdgeMatrixLedger
import Testing

@Suite("Staking, validator set and slashing")
struct StakingTests {
    @Test("stake power: validator amt·100/1M, router amt·10/100k, compute by lock multiplier, integers only")
    func stakePowerMath() {
        let s = StakingParameters.standard
        #expect(StakePower.of(role: .validator, amount: Amount(emc: 1_000_000), lockDays: 360, staking: s).description == "100.0000")
        #expect(StakePower.of(role: .validator, amount: Amount(emc: 1_500_000), lockDays: 360, staking: s).description == "150.0000")
        #expect(StakePower.of(role: .validator, amount: emc("1000000.99999999"), lockDays: 360, staking: s).scaled == 1_000_000)  // truncates
        #expect(StakePower.of(role: .router, amount: Amount(emc: 100_000), lockDays: 180, staking: s).description == "10.0000")
        #expect(StakePower.of(role: .router, amount: Amount(emc: 250_000), lockDays: 180, staking: s).description == "25.0000")
        let compute = { (days: UInt32) in StakePower.of(role: .compute, amount: Amount(emc: 100_000), lockDays: days, staking: s).description }
        #expect(compute(7) == "14.0000")    // 1.4×
        #expect(compute(29) == "14.0000")
        #expect(compute(30) == "27.0000")   // 2.7×
        #expect(compute(90) == "62.0000")   // 6.2×
        #expect(compute(180) == "100.0000") // 10×
        #expect(compute(400) == "100.0000")
        #expect(StakePower.of(role: .compute, amount: emc("123.45678901"), lockDays: 30, staking: s).description == "0.0333")
        // The whole supply staked does not overflow: 2.1e9 × 10/100,000 × 10 = 2,100,000.0000.
        #expect(StakePower.of(role: .compute, amount: Amount(emc: 2_100_000_000), lockDays: 180, staking: s).description == "2100000.0000")
    }

    @Test("bonding enforces each role's minimum stake and lock")
    func minimums() {
        var f = Fixture()
        let root = f.ledger.stateRoot()
        let cases: [(Bond, LedgerError)] = [
            (Bond(role: .validator, amount: emc("999999.99999999"), lockDays: 360),
             .stakeBelowMinimum(role: .validator, minimum: Amount(emc: 1_000_000), got: emc("999999.99999999"))),
            (Bond(role: .validator, amount: Amount(emc: 1_000_000), lockDays: 359), .lockTooShort(role: .validator, minimumDays: 360, got: 359)),
            (Bond(role: .router, amount: Amount(emc: 99_999), lockDays: 180),
             .stakeBelowMinimum(role: .router, minimum: Amount(emc: 100_000), got: Amount(emc: 99_999))),
            (Bond(role: .router, amount: Amount(emc: 100_000), lockDays: 179), .lockTooShort(role: .router, minimumDays: 180, got: 179)),
            (Bond(role: .compute, amount: Amount(emc: 1_000), lockDays: 6), .lockTooShort(role: .compute, minimumDays: 7, got: 6)),
            (Bond(role: .validator, amount: Amount(emc: 20_000_000), lockDays: 360), .insufficientFunds(balance: Amount(emc: 10_000_000))),
        ]
        for (bond, expected) in cases {
            #expect(f.ledger.apply(f.tx(f.alice, .bond(bond)), context: BlockContext(height: 1, timeMillis: f.now)).failure == expected)
        }
        #expect(f.ledger.stateRoot() == root)
        let ok = f.submit(f.tx(f.alice, .bond(Bond(role: .router, amount: Amount(emc: 100_000), lockDays: 180))))
        guard case .bonded(let id) = ok.value?.effect else { Issue.record("bond failed: \(ok)"); return }
        let stake = f.ledger.stake(id: id)!
        #expect(stake.owner == Account(owner: f.alice.publicKey) && stake.status == .bonded)
        #expect(stake.unlocksAtMillis == stake.bondedAtMillis + 180 * day)
        #expect(f.ledger.balance(of: Account(owner: f.alice.publicKey)) == Amount(baseUnits: Amount(emc: 9_900_000).baseUnits - f.fee.baseUnits))
    }

    @Test("unbond, then withdraw only after the lock ends; only the owner may do either")
    func lockPeriods() throws {
        var f = Fixture()
        let bond = try f.submit(f.tx(f.alice, .bond(Bond(role: .compute, amount: Amount(emc: 1_000), lockDays: 7)))).get()
        guard case .bonded(let id) = bond.effect else { Issue.record("not bonded"); return }
        #expect(f.submit(f.tx(f.alice, .withdraw(stakeID: id))).failure == .stakeNotUnbonded(id: id))
        #expect(f.submit(f.tx(f.bob, .unbond(stakeID: id))).failure == .notStakeOwner(id: id))
        #expect(f.submit(f.tx(f.alice, .unbond(stakeID: 999))).failure == .unknownStake(id: 999))
        let unbond = try f.submit(f.tx(f.alice, .unbond(stakeID: id))).get()
        let unlocksAt = f.ledger.stake(id: id)!.unlocksAtMillis
        #expect(unbond.effect == .unbonded(stakeID: id, withdrawableAtMillis: unlocksAt))
        #expect(f.ledger.stake(id: id)!.power(f.ledger.parameters.staking) == .zero)
        #expect(f.submit(f.tx(f.alice, .unbond(stakeID: id))).failure == .stakeNotBonded(id: id))
        #expect(f.submit(f.tx(f.alice, .withdraw(stakeID: id))).failure == .stakeLocked(id: id, unlocksAtMillis: unlocksAt))
        f.now = unlocksAt - 1
        #expect(f.submit(f.tx(f.alice, .withdraw(stakeID: id))).failure == .stakeLocked(id: id, unlocksAtMillis: unlocksAt))
        f.now = unlocksAt
        let before = f.ledger.balance(of: Account(owner: f.alice.publicKey))
        #expect(f.submit(f.tx(f.bob, .withdraw(stakeID: id))).failure == .notStakeOwner(id: id))
        #expect(f.submit(f.tx(f.alice, .withdraw(stakeID: id))).value != nil)
        #expect(f.ledger.stake(id: id) == nil)
        #expect(f.ledger.balance(of: Account(owner: f.alice.publicKey)).baseUnits == before.baseUnits + Amount(emc: 1_000).baseUnits - f.fee.baseUnits)
    }

    /// Bonds a validator stake for `owner`, registers `nodeKey` on it; returns the stake id.
    func joinAsValidator(_ f: inout Fixture, owner: SigningKey, nodeKey: SigningKey, amount: Amount = Amount(emc: 1_000_000)) throws -> UInt64 {
        let bond = try f.submit(f.tx(owner, .bond(Bond(role: .validator, amount: amount, lockDays: 360)))).get()
        guard case .bonded(let id) = bond.effect else { throw LedgerError.unknownStake(id: 0) }
        let statement = NodeRegistrationStatement(chainID: Fixture.chainID, owner: owner.publicKey, nodeKey: nodeKey.publicKey,
                                                  role: .validator, endpoints: ["https://v.example:26656"], stakeID: id)
        _ = try f.submit(f.tx(owner, .registerNode(NodeRegistration(statement: statement, nodeKey: nodeKey)))).get()
        return id
    }

    @Test("a new validator joins only at the next epoch boundary, with its stake power")
    func epochBoundaryJoin() throws {
        var f = Fixture(epochLength: 10)
        let newNode = testKey(50)
        _ = try joinAsValidator(&f, owner: f.alice, nodeKey: newNode, amount: Amount(emc: 2_000_000))
        #expect(f.height == 2)
        #expect(!f.ledger.validators.contains { $0.nodeKey == newNode.publicKey })
        // Blocks 3…9 change nothing; block 10 (the boundary) reports the change.
        var updates = [StakedValidator]()
        for _ in 3...9 { updates += f.block().validatorUpdates }
        #expect(updates.isEmpty)
        #expect(!f.ledger.validators.contains { $0.nodeKey == newNode.publicKey })
        let boundary = f.block()
        #expect(f.height == 10)
        #expect(boundary.validatorUpdates == [StakedValidator(nodeKey: newNode.publicKey, power: 2_000_000)])
        #expect(f.ledger.validators.count == 5)
    }

    @Test("a retired validator leaves at the next epoch boundary; its stake can then unbond")
    func epochBoundaryLeave() throws {
        var f = Fixture(epochLength: 5)
        let leaving = f.nodeKeys[1]
        let owner = f.ownerKeys[1]
        let stakeID = f.ledger.node(leaving.publicKey)!.stakeID
        #expect(f.submit(f.tx(owner, .unbond(stakeID: stakeID))).failure == .stakeInUse(id: stakeID, nodeKey: leaving.publicKey))
        #expect(f.submit(f.tx(owner, .retireNode(nodeKey: leaving.publicKey))).value != nil)
        #expect(f.ledger.validators.contains { $0.nodeKey == leaving.publicKey })  // still in force
        let updates = f.runToEpochBoundary()
        #expect(updates == [StakedValidator(nodeKey: leaving.publicKey, power: 0)])
        #expect(f.ledger.validators.count == 3)
        #expect(f.submit(f.tx(owner, .unbond(stakeID: stakeID))).value != nil)
    }

    @Test("the validator set never becomes empty")
    func neverEmpty() {
        var f = Fixture(validatorCount: 1, epochLength: 3)
        #expect(f.submit(f.tx(f.ownerKeys[0], .retireNode(nodeKey: f.nodeKeys[0].publicKey))).value != nil)
        #expect(f.runToEpochBoundary().isEmpty)
        #expect(f.ledger.validators.map(\.nodeKey) == [f.nodeKeys[0].publicKey])
    }

    @Test("slashing burns the genesis fraction of the offender's stake, once per evidence; it leaves at the next epoch")
    func slashing() {
        var f = Fixture(epochLength: 5)
        let offender = f.nodeKeys[2].publicKey
        let stakeID = f.ledger.node(offender)!.stakeID
        let supply = f.ledger.totalSupply
        let evidence = Hash32.of(Array("two precommits at height 3 round 0".utf8))
        let block = f.block(misbehaviour: [Misbehaviour(validator: offender, evidenceID: evidence)])
        // 5% of 1,000,000 EMC.
        #expect(block.slashes.first?.value?.slashed == Amount(emc: 50_000))
        #expect(f.ledger.stake(id: stakeID)!.amount == Amount(emc: 950_000))
        #expect(f.ledger.totalSupply == Amount(baseUnits: supply.baseUnits - Amount(emc: 50_000).baseUnits))
        // The same evidence again slashes nothing.
        let again = f.block(misbehaviour: [Misbehaviour(validator: offender, evidenceID: evidence)])
        #expect(again.slashes.first?.failure == .evidenceAlreadyUsed(evidence))
        #expect(f.ledger.stake(id: stakeID)!.amount == Amount(emc: 950_000))
        // Below the validator minimum now: removed at the boundary, not before.
        #expect(f.ledger.validators.contains { $0.nodeKey == offender })
        #expect(f.runToEpochBoundary() == [StakedValidator(nodeKey: offender, power: 0)])
        // Unknown validators are reported, not trapped on.
        #expect(f.ledger.slash(validator: f.alice.publicKey, fractionBps: 500).failure == .unknownValidator(nodeKey: f.alice.publicKey))
    }

    @Test("a well-staked validator that is slashed stays, with less power")
    func slashedButAboveMinimum() throws {
        var f = Fixture(epochLength: 10)
        let node = testKey(60)
        _ = try joinAsValidator(&f, owner: f.alice, nodeKey: node, amount: Amount(emc: 4_000_000))
        #expect(f.runToEpochBoundary() == [StakedValidator(nodeKey: node.publicKey, power: 4_000_000)])
        #expect(f.ledger.slash(validator: node.publicKey, fractionBps: 2_500).value?.remaining == Amount(emc: 3_000_000))
        #expect(f.runToEpochBoundary() == [StakedValidator(nodeKey: node.publicKey, power: 3_000_000)])
    }

    @Test("at most max_validators validators, highest stake power first")
    func maxValidators() throws {
        var f = Fixture(validatorCount: 4, epochLength: 10) { $0.staking.maxValidators = 4 }
        let big = testKey(70)
        _ = try joinAsValidator(&f, owner: f.alice, nodeKey: big, amount: Amount(emc: 3_000_000))
        let updates = f.runToEpochBoundary()
        // The newcomer with 3M enters; of the four equal 1M genesis validators, the tie-break (lowest node key
        // first) drops the one with the highest key.
        let dropped = f.nodeKeys.map(\.publicKey).max { $0.rawRepresentation.lexicographicallyPrecedes($1.rawRepresentation) }!
        #expect(Set(updates) == [StakedValidator(nodeKey: big.publicKey, power: 3_000_000), StakedValidator(nodeKey: dropped, power: 0)])
        #expect(f.ledger.validators.count == 4)
    }
}
