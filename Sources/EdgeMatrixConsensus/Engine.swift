import EdgeMatrixCore

/// Where a validator is within a round. `newHeight` is the pause after a decision (the commit timeout).
public enum ConsensusStep: UInt8, Sendable, Hashable, Comparable, CustomStringConvertible {
    case newHeight = 0
    case propose = 1
    case prevote = 2
    case precommit = 3

    public static func < (lhs: ConsensusStep, rhs: ConsensusStep) -> Bool { lhs.rawValue < rhs.rawValue }
    public var description: String { ["newHeight", "propose", "prevote", "precommit"][Int(rawValue)] }
}

public enum TimeoutStep: UInt8, Sendable, Hashable {
    case propose, prevote, precommit
    /// Pause between deciding a height and starting the next one (block pacing; late precommits still count).
    case commit
}

/// A timer the host must run: after `durationMs`, feed it back as `.timeout(self)`.
public struct ScheduledTimeout: Hashable, Sendable, CustomStringConvertible {
    public var height: Height
    public var round: Round
    public var step: TimeoutStep
    public var durationMs: UInt64

    public init(height: Height, round: Round, step: TimeoutStep, durationMs: UInt64) {
        self.height = height
        self.round = round
        self.step = step
        self.durationMs = durationMs
    }

    public var description: String { "timeout(\(step) \(height)/\(round) in \(durationMs) ms)" }
}

/// Round timeouts grow linearly (`base + round × delta`) so that, after the network stabilises, some round is
/// long enough for every correct validator to hear every other (Tendermint's liveness argument).
public struct TimeoutConfiguration: Hashable, Sendable {
    public var proposeMs: UInt64 = 3000
    public var proposeDeltaMs: UInt64 = 500
    public var prevoteMs: UInt64 = 1000
    public var prevoteDeltaMs: UInt64 = 500
    public var precommitMs: UInt64 = 1000
    public var precommitDeltaMs: UInt64 = 500
    public var commitMs: UInt64 = 1000

    public init() {}

    public init(proposeMs: UInt64, proposeDeltaMs: UInt64, prevoteMs: UInt64, prevoteDeltaMs: UInt64,
                precommitMs: UInt64, precommitDeltaMs: UInt64, commitMs: UInt64) {
        self.proposeMs = proposeMs
        self.proposeDeltaMs = proposeDeltaMs
        self.prevoteMs = prevoteMs
        self.prevoteDeltaMs = prevoteDeltaMs
        self.precommitMs = precommitMs
        self.precommitDeltaMs = precommitDeltaMs
        self.commitMs = commitMs
    }

    public func duration(_ step: TimeoutStep, round: Round) -> UInt64 {
        let (base, delta): (UInt64, UInt64) = switch step {
        case .propose: (proposeMs, proposeDeltaMs)
        case .prevote: (prevoteMs, prevoteDeltaMs)
        case .precommit: (precommitMs, precommitDeltaMs)
        case .commit: (commitMs, 0)
        }
        let (grow, overflow) = delta.multipliedReportingOverflow(by: UInt64(round))
        return overflow ? .max : base.addingReportingOverflow(grow).overflow ? .max : base + grow
    }
}

public struct ConsensusConfiguration: Hashable, Sendable {
    public var chainID: String
    public var timeouts: TimeoutConfiguration
    /// Messages more than this many rounds ahead are ignored, so a faulty validator cannot make us allocate
    /// state for arbitrary rounds.
    public var maxRoundLookahead: Round

    public init(chainID: String, timeouts: TimeoutConfiguration = TimeoutConfiguration(), maxRoundLookahead: Round = 1000) {
        self.chainID = chainID
        self.timeouts = timeouts
        self.maxRoundLookahead = maxRoundLookahead
    }
}

/// A decided height: the value, its commit certificate and the validator set (with proposer priorities) of the
/// next height. The host stores all three durably; on restart it passes `nextValidators` back to the engine.
public struct CommittedBlock: Hashable, Sendable {
    public var height: Height
    public var value: [UInt8]
    public var certificate: CommitCertificate
    public var nextValidators: ValidatorSet
}

/// Everything that can happen to a validator.
public enum ConsensusEvent: Sendable {
    /// Begin (or, after a restart, resume) consensus at `height` = last durably committed height + 1.
    case start(height: Height)
    case proposal(SignedProposal)
    case vote(SignedVote)
    /// A timer from `.scheduleTimeout` fired.
    case timeout(ScheduledTimeout)
    /// The application's answer to `.requestValue`.
    case valueToPropose(height: Height, round: Round, value: [UInt8])
    /// The application's answer to `.requestValidation`.
    case validated(height: Height, value: Hash32, isValid: Bool)
    /// A committed block fetched from a peer (block sync). The engine verifies the certificate against the current
    /// height's validators and, if it holds, decides the height. Feed blocks in height order.
    case syncedBlock(value: [UInt8], certificate: CommitCertificate)
    /// Validator set changes that take effect at `effectiveHeight` (which must be after the current height; from
    /// a block at height h, use h + 2 as CometBFT does).
    case validatorUpdates(effectiveHeight: Height, updates: [ValidatorUpdate])
}

/// What the host must do, in order.
public enum ConsensusAction: Hashable, Sendable, CustomStringConvertible {
    /// Make this record durable (WAL + fsync) before carrying out any later action of the same batch.
    case persist(WALRecord)
    /// Send to all validators (already signed). The engine has already counted it itself.
    case broadcast(ConsensusMessage)
    /// Start a timer; when it fires, feed `.timeout(timeout)`. Stale timeouts are ignored, so never cancel.
    case scheduleTimeout(ScheduledTimeout)
    /// This node proposes at height/round: answer with `.valueToPropose`.
    case requestValue(height: Height, round: Round)
    /// Check a proposed value against application rules; answer with `.validated`.
    case requestValidation(height: Height, value: Hash32, bytes: [UInt8])
    /// The height is decided (final). Apply and persist the block; store the certificate for block sync.
    case commit(CommittedBlock)
    /// A validator equivocated; put the evidence in a block so it gets slashed.
    case evidence(DuplicateVoteEvidence)
    /// A message or input was refused (bad signature, not a validator, ...): useful to score the peer.
    case rejected(ConsensusError)

    public var description: String {
        switch self {
        case .persist(let r): "persist \(r)"
        case .broadcast(let m): "broadcast \(m)"
        case .scheduleTimeout(let t): "schedule \(t)"
        case .requestValue(let h, let r): "requestValue(\(h)/\(r))"
        case .requestValidation(let h, let v, _): "requestValidation(\(h) \(v.hex.prefix(8)))"
        case .commit(let b): "commit(\(b.height) \(b.certificate.value.hex.prefix(8)))"
        case .evidence(let e): "evidence(\(e))"
        case .rejected(let e): "rejected(\(e))"
        }
    }
}

/// Tendermint (Buchman, Kwon, Milosevic 2018, Algorithm 1) as a pure state machine: events in, actions out.
/// No clock, no randomness, no I/O, and no dependence on dictionary order, so the same events always give the
/// same actions. Rule numbers in comments refer to the paper's pseudocode lines.
public struct ConsensusEngine: Sendable {
    public let configuration: ConsensusConfiguration
    private let signer: (any ConsensusSigner)?
    private let verifier: any SignatureVerifier
    private let myID: NodeID?

    public private(set) var validators: ValidatorSet
    public private(set) var height: Height = 0
    public private(set) var round: Round = 0
    public private(set) var step: ConsensusStep = .newHeight
    public private(set) var started = false

    private var lockedRound: Round?
    /// Only the hash: the lock is compared, never re-proposed (the valid value is).
    private var lockedValue: Hash32?
    private var validRound: Round?
    private var validValue: ProposedValue?

    private var rounds: [Round: RoundState] = [:]
    private var dirtyRounds: [Round] = []
    private var proposerCache: [Round: NodeID] = [:]
    private var validity: [Hash32: Bool] = [:]
    /// Values of the proposals held at this height.
    private var proposedValues: Set<Hash32> = []
    private var validationRequested: Set<Hash32> = []
    private var reportedEquivocations: Set<EquivocationKey> = []
    /// The double-sign guard: what this node signed at the current height, per round and kind.
    private var signed: [SignKey: ConsensusMessage] = [:]
    private var ownMessages: [ConsensusMessage] = []
    private var lastPersisted: ConsensusSnapshot?
    private var persistedValues: Set<Hash32> = []
    private var pendingUpdates: [(height: Height, updates: [ValidatorUpdate])] = []
    private var recovered: [WALRecord]

    /// - Parameters:
    ///   - validators: the set of the height that will be started (genesis, or `nextValidators` of the last commit).
    ///   - signer: this validator's key; nil (or a key outside the set) runs a non-voting observer.
    ///   - walRecords: the replayed WAL after a restart; records of the started height restore locks and the
    ///     double-sign guard.
    public init(configuration: ConsensusConfiguration, validators: ValidatorSet, signer: (any ConsensusSigner)?,
                verifier: any SignatureVerifier = Ed25519Verifier(), walRecords: [WALRecord] = []) {
        self.configuration = configuration
        self.validators = validators
        self.signer = signer
        self.verifier = verifier
        self.myID = signer?.publicKey.nodeID
        self.recovered = walRecords
    }

    // MARK: Read-only views

    public var lockedRoundValue: (round: Round, value: Hash32)? {
        lockedRound.flatMap { r in lockedValue.map { (r, $0) } }
    }
    public var validRoundValue: (round: Round, value: Hash32)? {
        validRound.flatMap { r in validValue.map { (r, $0.id) } }
    }
    public var isValidator: Bool { myID.map { validators.index(of: $0) != nil } ?? false }
    public func proposer(round: Round) -> NodeID { validators.proposer(round: round).id }

    /// This node's own signed messages at the current height.
    public var ownSignedMessages: [ConsensusMessage] { ownMessages }

    /// Every proposal and vote held for the current height, in a fixed order, for the host to re-send
    /// periodically. Tendermint's liveness rests on gossip: what one correct validator received, every correct
    /// validator eventually receives (a proof-of-lock may hinge on a vote only some have seen).
    public var gossipMessages: [ConsensusMessage] {
        var messages = [ConsensusMessage]()
        for r in rounds.keys.sorted() {
            let state = rounds[r]!
            if let proposal = state.proposal { messages.append(.proposal(proposal)) }
            messages += state.prevotes.all.map { .vote($0) }
            messages += state.precommits.all.map { .vote($0) }
        }
        return messages
    }

    // MARK: Events

    public mutating func handle(_ event: ConsensusEvent) -> [ConsensusAction] {
        var out = [ConsensusAction]()
        switch event {
        case .start(let height):
            // Starting twice would forget what was signed at this height: the engine is made once per process.
            if started { out.append(.rejected(.alreadyStarted(height: self.height))) } else { start(height: height, &out) }
        case .proposal(let proposal):
            receiveProposal(proposal, own: false, &out)
        case .vote(let vote):
            receiveVote(vote, own: false, &out)
        case .timeout(let timeout):
            onTimeout(timeout, &out)
        case .valueToPropose(let height, let round, let value):
            if started, height == self.height, round == self.round, step == .propose, isProposer(round),
               signed[SignKey(round: round, kind: .proposal)] == nil {
                let proposed = ProposedValue(bytes: value)
                validity[proposed.id] = true  // our own application built it
                propose(proposed, validRound: nil, &out)
            }
        case .validated(let height, let value, let isValid):
            if height == self.height, validity[value] == nil {
                validity[value] = isValid
                for r in rounds.keys.sorted() where rounds[r]?.proposal?.valueID == value { markDirty(r) }
            }
        case .syncedBlock(let value, let certificate):
            guard started, certificate.height == height else { break }
            do {
                try certificate.verify(block: value, height: height, chainID: configuration.chainID,
                                       validators: validators, verifier: verifier)
                decide(value: value, certificate: certificate, &out)
            } catch {
                out.append(.rejected(error))
            }
        case .validatorUpdates(let effectiveHeight, let updates):
            if effectiveHeight <= height {
                out.append(.rejected(.invalidValidatorSet(
                    "update for height \(effectiveHeight) arrived at height \(height); it must take effect later")))
            } else {
                pendingUpdates.append((effectiveHeight, updates))
            }
        }
        evaluate(&out)
        persistStateIfChanged(&out)
        return out
    }

    /// Convenience for hosts that receive either kind of message on one channel.
    public mutating func handle(message: ConsensusMessage) -> [ConsensusAction] {
        switch message {
        case .proposal(let p): handle(.proposal(p))
        case .vote(let v): handle(.vote(v))
        }
    }

    /// Handles an event and makes its `.persist` records durable in `wal` (one append, one fsync) before
    /// returning the remaining actions, in order. If the WAL fails, the node must stop: nothing may be sent.
    public mutating func handle(_ event: ConsensusEvent, wal: any ConsensusWAL) throws(ConsensusError) -> [ConsensusAction] {
        let actions = handle(event)
        var records = [WALRecord]()
        var rest = [ConsensusAction]()
        for action in actions {
            if case .persist(let record) = action { records.append(record) } else { rest.append(action) }
        }
        try wal.append(records)
        return rest
    }

    // MARK: Start and rounds

    private mutating func start(height: Height, _ out: inout [ConsensusAction]) {
        enterHeight(height)
        started = true
        pendingUpdates.removeAll { $0.height <= height }  // already reflected in the set we were given

        // Recover this height's state from the WAL: locks, valid value, and every message we signed.
        let records = recovered.filter { $0.height == height }
        recovered = []
        var values = [Hash32: [UInt8]]()
        var snapshot: ConsensusSnapshot?
        var mine = [ConsensusMessage]()
        for record in records {
            switch record {
            case .state(let s): snapshot = s
            case .value(_, let bytes): values[Hash32.of(bytes)] = bytes
            case .signed(let message):
                if case .proposal(let p) = message { values[p.valueID] = p.value }
                if signed[key(of: message)] == nil {
                    signed[key(of: message)] = message
                    mine.append(message)
                }
            }
        }
        ownMessages = mine
        var resumeRound: Round = 0
        if let snapshot {
            if let r = snapshot.lockedRound, let id = snapshot.lockedValue {
                lockedRound = r; lockedValue = id; validity[id] = true
            }
            if let r = snapshot.validRound, let id = snapshot.validValue, let bytes = values[id] {
                validRound = r; validValue = ProposedValue(id: id, bytes: bytes); validity[id] = true
            }
            lastPersisted = snapshot
            persistedValues = Set(values.keys)
            // Only the round: the step is taken from what was actually signed below, since a crash can fall
            // between persisting a step change and persisting the vote that goes with it.
            resumeRound = snapshot.round
        }
        // Votes we signed count again, and the latest round we signed in is at least where we are.
        for message in mine {
            resumeRound = max(resumeRound, message.round)
            switch message {
            case .vote(let v): receiveVote(v, own: true, &out)
            case .proposal(let p): validity[p.valueID] = true; receiveProposal(p, own: true, &out)
            }
        }
        startRound(resumeRound, &out)
        var resumeStep = ConsensusStep.propose
        for message in mine where message.round == resumeRound {
            if case .vote(let v) = message { resumeStep = max(resumeStep, v.type == .prevote ? .prevote : .precommit) }
        }
        step = max(step, resumeStep)
        // They may never have left before the crash (the proposal of this round was re-sent by startRound).
        for message in mine {
            if case .proposal(let p) = message, p.round == resumeRound, isProposer(resumeRound) { continue }
            out.append(.broadcast(message))
        }
    }

    private mutating func enterHeight(_ height: Height) {
        self.height = height
        round = 0
        step = .newHeight
        lockedRound = nil; lockedValue = nil
        validRound = nil; validValue = nil
        rounds = [:]; dirtyRounds = []; proposerCache = [:]
        validity = [:]; validationRequested = []; proposedValues = []
        reportedEquivocations = []
        signed = [:]; ownMessages = []
        lastPersisted = nil; persistedValues = []
    }

    /// StartRound (lines 11-21). Every validator schedules the propose timeout, the proposer too, so a slow
    /// application cannot stall the round.
    private mutating func startRound(_ round: Round, _ out: inout [ConsensusAction]) {
        self.round = round
        step = .propose
        ensureRound(round)
        markDirty(round)
        out.append(.scheduleTimeout(timeout(.propose, round)))
        guard isProposer(round) else { return }
        if let previous = signed[SignKey(round: round, kind: .proposal)] {
            out.append(.broadcast(previous))  // proposed before a crash: the same proposal again, never another
        } else if let validValue {
            propose(validValue, validRound: validRound, &out)
        } else {
            out.append(.requestValue(height: height, round: round))
        }
    }

    private mutating func propose(_ value: ProposedValue, validRound: Round?, _ out: inout [ConsensusAction]) {
        guard let signer, let myID else { return }
        let body = ProposalBody(chainID: configuration.chainID, height: height, round: round, validRound: validRound,
                                value: value.id, proposer: myID)
        let proposal = SignedProposal(signing: body, value: value.bytes, with: signer)
        recordSigned(.proposal(proposal), &out)
        out.append(.broadcast(.proposal(proposal)))
        receiveProposal(proposal, own: true, &out)
    }

    /// Signs (or, if this height/round/type was signed before, re-sends the earlier vote: never two different
    /// votes), persists before broadcasting, and counts the vote locally.
    private mutating func castVote(_ type: VoteType, value: Hash32?, _ out: inout [ConsensusAction]) {
        let key = SignKey(round: round, kind: type == .prevote ? .prevote : .precommit)
        let vote: SignedVote
        if case .vote(let previous)? = signed[key] {
            vote = previous
        } else {
            guard let signer, let myID, isValidator else { return }
            vote = SignedVote(signing: VoteBody(chainID: configuration.chainID, type: type, height: height,
                                                round: round, value: value, validator: myID), with: signer)
            recordSigned(.vote(vote), &out)
        }
        out.append(.broadcast(.vote(vote)))
        receiveVote(vote, own: true, &out)
    }

    private mutating func recordSigned(_ message: ConsensusMessage, _ out: inout [ConsensusAction]) {
        persistStateIfChanged(&out)  // locks first: a precommit must never be durable without the lock behind it
        out.append(.persist(.signed(message)))
        signed[key(of: message)] = message
        ownMessages.append(message)
    }

    // MARK: Incoming messages

    private mutating func receiveProposal(_ proposal: SignedProposal, own: Bool, _ out: inout [ConsensusAction]) {
        guard started, proposal.height == height, proposal.round <= round &+ configuration.maxRoundLookahead else { return }
        let r = proposal.round
        if rounds[r]?.proposal != nil { return }  // duplicate, or a faulty proposer's second proposal: first one wins
        if !own {
            do {
                try proposal.verify(chainID: configuration.chainID, validators: validators, verifier: verifier)
            } catch {
                out.append(.rejected(error)); return
            }
            guard proposal.body.proposer == proposerID(r) else {
                out.append(.rejected(.notProposer(proposal.body.proposer, height: height, round: r))); return
            }
        }
        ensureRound(r)
        rounds[r]!.proposal = proposal
        proposedValues.insert(proposal.valueID)
        noteSender(r, validators.index(of: proposal.body.proposer)!)
        requestValidationIfNeeded(proposal, &out)
        markDirty(r)
    }

    private mutating func receiveVote(_ vote: SignedVote, own: Bool, _ out: inout [ConsensusAction]) {
        guard started, vote.height == height, vote.round <= round &+ configuration.maxRoundLookahead else { return }
        guard let index = validators.index(of: vote.validator) else {
            out.append(.rejected(.notAValidator(vote.validator, height: vote.height))); return
        }
        let r = vote.round
        let earlier = rounds[r]?.votes(vote.type).byValidator[index] ?? []
        if earlier.contains(where: { $0.value == vote.value }) { return }  // a duplicate
        if !own {
            do {
                try vote.verify(chainID: configuration.chainID, validators: validators, verifier: verifier)
            } catch {
                out.append(.rejected(error)); return
            }
        }
        if let first = earlier.first {
            // Same validator, same height/round/type, another value: equivocation. Report it once; the vote
            // still counts for its value, as in the paper.
            let key = EquivocationKey(validator: index, round: r, type: vote.type)
            if reportedEquivocations.insert(key).inserted, let evidence = try? DuplicateVoteEvidence(first, vote) {
                out.append(.evidence(evidence))
            }
        }
        ensureRound(r)
        let power = validators.validators[index].votingPower
        let relevant = vote.value.map { proposedValues.contains($0) } ?? true
        if vote.type == .prevote { rounds[r]!.prevotes.add(vote, index: index, power: power, relevant: relevant) }
        else { rounds[r]!.precommits.add(vote, index: index, power: power, relevant: relevant) }
        noteSender(r, index)
        markDirty(r)
    }

    private mutating func onTimeout(_ timeout: ScheduledTimeout, _ out: inout [ConsensusAction]) {
        guard started, timeout.height == height else { return }
        switch timeout.step {
        case .propose:  // lines 57-60
            if timeout.round == round, step == .propose { step = .prevote; castVote(.prevote, value: nil, &out) }
        case .prevote:  // lines 61-64
            if timeout.round == round, step == .prevote { step = .precommit; castVote(.precommit, value: nil, &out) }
        case .precommit:  // lines 65-67
            if timeout.round == round, step != .newHeight { startRound(round + 1, &out) }
        case .commit:
            if step == .newHeight {
                for r in rounds.keys.sorted() { markDirty(r) }  // messages that came in while we paused
                startRound(0, &out)
            }
        }
    }

    // MARK: The upon-rules

    /// Applies every rule whose condition holds until none does.
    private mutating func evaluate(_ out: inout [ConsensusAction]) {
        while started, step != .newHeight {
            let dirty = Array(Set(dirtyRounds)).sorted()
            dirtyRounds = []
            var changed = false
            for r in dirty where tryDecide(round: r, &out) { changed = true; break }  // line 49, any round
            if changed { continue }
            // Line 55: f+1 voting power is already in a later round, so at least one correct validator is: join it.
            if let r = dirty.last(where: { $0 > round && validators.exceedsOneThird(rounds[$0]?.senderPower ?? 0) }) {
                startRound(r, &out)
                continue
            }
            if applyCurrentRoundRule(&out) { continue }
            if dirtyRounds.isEmpty { break }
        }
    }

    /// Lines 49-54: a proposal for v and precommits for v from more than 2/3 in one round decide v.
    private mutating func tryDecide(round r: Round, _ out: inout [ConsensusAction]) -> Bool {
        guard let state = rounds[r], let proposal = state.proposal,
              validators.isQuorum(state.precommits.power(for: proposal.valueID)) else { return false }
        guard validity[proposal.valueID] == true else { requestValidationIfNeeded(proposal, &out); return false }
        let signatures = state.precommits.votes(for: proposal.valueID).map {
            CommitSignature(validator: $0.validator, signature: $0.signature)
        }
        decide(value: proposal.value,
               certificate: CommitCertificate(height: height, round: r, value: proposal.valueID, signatures: signatures),
               &out)
        return true
    }

    private mutating func decide(value: [UInt8], certificate: CommitCertificate, _ out: inout [ConsensusAction]) {
        var next = validators
        next.advanceProposerPriority(times: 1)
        for pending in pendingUpdates where pending.height == height + 1 {
            do { next = try next.applying(pending.updates) } catch { out.append(.rejected(error)) }
        }
        pendingUpdates.removeAll { $0.height <= height + 1 }
        out.append(.commit(CommittedBlock(height: height, value: value, certificate: certificate, nextValidators: next)))
        validators = next
        enterHeight(height + 1)
        if configuration.timeouts.commitMs > 0 {
            out.append(.scheduleTimeout(timeout(.commit, 0)))
        } else {
            startRound(0, &out)
        }
    }

    /// The rules about the current round; returns whether one fired.
    private mutating func applyCurrentRoundRule(_ out: inout [ConsensusAction]) -> Bool {
        let r = round
        guard let state = rounds[r] else { return false }
        // Rules waiting on the application's verdict do not block the others (e.g. the precommit timeout).
        if step == .propose, let proposal = state.proposal, let valid = validity[proposal.valueID] {
            let id = proposal.valueID
            var fires = false
            var accept = false
            if let vr = proposal.body.validRound {
                // Lines 28-33: a re-proposal backed by a proof-of-lock from round vr.
                if vr < r, let pol = rounds[vr], validators.isQuorum(pol.prevotes.power(for: id)) {
                    fires = true
                    accept = valid && (lockedRound.map { $0 <= vr } ?? true || lockedValue == id)
                }
            } else {
                // Lines 22-27: a fresh proposal.
                fires = true
                accept = valid && (lockedRound == nil || lockedValue == id)
            }
            if fires {
                step = .prevote
                castVote(.prevote, value: accept ? id : nil, &out)
                return true
            }
        }
        if step == .prevote, !state.prevoteTimeoutScheduled, validators.isQuorum(state.prevotes.totalPower) {
            // Lines 34-35.
            rounds[r]!.prevoteTimeoutScheduled = true
            out.append(.scheduleTimeout(timeout(.prevote, r)))
            return true
        }
        if step >= .prevote, !state.polSeen, let proposal = state.proposal, validity[proposal.valueID] == true,
           validators.isQuorum(state.prevotes.power(for: proposal.valueID)) {
            // Lines 36-43: a proof-of-lock for the proposal in this round.
            rounds[r]!.polSeen = true
            let value = ProposedValue(id: proposal.valueID, bytes: proposal.value)
            validValue = value
            validRound = r
            if step == .prevote {
                lockedValue = value.id
                lockedRound = r
                step = .precommit
                castVote(.precommit, value: value.id, &out)
            }
            return true
        }
        if step == .prevote, validators.isQuorum(state.prevotes.power(for: nil)) {
            // Lines 44-46.
            step = .precommit
            castVote(.precommit, value: nil, &out)
            return true
        }
        if !state.precommitTimeoutScheduled, validators.isQuorum(state.precommits.totalPower) {
            // Lines 47-48.
            rounds[r]!.precommitTimeoutScheduled = true
            out.append(.scheduleTimeout(timeout(.precommit, r)))
            return true
        }
        return false
    }

    // MARK: Helpers

    private mutating func persistStateIfChanged(_ out: inout [ConsensusAction]) {
        guard started, isValidator else { return }  // observers sign nothing, so they have nothing to guard
        let snapshot = ConsensusSnapshot(height: height, round: round, step: step, lockedRound: lockedRound,
                                         lockedValue: lockedValue, validRound: validRound, validValue: validValue?.id)
        guard snapshot != lastPersisted else { return }
        if let value = validValue, !persistedValues.contains(value.id) {
            out.append(.persist(.value(height: height, bytes: value.bytes)))
            persistedValues.insert(value.id)
        }
        out.append(.persist(.state(snapshot)))
        lastPersisted = snapshot
    }

    private mutating func requestValidationIfNeeded(_ proposal: SignedProposal, _ out: inout [ConsensusAction]) {
        let id = proposal.valueID
        guard validity[id] == nil, !validationRequested.contains(id) else { return }
        validationRequested.insert(id)
        out.append(.requestValidation(height: height, value: id, bytes: proposal.value))
    }

    private mutating func proposerID(_ round: Round) -> NodeID {
        if let cached = proposerCache[round] { return cached }
        let id = validators.proposer(round: round).id
        proposerCache[round] = id
        return id
    }

    private mutating func isProposer(_ round: Round) -> Bool {
        guard let myID else { return false }
        return proposerID(round) == myID
    }

    private func timeout(_ step: TimeoutStep, _ round: Round) -> ScheduledTimeout {
        ScheduledTimeout(height: height, round: round, step: step,
                         durationMs: configuration.timeouts.duration(step, round: round))
    }

    private mutating func ensureRound(_ r: Round) {
        if rounds[r] == nil { rounds[r] = RoundState(validatorCount: validators.count) }
    }

    private mutating func markDirty(_ r: Round) { dirtyRounds.append(r) }

    private mutating func noteSender(_ r: Round, _ index: Int) {
        guard !rounds[r]!.senders[index] else { return }
        rounds[r]!.senders[index] = true
        rounds[r]!.senderPower += validators.validators[index].votingPower
    }

    private func key(of message: ConsensusMessage) -> SignKey {
        switch message {
        case .proposal(let p): SignKey(round: p.round, kind: .proposal)
        case .vote(let v): SignKey(round: v.round, kind: v.type == .prevote ? .prevote : .precommit)
        }
    }
}

// MARK: - Internal state types

struct ProposedValue: Hashable, Sendable {
    let id: Hash32
    let bytes: [UInt8]
    init(bytes: [UInt8]) { self.bytes = bytes; id = Hash32.of(bytes) }
    init(id: Hash32, bytes: [UInt8]) { self.id = id; self.bytes = bytes }
}

struct SignKey: Hashable, Sendable {
    enum Kind: UInt8, Hashable, Sendable { case proposal, prevote, precommit }
    let round: Round
    let kind: Kind
}

struct EquivocationKey: Hashable, Sendable {
    let validator: Int
    let round: Round
    let type: VoteType
}

/// The votes of one round and type. As in the paper, a validator counts towards every value it voted for, so a
/// proof-of-lock that includes an equivocator's vote is seen by every correct node once gossip delivers that vote
/// (counting only a validator's first vote would let an equivocator split correct nodes' views for ever).
/// Memory stays bounded: beyond its first vote, a validator's votes are kept only for nil or for a value proposed
/// at this height (the only values any rule asks about), so junk values cannot crowd out the one that matters.
struct VoteSet: Sendable {
    private(set) var byValidator: [[SignedVote]]
    private var powerByValue: [Hash32?: UInt64] = [:]
    /// Power of distinct validators that voted at all.
    private(set) var totalPower: UInt64 = 0

    init(count: Int) { byValidator = Array(repeating: [], count: count) }

    mutating func add(_ vote: SignedVote, index: Int, power: UInt64, relevant: Bool) {
        guard byValidator[index].isEmpty || relevant,
              !byValidator[index].contains(where: { $0.value == vote.value }) else { return }
        if byValidator[index].isEmpty { totalPower += power }
        byValidator[index].append(vote)
        powerByValue[vote.value, default: 0] += power
    }

    func power(for value: Hash32?) -> UInt64 { powerByValue[value] ?? 0 }

    /// Each validator's vote for `value`, in validator order.
    func votes(for value: Hash32?) -> [SignedVote] {
        byValidator.compactMap { $0.first { $0.value == value } }
    }

    var all: [SignedVote] { byValidator.flatMap { $0 } }
}

struct RoundState: Sendable {
    var proposal: SignedProposal?
    var prevotes: VoteSet
    var precommits: VoteSet
    /// Which validators sent anything in this round, for the f+1 round skip.
    var senders: [Bool]
    var senderPower: UInt64 = 0
    var prevoteTimeoutScheduled = false
    var precommitTimeoutScheduled = false
    /// Lines 36-43 fire once per round.
    var polSeen = false

    init(validatorCount: Int) {
        prevotes = VoteSet(count: validatorCount)
        precommits = VoteSet(count: validatorCount)
        senders = Array(repeating: false, count: validatorCount)
    }

    func votes(_ type: VoteType) -> VoteSet { type == .prevote ? prevotes : precommits }
}
