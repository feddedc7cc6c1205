import EdgeMatrixCore

/// One validator: its key, its stake-weighted voting power and its proposer priority.
public struct Validator: Hashable, Sendable {
    public let publicKey: PublicKey
    public let id: NodeID
    public internal(set) var votingPower: UInt64
    /// Tendermint's proposer priority; grows by `votingPower` each step and drops by the total when proposing.
    public internal(set) var proposerPriority: Int64

    public init(publicKey: PublicKey, votingPower: UInt64, proposerPriority: Int64 = 0) {
        self.publicKey = publicKey
        self.id = publicKey.nodeID
        self.votingPower = votingPower
        self.proposerPriority = proposerPriority
    }
}

/// A change of one validator's power, decided by the application (e.g. from stake). Power 0 removes it.
public struct ValidatorUpdate: Hashable, Sendable, CanonicalCodable {
    public var publicKey: PublicKey
    public var votingPower: UInt64

    public init(publicKey: PublicKey, votingPower: UInt64) {
        self.publicKey = publicKey
        self.votingPower = votingPower
    }

    public func encode(to writer: inout ByteWriter) {
        publicKey.encode(to: &writer)
        writer.write(votingPower)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        publicKey = try PublicKey(from: &reader)
        votingPower = try reader.readUInt64()
    }
}

/// The validators of one height, in canonical order (by node id), so every node indexes them identically.
/// Quorum is more than 2/3 of the total voting power; "f+1" is more than 1/3.
public struct ValidatorSet: Hashable, Sendable, CanonicalCodable {
    /// Keeps `power * 3` and priority arithmetic far from overflow (CometBFT uses the same bound).
    public static let maxTotalVotingPower: UInt64 = UInt64(Int64.max) / 8

    public private(set) var validators: [Validator]
    public private(set) var totalVotingPower: UInt64
    private var indexByID: [NodeID: Int]

    public init(_ members: [(publicKey: PublicKey, votingPower: UInt64)]) throws(ConsensusError) {
        try self.init(validators: members.map { Validator(publicKey: $0.publicKey, votingPower: $0.votingPower) })
    }

    public init(validators: [Validator]) throws(ConsensusError) {
        guard !validators.isEmpty else { throw .invalidValidatorSet("no validators") }
        let sorted = validators.sorted { $0.id < $1.id }
        var total: UInt64 = 0
        var index = [NodeID: Int]()
        for (i, validator) in sorted.enumerated() {
            guard validator.votingPower > 0 else {
                throw .invalidValidatorSet("validator \(validator.id) has zero voting power")
            }
            guard index[validator.id] == nil else { throw .invalidValidatorSet("validator \(validator.id) appears twice") }
            index[validator.id] = i
            let (sum, overflow) = total.addingReportingOverflow(validator.votingPower)
            guard !overflow, sum <= Self.maxTotalVotingPower else {
                throw .invalidValidatorSet("total voting power exceeds \(Self.maxTotalVotingPower)")
            }
            total = sum
        }
        self.validators = sorted
        self.totalVotingPower = total
        self.indexByID = index
    }

    public var count: Int { validators.count }
    public func index(of id: NodeID) -> Int? { indexByID[id] }
    public func validator(for id: NodeID) -> Validator? { indexByID[id].map { validators[$0] } }
    public func power(of id: NodeID) -> UInt64 { validator(for: id)?.votingPower ?? 0 }

    /// More than 2/3 of the total power.
    public func isQuorum(_ power: UInt64) -> Bool { power * 3 > totalVotingPower * 2 }
    /// More than 1/3 of the total power: at least one honest validator is among them.
    public func exceedsOneThird(_ power: UInt64) -> Bool { power * 3 > totalVotingPower }

    /// Hash of membership and powers (not priorities): what a block header commits to.
    public var hash: Hash32 {
        var writer = ByteWriter()
        writer.write(UInt32(validators.count))
        for v in validators { v.publicKey.encode(to: &writer); writer.write(v.votingPower) }
        return Hash32.of(writer.bytes)
    }

    // MARK: Proposer selection (Tendermint's weighted round robin)

    /// The proposer of `round` at the height this set belongs to: priorities advanced `round + 1` times on a copy.
    /// Deterministic, and over many rounds each validator proposes in proportion to its power.
    public func proposer(round: Round) -> Validator {
        var copy = self
        return copy.advanceProposerPriority(times: Int(round) + 1)
    }

    /// Advances priorities `times` steps and returns the last step's proposer. The engine advances once per height.
    @discardableResult
    public mutating func advanceProposerPriority(times: Int) -> Validator {
        precondition(times > 0)
        let total = Int64(totalVotingPower)
        rescalePriorities(window: 2 * total)
        shiftByAveragePriority()
        var chosen = 0
        for _ in 0..<times {
            for i in validators.indices { validators[i].proposerPriority += Int64(validators[i].votingPower) }
            chosen = 0
            for i in validators.indices.dropFirst() where validators[i].proposerPriority > validators[chosen].proposerPriority {
                chosen = i  // strict '>' keeps ties on the lowest node id
            }
            validators[chosen].proposerPriority -= total
        }
        return validators[chosen]
    }

    /// Keeps the spread of priorities within `window` so a long-absent validator cannot bank unbounded priority.
    private mutating func rescalePriorities(window: Int64) {
        guard let maxP = validators.map(\.proposerPriority).max(), let minP = validators.map(\.proposerPriority).min() else { return }
        let diff = maxP - minP
        guard window > 0, diff > window else { return }
        let ratio = (diff + window - 1) / window
        for i in validators.indices { validators[i].proposerPriority /= ratio }
    }

    /// Centers priorities around zero so they stay bounded.
    private mutating func shiftByAveragePriority() {
        let sum = validators.reduce(Int64(0)) { $0 + $1.proposerPriority }
        let average = sum / Int64(validators.count)
        for i in validators.indices { validators[i].proposerPriority -= average }
    }

    // MARK: Updates

    /// Applies updates from the application. New validators start with a low priority (-1.125 × total, as in
    /// CometBFT) so that joining, leaving and re-joining never jumps the proposer queue.
    public func applying(_ updates: [ValidatorUpdate]) throws(ConsensusError) -> ValidatorSet {
        var byID = [NodeID: Validator]()
        for v in validators { byID[v.id] = v }
        var added = [NodeID]()
        var seen = Set<NodeID>()
        for update in updates {
            let id = update.publicKey.nodeID
            guard seen.insert(id).inserted else { throw .invalidValidatorSet("two updates for validator \(id)") }
            if update.votingPower == 0 {
                guard byID.removeValue(forKey: id) != nil else {
                    throw .invalidValidatorSet("cannot remove \(id): not a validator")
                }
            } else if var existing = byID[id] {
                existing.votingPower = update.votingPower
                byID[id] = existing
            } else {
                byID[id] = Validator(publicKey: update.publicKey, votingPower: update.votingPower)
                added.append(id)
            }
        }
        var next = try ValidatorSet(validators: Array(byID.values))
        let newcomerPriority = -Int64(next.totalVotingPower + next.totalVotingPower / 8)
        for id in added { next.validators[next.indexByID[id]!].proposerPriority = newcomerPriority }
        return next
    }

    // MARK: Encoding (with priorities, so a restarted node resumes the same proposer schedule)

    public func encode(to writer: inout ByteWriter) {
        writer.write(UInt32(validators.count))
        for v in validators {
            v.publicKey.encode(to: &writer)
            writer.write(v.votingPower)
            writer.write(v.proposerPriority)
        }
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let count = Int(try reader.readUInt32())
        guard count <= 100_000 else { throw .invalidValue("validator count \(count)") }
        var list = [Validator]()
        for _ in 0..<count {
            let key = try PublicKey(from: &reader)
            let power = try reader.readUInt64()
            list.append(Validator(publicKey: key, votingPower: power, proposerPriority: try reader.readInt64()))
        }
        do { self = try ValidatorSet(validators: list) } catch { throw .invalidValue(error.description) }
        guard validators.map(\.id) == list.map(\.id) else { throw .invalidValue("validators not in canonical order") }
    }

    public static func == (lhs: ValidatorSet, rhs: ValidatorSet) -> Bool { lhs.validators == rhs.validators }
    public func hash(into hasher: inout Hasher) { hasher.combine(validators) }
}
