import EdgeMatrixConsensus
import EdgeMatrixCore
import Foundation

/// Validators with deterministic keys, indexed in validator-set order, plus helpers to sign as any of them.
struct Fixture {
    static let chainID = "emc-test"
    let keys: [SigningKey]
    let validators: ValidatorSet
    let configuration: ConsensusConfiguration

    init(powers: [UInt64], commitMs: UInt64 = 0, keySalt: UInt8 = 0) {
        let unsorted = powers.indices.map { try! SigningKey(seed: [UInt8](repeating: UInt8(1 + $0) &+ keySalt, count: 32)) }
        let powerByID = Dictionary(uniqueKeysWithValues: zip(unsorted.map(\.nodeID), powers))
        keys = unsorted.sorted { $0.nodeID < $1.nodeID }
        validators = try! ValidatorSet(keys.map { (publicKey: $0.publicKey, votingPower: powerByID[$0.nodeID]!) })
        var timeouts = TimeoutConfiguration(proposeMs: 1000, proposeDeltaMs: 100, prevoteMs: 500, prevoteDeltaMs: 50,
                                            precommitMs: 500, precommitDeltaMs: 50, commitMs: commitMs)
        timeouts.commitMs = commitMs
        configuration = ConsensusConfiguration(chainID: Self.chainID, timeouts: timeouts)
    }

    func id(_ i: Int) -> NodeID { keys[i].nodeID }

    func engine(_ i: Int, wal: [WALRecord] = []) -> ConsensusEngine {
        ConsensusEngine(configuration: configuration, validators: validators, signer: keys[i], walRecords: wal)
    }

    /// Index of the proposer of `round` at the first height (the engine's starting set).
    func proposer(round: Round) -> Int { validators.index(of: validators.proposer(round: round).id)! }

    /// A validator other than those given (tests pick "someone else" this way).
    func other(than excluded: Int...) -> Int { keys.indices.first { !excluded.contains($0) }! }

    func vote(_ i: Int, _ type: VoteType, height: Height = 1, round: Round, _ value: Hash32?) -> SignedVote {
        SignedVote(signing: VoteBody(chainID: Self.chainID, type: type, height: height, round: round, value: value,
                                     validator: id(i)), with: keys[i])
    }

    func proposal(_ i: Int, height: Height = 1, round: Round, value: [UInt8], validRound: Round? = nil) -> SignedProposal {
        SignedProposal(signing: ProposalBody(chainID: Self.chainID, height: height, round: round, validRound: validRound,
                                             value: Hash32.of(value), proposer: id(i)), value: value, with: keys[i])
    }

    /// A certificate signed by the validators at `signers`.
    func certificate(height: Height = 1, round: Round = 0, value: [UInt8], signers: [Int]) -> CommitCertificate {
        let id = Hash32.of(value)
        return CommitCertificate(height: height, round: round, value: id, signatures: signers.map {
            CommitSignature(validator: self.id($0), signature: vote($0, .precommit, height: height, round: round, id).signature)
        })
    }
}

extension Array where Element == ConsensusAction {
    var votes: [SignedVote] {
        compactMap { if case .broadcast(.vote(let v)) = $0 { v } else { nil } }
    }
    func votes(_ type: VoteType) -> [SignedVote] { votes.filter { $0.type == type } }
    var proposals: [SignedProposal] {
        compactMap { if case .broadcast(.proposal(let p)) = $0 { p } else { nil } }
    }
    var commits: [CommittedBlock] { compactMap { if case .commit(let b) = $0 { b } else { nil } } }
    var timeouts: [ScheduledTimeout] { compactMap { if case .scheduleTimeout(let t) = $0 { t } else { nil } } }
    var evidence: [DuplicateVoteEvidence] { compactMap { if case .evidence(let e) = $0 { e } else { nil } } }
    var rejections: [ConsensusError] { compactMap { if case .rejected(let e) = $0 { e } else { nil } } }
    var persisted: [WALRecord] { compactMap { if case .persist(let r) = $0 { r } else { nil } } }
    var validationRequests: [Hash32] {
        compactMap { if case .requestValidation(_, let id, _) = $0 { id } else { nil } }
    }
    var valueRequests: [Round] { compactMap { if case .requestValue(_, let r) = $0 { r } else { nil } } }
}

extension ConsensusEngine {
    /// Feeds a proposal and answers the validation request it triggers.
    mutating func receive(_ proposal: SignedProposal, valid: Bool = true) -> [ConsensusAction] {
        var actions = handle(.proposal(proposal))
        if actions.validationRequests.contains(proposal.valueID) {
            actions += handle(.validated(height: proposal.height, value: proposal.valueID, isValid: valid))
        }
        return actions
    }

    mutating func receive(_ votes: [SignedVote]) -> [ConsensusAction] {
        votes.flatMap { handle(.vote($0)) }
    }

    mutating func fire(_ step: TimeoutStep, height: Height = 1, round: Round) -> [ConsensusAction] {
        handle(.timeout(ScheduledTimeout(height: height, round: round, step: step, durationMs: 0)))
    }
}

// MARK: - Deterministic randomness

/// xoshiro256**: the simulation's only source of randomness, so a seed replays exactly.
struct Xoshiro256: RandomNumberGenerator {
    private var s: (UInt64, UInt64, UInt64, UInt64)

    init(seed: UInt64) {
        var mix = SeededRandom(seed: seed)
        s = (mix.next(), mix.next(), mix.next(), mix.next())
    }

    mutating func next() -> UInt64 {
        let result = ((s.1 &* 5) << 7 | (s.1 &* 5) >> 57) &* 9
        let t = s.1 << 17
        s.2 ^= s.0; s.3 ^= s.1; s.1 ^= s.2; s.0 ^= s.3
        s.2 ^= t
        s.3 = s.3 << 45 | s.3 >> 19
        return result
    }

    /// Uniform in `range` (modulo bias is irrelevant here).
    mutating func int(_ range: ClosedRange<Int>) -> Int {
        range.lowerBound + Int(next() % UInt64(range.upperBound - range.lowerBound + 1))
    }

    /// True with probability `perMille`/1000.
    mutating func chance(_ perMille: Int) -> Bool { Int(next() % 1000) < perMille }

    mutating func pick<T>(_ items: [T]) -> T { items[int(0...items.count - 1)] }
}
