import EdgeMatrixApplication
import EdgeMatrixConsensus
import EdgeMatrixCore
import EdgeMatrixLedger

/// The real chain application inside the simulation: values are `ChainBlock`s, every node validates proposals with
/// the validators' own `BlockRules` (height, time window, proposer, evidence at its own height, execution) against
/// its own `LedgerState`, commits execute on that ledger, state roots are the ledger's, equivocation evidence goes
/// into later blocks and slashes, and stake changes reach the engines at epoch boundaries.
final class SimulatedLedger {
    static let chainID = "emc-sim"
    static let genesisTime: UInt64 = 1_750_000_000_000
    static let epochLength: UInt64 = 4

    struct NodeState {
        /// Durable: the ledger after the last committed block (what a restart resumes from).
        var ledger: LedgerState
        /// The validator set and block time of each committed height, for evidence checks.
        var sets: [Height: ValidatorSet]
        var times: [Height: UInt64] = [:]
        /// Validator updates the last committed block decided (they take effect two heights later).
        var lastUpdates: [ValidatorUpdate] = []
        /// Volatile: equivocation evidence waiting for a block; lost on a crash, as in a real node.
        var evidencePool: [Hash32: DuplicateVoteEvidence] = [:]
    }

    let genesis: Genesis
    let rules = BlockRules(chainID: SimulatedLedger.chainID)
    let clients: [SigningKey]
    let owners: [SigningKey]
    let nodeKeys: [SigningKey]
    var states: [NodeState]
    /// Stake changes the scenario asks for: (node, extra stake in minimum stakes).
    let powerChange: (node: Int, power: UInt64)?
    private(set) var transfersProposed = 0
    private(set) var evidenceCommitted = 0

    init(nodeKeys: [SigningKey], powers: [UInt64], powerChange: (node: Int, power: UInt64)?, seed: UInt64) {
        self.nodeKeys = nodeKeys
        self.powerChange = powerChange
        func key(_ i: UInt64) -> SigningKey {
            var mix = SeededRandom(seed: seed &* 31 &+ i)
            return try! SigningKey(seed: (0..<4).flatMap { _ in withUnsafeBytes(of: mix.next().bigEndian, Array.init) })
        }
        let owners = nodeKeys.indices.map { key(1_000 + UInt64($0)) }
        let clients = (0..<4).map { key(2_000 + UInt64($0)) }
        self.owners = owners
        self.clients = clients
        var parameters = LedgerParameters.standard
        parameters.epochLengthBlocks = Self.epochLength
        let minimum = parameters.staking.validator.minimumStake
        var genesis = Genesis.devnet(
            chainID: Self.chainID, genesisTimeMillis: Self.genesisTime,
            validators: nodeKeys.indices.map { .init(nodeKey: nodeKeys[$0].publicKey, owner: owners[$0].publicKey) },
            fundedAccounts: clients.map { Account(owner: $0.publicKey) },
            validatorBalance: Amount(baseUnits: minimum.baseUnits * 10), parameters: parameters)
        // Voting power in proportion to the scenario's powers: stake = power × minimum (the treasury pays for it).
        var extra: UInt64 = 0
        for i in genesis.validators.indices {
            genesis.validators[i].stake = Amount(baseUnits: minimum.baseUnits * powers[i])
            extra += minimum.baseUnits * (powers[i] - 1)
        }
        let last = genesis.allocations.count - 1
        genesis.allocations[last].amount = Amount(baseUnits: genesis.allocations[last].amount.baseUnits - extra)
        self.genesis = genesis
        let ledger = try! LedgerState(genesis: genesis)
        let set = try! ValidatorSet(ledger.validators.map { (publicKey: $0.nodeKey, votingPower: $0.power) })
        states = Array(repeating: NodeState(ledger: ledger, sets: [1: set]), count: nodeKeys.count)
    }

    var genesisValidators: ValidatorSet { states[0].sets[1]! }

    private func history(_ i: Int, engineHeight: Height, engineValidators: ValidatorSet) -> ChainHistory {
        let sets = states[i].sets, times = states[i].times
        return ChainHistory(validatorsAt: { $0 == engineHeight ? engineValidators : sets[$0] }, timeAt: { times[$0] })
    }

    // MARK: Values

    /// A block node `i` proposes at virtual time `now`: some client transfers, the stake change when due, and the
    /// admissible evidence from its pool. An invalid one (Byzantine) has the wrong height.
    func propose(_ i: Int, height: Height, now: UInt64, valid: Bool, engineValidators: ValidatorSet,
                 rng: inout Xoshiro256) -> [UInt8] {
        let ledger = states[i].ledger
        let time = max(Self.genesisTime + now, ledger.lastBlockTimeMillis + 1)
        var txs = [[UInt8]]()
        for _ in 0..<rng.int(0...2) {
            let from = rng.pick(clients), to = rng.pick(clients)
            let amount = Amount(baseUnits: UInt64(rng.int(1...1_000_000)))
            txs.append(Transaction(signing: TransactionBody(chainID: Self.chainID, createdAtMillis: time - UInt64(rng.int(0...500)),
                                                            kind: .transfer(Transfer(to: Account(owner: to.publicKey), amount: amount,
                                                                                     memo: nil))), with: from).encoded)
            transfersProposed += 1
        }
        txs += stakeChange(ledger: ledger, height: height, time: time)
        let (evidence, _) = rules.admissibleEvidence(Array(states[i].evidencePool.values), height: height, time: time, ledger: ledger,
                                                     history: history(i, engineHeight: height, engineValidators: engineValidators))
        let block = ChainBlock(height: valid ? height : height + 7, timeMillis: time, proposer: nodeKeys[i].nodeID,
                               transactions: txs, evidence: evidence)
        return block.canonicalBytes
    }

    /// The scenario's power change as real transactions: at height 2 the owner bonds a bigger stake, at height 3 it
    /// moves its node onto it; the next epoch boundary changes the validator set.
    private func stakeChange(ledger: LedgerState, height: Height, time: UInt64) -> [[UInt8]] {
        guard let change = powerChange else { return [] }
        let owner = owners[change.node]
        let minimum = genesis.parameters.staking.validator
        switch height {
        case 2 where ledger.stakes(ownedBy: owner.publicKey).count == 1:
            return [Transaction(signing: TransactionBody(chainID: Self.chainID, createdAtMillis: time, kind: .bond(Bond(
                role: .validator, amount: Amount(baseUnits: minimum.minimumStake.baseUnits * change.power),
                lockDays: minimum.minimumLockDays))), with: owner).encoded]
        case 3...:
            let stakes = ledger.stakes(ownedBy: owner.publicKey)
            guard stakes.count == 2, let newest = stakes.last,
                  ledger.node(nodeKeys[change.node].publicKey)?.stakeID != newest.id else { return [] }
            return [Transaction(signing: TransactionBody(chainID: Self.chainID, createdAtMillis: time, kind: .updateNode(NodeUpdate(
                nodeKey: nodeKeys[change.node].publicKey, stakeID: newest.id))), with: owner).encoded]
        default:
            return []
        }
    }

    /// Node `i`'s verdict on a proposal, by the validators' own rules.
    func isValid(_ i: Int, _ bytes: [UInt8], height: Height, now: UInt64, engineValidators: ValidatorSet) -> Bool {
        let state = states[i]
        guard state.ledger.height + 1 == height else { return false }
        if case .success = rules.validate(bytes, height: height, ledger: state.ledger, validators: engineValidators,
                                          now: Self.genesisTime + now,
                                          history: history(i, engineHeight: height, engineValidators: engineValidators)) {
            return true
        }
        return false
    }

    // MARK: Commit, crash, evidence

    /// Executes a committed block on node `i`'s ledger. Returns the state root and the validator updates that take
    /// effect two heights later, or a failure message.
    func commit(_ i: Int, _ block: CommittedBlock) -> Result<(root: Hash32, updates: [ValidatorUpdate]), SimulationFailure> {
        let decoded: ChainBlock
        do { decoded = try ChainBlock(canonicalBytes: block.value) } catch {
            return .failure(SimulationFailure("committed value is not a block: \(error)"))
        }
        switch rules.execute(decoded, on: states[i].ledger) {
        case .failure(let violation):
            return .failure(SimulationFailure("committed block \(block.height) does not execute: \(violation)"))
        case .success(let outcome):
            states[i].ledger = outcome.ledger
            states[i].sets[block.height + 1] = block.nextValidators
            states[i].times[block.height] = decoded.timeMillis
            for e in decoded.evidence { states[i].evidencePool[e.id] = nil }
            if i == 0 { evidenceCommitted += decoded.evidence.count }
            let updates = outcome.result.validatorUpdates.map { ValidatorUpdate(publicKey: $0.nodeKey, votingPower: $0.power) }
            states[i].lastUpdates = updates
            return .success((outcome.result.stateRoot, updates))
        }
    }

    func crashed(_ i: Int) { states[i].evidencePool = [:] }

    func evidence(_ i: Int, _ evidence: DuplicateVoteEvidence) {
        if states[i].evidencePool.count < 100 { states[i].evidencePool[evidence.id] = evidence }
    }

    /// What a node restarting after its last commit must feed its engine again: the updates that block decided,
    /// effective two heights after it (as the validator node does after replaying its blocks).
    func pendingUpdates(_ i: Int) -> (effectiveHeight: Height, updates: [ValidatorUpdate])? {
        let state = states[i]
        return state.lastUpdates.isEmpty ? nil : (state.ledger.height + 2, state.lastUpdates)
    }
}

struct SimulationFailure: Error {
    let message: String
    init(_ message: String) { self.message = message }
}
