import EdgeMatrixConsensus
import EdgeMatrixCore
import EdgeMatrixLedger

/// What a rule needs to know about the chain's past, given as values so that the rules stay pure: the driver answers
/// from its block store, a simulation from memory.
public struct ChainHistory: Sendable {
    /// The validator set that voted at a height (nil when unknown, e.g. pruned or in the future).
    public var validatorsAt: @Sendable (Height) -> ValidatorSet?
    /// The time of the committed block at a height.
    public var timeAt: @Sendable (Height) -> UInt64?

    public init(validatorsAt: @escaping @Sendable (Height) -> ValidatorSet?, timeAt: @escaping @Sendable (Height) -> UInt64?) {
        self.validatorsAt = validatorsAt
        self.timeAt = timeAt
    }
}

/// Why a proposed block is not valid.
public enum BlockRuleViolation: Error, Equatable, Sendable, CustomStringConvertible {
    case undecodable(String)
    case wrongHeight(expected: Height, got: Height)
    case timeNotAfterParent(parent: UInt64, got: UInt64)
    case timeTooFarAhead(now: UInt64, got: UInt64)
    case proposerNotAValidator(NodeID)
    case evidence(id: Hash32, reason: EvidenceRejection)
    case duplicateEvidence(Hash32)
    case execution(String)

    public var description: String {
        switch self {
        case .undecodable(let why): "block does not decode: \(why)"
        case .wrongHeight(let expected, let got): "block is for height \(got), expected \(expected)"
        case .timeNotAfterParent(let parent, let got): "block time \(got) is not after its parent's \(parent)"
        case .timeTooFarAhead(let now, let got): "block time \(got) is too far ahead of local time \(now)"
        case .proposerNotAValidator(let id): "proposer \(id) is not a validator at this height"
        case .evidence(let id, let reason): "evidence \(id.hex.prefix(12)): \(reason)"
        case .duplicateEvidence(let id): "evidence \(id.hex.prefix(12)) appears twice"
        case .execution(let why): "block cannot be executed: \(why)"
        }
    }
}

/// Why a piece of equivocation evidence may not go into a block (and leaves the pool).
public enum EvidenceRejection: Error, Equatable, Sendable, CustomStringConvertible {
    case fromTheFuture(evidenceHeight: Height, blockHeight: Height)
    case expired(ageBlocks: UInt64, ageMillis: UInt64)
    case unknownValidatorSet(Height)
    case invalid(String)
    case alreadyUsed

    public var description: String {
        switch self {
        case .fromTheFuture(let e, let b): "evidence height \(e) is above the block height \(b)"
        case .expired(let blocks, let millis): "expired (\(blocks) blocks and \(millis) ms old)"
        case .unknownValidatorSet(let h): "the validator set of height \(h) is not known"
        case .invalid(let why): "does not verify against the validator set of its own height: \(why)"
        case .alreadyUsed: "already committed"
        }
    }
}

/// The chain's block validity rules as a pure layer between the consensus engine and the ledger (as ABCI separates
/// CometBFT from its application): no clock, no I/O; the driver passes local time and history in.
public struct BlockRules: Sendable {
    public var chainID: String
    /// How far a proposal's time may run ahead of a validator's own clock.
    public var maxFutureDriftMillis: UInt64
    /// Evidence expires once it is older than both of these, as CometBFT's max_age_num_blocks / max_age_duration.
    public var evidenceMaxAgeBlocks: UInt64
    public var evidenceMaxAgeMillis: UInt64

    public init(chainID: String, maxFutureDriftMillis: UInt64 = 10_000, evidenceMaxAgeBlocks: UInt64 = 1_000,
                evidenceMaxAgeMillis: UInt64 = 3_600_000) {
        self.chainID = chainID
        self.maxFutureDriftMillis = maxFutureDriftMillis
        self.evidenceMaxAgeBlocks = evidenceMaxAgeBlocks
        self.evidenceMaxAgeMillis = evidenceMaxAgeMillis
    }

    /// Whether `evidence` may go into the block at `blockHeight` with time `blockTime`: not from the future, not
    /// expired, not used, and signed by a validator of the evidence's own height (which may since have left).
    public func check(_ evidence: DuplicateVoteEvidence, blockHeight: Height, blockTime: UInt64, ledger: LedgerState,
                      history: ChainHistory) -> EvidenceRejection? {
        guard evidence.height <= blockHeight else { return .fromTheFuture(evidenceHeight: evidence.height, blockHeight: blockHeight) }
        let ageBlocks = blockHeight - evidence.height
        // An evidence height not yet committed is the height in progress: its age in time is zero.
        let evidenceTime = history.timeAt(evidence.height) ?? blockTime
        let ageMillis = blockTime >= evidenceTime ? blockTime - evidenceTime : 0
        if ageBlocks > evidenceMaxAgeBlocks, ageMillis > evidenceMaxAgeMillis {
            return .expired(ageBlocks: ageBlocks, ageMillis: ageMillis)
        }
        if ledger.isEvidenceUsed(evidence.id) { return .alreadyUsed }
        guard let validators = history.validatorsAt(evidence.height) else { return .unknownValidatorSet(evidence.height) }
        do { try evidence.verify(chainID: chainID, validators: validators) } catch { return .invalid(error.description) }
        return nil
    }

    /// The evidence from `pool` that a block at `height` may carry, in canonical order.
    public func admissibleEvidence(_ pool: [DuplicateVoteEvidence], height: Height, time: UInt64, ledger: LedgerState,
                                   history: ChainHistory) -> (admissible: [DuplicateVoteEvidence], dropped: [(Hash32, EvidenceRejection)]) {
        var admissible = [DuplicateVoteEvidence]()
        var dropped = [(Hash32, EvidenceRejection)]()
        for evidence in pool.sorted(by: { $0.id < $1.id }) {
            if let why = check(evidence, blockHeight: height, blockTime: time, ledger: ledger, history: history) {
                dropped.append((evidence.id, why))
            } else if admissible.count < ChainBlock.maxEvidence {
                admissible.append(evidence)
            }
        }
        return (admissible, dropped)
    }

    /// Validates a proposed block against the state after its parent and executes it on a copy of the ledger.
    /// `validators` is the set of `height`; `now` is the validator's local clock (only the drift rule reads it).
    public func validate(_ bytes: [UInt8], height: Height, ledger: LedgerState, validators: ValidatorSet, now: UInt64,
                         history: ChainHistory) -> Result<(block: ChainBlock, ledger: LedgerState, result: BlockResult), BlockRuleViolation> {
        let block: ChainBlock
        do { block = try ChainBlock(canonicalBytes: bytes) } catch { return .failure(.undecodable(error.description)) }
        guard block.height == height, height == ledger.height + 1 else {
            return .failure(.wrongHeight(expected: ledger.height + 1, got: block.height))
        }
        guard block.timeMillis > ledger.lastBlockTimeMillis else {
            return .failure(.timeNotAfterParent(parent: ledger.lastBlockTimeMillis, got: block.timeMillis))
        }
        let latest = now.addingReportingOverflow(maxFutureDriftMillis)
        guard latest.overflow || block.timeMillis <= latest.partialValue else {
            return .failure(.timeTooFarAhead(now: now, got: block.timeMillis))
        }
        guard validators.index(of: block.proposer) != nil else { return .failure(.proposerNotAValidator(block.proposer)) }
        var seen = Set<Hash32>()
        for evidence in block.evidence {
            guard seen.insert(evidence.id).inserted else { return .failure(.duplicateEvidence(evidence.id)) }
            if let why = check(evidence, blockHeight: height, blockTime: block.timeMillis, ledger: ledger, history: history) {
                return .failure(.evidence(id: evidence.id, reason: why))
            }
        }
        return execute(block, on: ledger).map { (block, $0.ledger, $0.result) }
    }

    /// Executes a block on a copy of `ledger`; evidence against an unknown node key slashes nothing.
    public func execute(_ block: ChainBlock, on ledger: LedgerState) -> Result<(ledger: LedgerState, result: BlockResult), BlockRuleViolation> {
        var scratch = ledger
        do {
            let result = try scratch.applyBlock(rawTxs: block.transactions, misbehaviour: Self.misbehaviour(block.evidence, ledger: ledger),
                                                context: BlockContext(height: block.height, timeMillis: block.timeMillis))
            return .success((scratch, result))
        } catch {
            return .failure(.execution(error.description))
        }
    }

    /// Maps evidence to the node keys the ledger slashes.
    public static func misbehaviour(_ evidence: [DuplicateVoteEvidence], ledger: LedgerState) -> [Misbehaviour] {
        var keys = [NodeID: PublicKey]()
        for node in ledger.allNodes { keys[node.nodeID] = node.nodeKey }
        return evidence.compactMap { e in keys[e.validator].map { Misbehaviour(validator: $0, evidenceID: e.id) } }
    }
}
