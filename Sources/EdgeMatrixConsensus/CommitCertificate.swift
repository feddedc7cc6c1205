import EdgeMatrixCore

/// One validator's precommit signature inside a certificate. The signed bytes are rebuilt from the
/// certificate's fields, so a certificate is compact and cannot smuggle in a vote for something else.
public struct CommitSignature: Hashable, Sendable, CanonicalCodable {
    public var validator: NodeID
    public var signature: [UInt8]

    public init(validator: NodeID, signature: [UInt8]) {
        self.validator = validator
        self.signature = signature
    }

    public func encode(to writer: inout ByteWriter) {
        validator.encode(to: &writer)
        writer.write(bytes: signature)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        validator = try NodeID(from: &reader)
        signature = try reader.readBytes()
    }
}

/// Proof that a value was decided at a height: precommits for it from more than 2/3 of the voting power in one
/// round. A lagging or new validator checks this before accepting a block fetched from a peer.
public struct CommitCertificate: Hashable, Sendable, CanonicalCodable {
    public var height: Height
    public var round: Round
    public var value: Hash32
    /// In validator-set order.
    public var signatures: [CommitSignature]

    public init(height: Height, round: Round, value: Hash32, signatures: [CommitSignature]) {
        self.height = height
        self.round = round
        self.value = value
        self.signatures = signatures
    }

    /// The precommit body a signer of this certificate signed.
    public func voteBody(chainID: String, validator: NodeID) -> VoteBody {
        VoteBody(chainID: chainID, type: .precommit, height: height, round: round, value: value, validator: validator)
    }

    /// Checks every signature against `validators` (the set of `height`) and that the signers hold more than 2/3
    /// of the power. Unknown signers, duplicates and bad signatures are errors, not skipped: an honest
    /// certificate has none.
    public func verify(chainID: String, validators: ValidatorSet,
                       verifier: any SignatureVerifier = Ed25519Verifier()) throws(ConsensusError) {
        var seen = Set<NodeID>()
        var power: UInt64 = 0
        for entry in signatures {
            guard let validator = validators.validator(for: entry.validator) else {
                throw .notAValidator(entry.validator, height: height)
            }
            guard seen.insert(entry.validator).inserted else {
                throw .certificateMismatch("validator \(entry.validator) signs twice")
            }
            let bytes = voteBody(chainID: chainID, validator: entry.validator).canonicalBytes
            guard verifier.isValidSignature(entry.signature, for: bytes, domain: .vote, publicKey: validator.publicKey) else {
                throw .badSignature("precommit of \(entry.validator.short) in the commit of height \(height)")
            }
            power += validator.votingPower
        }
        guard validators.isQuorum(power) else {
            throw .insufficientVotingPower(have: power, total: validators.totalVotingPower)
        }
    }

    /// Verifies the certificate and that it commits exactly `block` at `height`.
    public func verify(block: [UInt8], height expected: Height, chainID: String, validators: ValidatorSet,
                       verifier: any SignatureVerifier = Ed25519Verifier()) throws(ConsensusError) {
        guard height == expected else { throw .certificateMismatch("certificate is for height \(height), not \(expected)") }
        guard Hash32.of(block) == value else { throw .certificateMismatch("block hash differs from the certified value") }
        try verify(chainID: chainID, validators: validators, verifier: verifier)
    }

    public func encode(to writer: inout ByteWriter) {
        writer.write(height)
        writer.write(round)
        value.encode(to: &writer)
        writer.write(UInt32(signatures.count))
        for s in signatures { s.encode(to: &writer) }
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        height = try reader.readUInt64()
        round = try reader.readUInt32()
        value = try Hash32(from: &reader)
        let count = Int(try reader.readUInt32())
        guard count <= 100_000 else { throw .invalidValue("commit signature count \(count)") }
        var list = [CommitSignature]()
        for _ in 0..<count { list.append(try CommitSignature(from: &reader)) }
        signatures = list
    }
}

/// Two signed votes by one validator for the same height, round and type but different values: proof of
/// equivocation that anyone can check on its own, to be put in a block and slashed.
public struct DuplicateVoteEvidence: Hashable, Sendable, CanonicalCodable, CustomStringConvertible {
    /// Ordered canonically (by body bytes) so the same equivocation always yields the same evidence bytes.
    public let first: SignedVote
    public let second: SignedVote

    public init(_ a: SignedVote, _ b: SignedVote) throws(ConsensusError) {
        guard a.validator == b.validator else { throw .invalidEvidence("votes are by different validators") }
        guard a.height == b.height, a.round == b.round, a.type == b.type else {
            throw .invalidEvidence("votes are for different height/round/type")
        }
        guard a.value != b.value else { throw .invalidEvidence("votes are for the same value") }
        guard a.body.chainID == b.body.chainID else { throw .invalidEvidence("votes are for different chains") }
        if a.bodyBytes.lexicographicallyPrecedes(b.bodyBytes) { first = a; second = b } else { first = b; second = a }
    }

    public var validator: NodeID { first.validator }
    public var height: Height { first.height }
    public var round: Round { first.round }
    public var type: VoteType { first.type }

    /// `validators` must be the set of `height` (the offender must have been a validator then).
    public func verify(chainID: String, validators: ValidatorSet,
                       verifier: any SignatureVerifier = Ed25519Verifier()) throws(ConsensusError) {
        _ = try DuplicateVoteEvidence(first, second)  // re-check the structural conditions
        do {
            try first.verify(chainID: chainID, validators: validators, verifier: verifier)
            try second.verify(chainID: chainID, validators: validators, verifier: verifier)
        } catch {
            throw .invalidEvidence(error.description)
        }
    }

    public var id: Hash32 { Hash32.of(canonicalBytes) }

    public func encode(to writer: inout ByteWriter) {
        first.encode(to: &writer)
        second.encode(to: &writer)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let a = try SignedVote(from: &reader)
        let b = try SignedVote(from: &reader)
        do { self = try DuplicateVoteEvidence(a, b) } catch { throw .invalidValue(error.description) }
        guard first == a else { throw .invalidValue("evidence votes not in canonical order") }
    }

    public var description: String { "equivocation by \(validator.short) at \(height)/\(round) \(type)" }
}
