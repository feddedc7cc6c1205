import EdgeMatrixCore

public typealias Height = UInt64
public typealias Round = UInt32

/// The two kinds of vote in a Tendermint round.
public enum VoteType: UInt8, Sendable, Hashable, CustomStringConvertible {
    case prevote = 1
    case precommit = 2

    public var description: String { self == .prevote ? "prevote" : "precommit" }
}

/// Signs consensus messages. `SigningKey` is one; a remote signer or HSM can be another.
public protocol ConsensusSigner: Sendable {
    var publicKey: PublicKey { get }
    func sign(_ bytes: [UInt8], domain: SigningDomain) -> [UInt8]
}

extension SigningKey: ConsensusSigner {}

/// Checks signatures. The default is plain Ed25519; a host (or the simulation) may cache results, since the same
/// gossiped vote reaches a node many times.
public protocol SignatureVerifier: Sendable {
    func isValidSignature(_ signature: [UInt8], for bytes: [UInt8], domain: SigningDomain, publicKey: PublicKey) -> Bool
}

public struct Ed25519Verifier: SignatureVerifier {
    public init() {}
    public func isValidSignature(_ signature: [UInt8], for bytes: [UInt8], domain: SigningDomain, publicKey: PublicKey) -> Bool {
        publicKey.isValidSignature(signature, for: bytes, domain: domain)
    }
}

// MARK: - Vote

/// What a validator signs when it votes. `value == nil` is a vote for nil ("no block this round").
/// The chain id is part of the signed bytes so a vote can never be replayed on another chain.
public struct VoteBody: Hashable, Sendable, CanonicalCodable {
    public static let version: UInt8 = 1

    public var chainID: String
    public var type: VoteType
    public var height: Height
    public var round: Round
    public var value: Hash32?
    public var validator: NodeID

    public init(chainID: String, type: VoteType, height: Height, round: Round, value: Hash32?, validator: NodeID) {
        self.chainID = chainID
        self.type = type
        self.height = height
        self.round = round
        self.value = value
        self.validator = validator
    }

    public func encode(to writer: inout ByteWriter) {
        writer.write(Self.version)
        writer.write(chainID)
        writer.write(type.rawValue)
        writer.write(height)
        writer.write(round)
        writer.write(value != nil)
        if let value { value.encode(to: &writer) }
        validator.encode(to: &writer)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let version = try reader.readUInt8()
        guard version == Self.version else { throw .invalidValue("vote version \(version)") }
        chainID = try reader.readString()
        let rawType = try reader.readUInt8()
        guard let type = VoteType(rawValue: rawType) else { throw .invalidValue("vote type \(rawType)") }
        self.type = type
        height = try reader.readUInt64()
        round = try reader.readUInt32()
        value = try reader.readBool() ? try Hash32(from: &reader) : nil
        validator = try NodeID(from: &reader)
    }
}

/// A vote as it travels: the exact bytes the validator signed plus the signature. Signatures are always
/// checked over `bodyBytes`, never over a re-encoding.
public struct SignedVote: Hashable, Sendable, CanonicalCodable, CustomStringConvertible {
    public let body: VoteBody
    public let bodyBytes: [UInt8]
    public let signature: [UInt8]

    public init(signing body: VoteBody, with signer: any ConsensusSigner) {
        self.body = body
        bodyBytes = body.canonicalBytes
        signature = signer.sign(bodyBytes, domain: .vote)
    }

    public init(bodyBytes: [UInt8], signature: [UInt8]) throws(DecodingError) {
        body = try VoteBody(canonicalBytes: bodyBytes)
        self.bodyBytes = bodyBytes
        self.signature = signature
    }

    public var type: VoteType { body.type }
    public var height: Height { body.height }
    public var round: Round { body.round }
    public var value: Hash32? { body.value }
    public var validator: NodeID { body.validator }

    /// Checks chain, membership and signature. Height, round and step are the engine's business.
    public func verify(chainID: String, validators: ValidatorSet,
                       verifier: any SignatureVerifier = Ed25519Verifier()) throws(ConsensusError) {
        guard body.chainID == chainID else { throw .wrongChain(expected: chainID, got: body.chainID) }
        guard let validator = validators.validator(for: body.validator) else {
            throw .notAValidator(body.validator, height: body.height)
        }
        guard verifier.isValidSignature(signature, for: bodyBytes, domain: .vote, publicKey: validator.publicKey) else {
            throw .badSignature("\(body.type) of \(body.validator.short) at \(body.height)/\(body.round)")
        }
    }

    public func encode(to writer: inout ByteWriter) {
        writer.write(bytes: bodyBytes)
        writer.write(bytes: signature)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        try self.init(bodyBytes: try reader.readBytes(), signature: try reader.readBytes())
    }

    public var description: String {
        "\(body.type)(\(body.height)/\(body.round) \(body.value.map { String($0.hex.prefix(8)) } ?? "nil") by \(body.validator.short))"
    }
}

// MARK: - Proposal

/// What a proposer signs: the value's hash (not the value itself, which travels alongside) and the round of
/// the proof-of-lock it re-proposes, if any (`validRound`, -1 in the paper).
public struct ProposalBody: Hashable, Sendable, CanonicalCodable {
    public static let version: UInt8 = 1

    public var chainID: String
    public var height: Height
    public var round: Round
    public var validRound: Round?
    public var value: Hash32
    public var proposer: NodeID

    public init(chainID: String, height: Height, round: Round, validRound: Round?, value: Hash32, proposer: NodeID) {
        self.chainID = chainID
        self.height = height
        self.round = round
        self.validRound = validRound
        self.value = value
        self.proposer = proposer
    }

    public func encode(to writer: inout ByteWriter) {
        writer.write(Self.version)
        writer.write(chainID)
        writer.write(height)
        writer.write(round)
        writer.write(validRound != nil)
        if let validRound { writer.write(validRound) }
        value.encode(to: &writer)
        proposer.encode(to: &writer)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let version = try reader.readUInt8()
        guard version == Self.version else { throw .invalidValue("proposal version \(version)") }
        chainID = try reader.readString()
        height = try reader.readUInt64()
        round = try reader.readUInt32()
        validRound = try reader.readBool() ? try reader.readUInt32() : nil
        value = try Hash32(from: &reader)
        proposer = try NodeID(from: &reader)
    }
}

/// A signed proposal plus the proposed value (opaque bytes: the engine never looks inside a block).
public struct SignedProposal: Hashable, Sendable, CanonicalCodable, CustomStringConvertible {
    public let body: ProposalBody
    public let bodyBytes: [UInt8]
    public let signature: [UInt8]
    public let value: [UInt8]

    public init(signing body: ProposalBody, value: [UInt8], with signer: any ConsensusSigner) {
        self.body = body
        bodyBytes = body.canonicalBytes
        signature = signer.sign(bodyBytes, domain: .proposal)
        self.value = value
    }

    public init(bodyBytes: [UInt8], signature: [UInt8], value: [UInt8]) throws(DecodingError) {
        body = try ProposalBody(canonicalBytes: bodyBytes)
        self.bodyBytes = bodyBytes
        self.signature = signature
        self.value = value
    }

    public var height: Height { body.height }
    public var round: Round { body.round }
    public var valueID: Hash32 { body.value }

    /// Checks chain, that the value matches the signed hash, membership and signature. Whether the signer is
    /// the round's proposer is checked by the engine (it knows the proposer schedule).
    public func verify(chainID: String, validators: ValidatorSet,
                       verifier: any SignatureVerifier = Ed25519Verifier()) throws(ConsensusError) {
        guard body.chainID == chainID else { throw .wrongChain(expected: chainID, got: body.chainID) }
        guard Hash32.of(value) == body.value else { throw .valueHashMismatch(height: body.height, round: body.round) }
        if let validRound = body.validRound, validRound >= body.round {
            throw .malformed("proposal at round \(body.round) claims valid round \(validRound)")
        }
        guard let validator = validators.validator(for: body.proposer) else {
            throw .notAValidator(body.proposer, height: body.height)
        }
        guard verifier.isValidSignature(signature, for: bodyBytes, domain: .proposal, publicKey: validator.publicKey) else {
            throw .badSignature("proposal of \(body.proposer.short) at \(body.height)/\(body.round)")
        }
    }

    public func encode(to writer: inout ByteWriter) {
        writer.write(bytes: bodyBytes)
        writer.write(bytes: signature)
        writer.write(bytes: value)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        try self.init(bodyBytes: try reader.readBytes(), signature: try reader.readBytes(), value: try reader.readBytes())
    }

    public var description: String {
        "proposal(\(body.height)/\(body.round) \(body.value.hex.prefix(8)) vr=\(body.validRound.map(String.init) ?? "-") by \(body.proposer.short))"
    }
}

/// Everything validators gossip to each other about consensus.
public enum ConsensusMessage: Hashable, Sendable, CanonicalCodable, CustomStringConvertible {
    case proposal(SignedProposal)
    case vote(SignedVote)

    public var height: Height {
        switch self {
        case .proposal(let p): p.height
        case .vote(let v): v.height
        }
    }

    public var round: Round {
        switch self {
        case .proposal(let p): p.round
        case .vote(let v): v.round
        }
    }

    public func encode(to writer: inout ByteWriter) {
        switch self {
        case .proposal(let p): writer.write(UInt8(1)); p.encode(to: &writer)
        case .vote(let v): writer.write(UInt8(2)); v.encode(to: &writer)
        }
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        switch try reader.readUInt8() {
        case 1: self = .proposal(try SignedProposal(from: &reader))
        case 2: self = .vote(try SignedVote(from: &reader))
        case let tag: throw .invalidValue("consensus message tag \(tag)")
        }
    }

    public var description: String {
        switch self {
        case .proposal(let p): p.description
        case .vote(let v): v.description
        }
    }
}

// MARK: - Errors

public enum ConsensusError: Error, Hashable, Sendable, CustomStringConvertible {
    case malformed(String)
    case wrongChain(expected: String, got: String)
    case notAValidator(NodeID, height: Height)
    case badSignature(String)
    case valueHashMismatch(height: Height, round: Round)
    case notProposer(NodeID, height: Height, round: Round)
    case insufficientVotingPower(have: UInt64, total: UInt64)
    case certificateMismatch(String)
    case invalidValidatorSet(String)
    case invalidEvidence(String)
    case walCorrupted(offset: UInt64, reason: String)
    case walIO(String)
    case alreadyStarted(height: Height)

    public var description: String {
        switch self {
        case .malformed(let why): "malformed consensus message: \(why)"
        case .wrongChain(let expected, let got): "message is for chain '\(got)', this is chain '\(expected)'"
        case .notAValidator(let id, let height): "\(id) is not a validator at height \(height)"
        case .badSignature(let what): "signature does not verify: \(what)"
        case .valueHashMismatch(let height, let round): "proposal at \(height)/\(round): value does not match its signed hash"
        case .notProposer(let id, let height, let round): "\(id) is not the proposer of \(height)/\(round)"
        case .insufficientVotingPower(let have, let total):
            "signatures carry \(have) of \(total) voting power; more than 2/3 is needed"
        case .certificateMismatch(let why): "commit certificate does not match: \(why)"
        case .invalidValidatorSet(let why): "invalid validator set: \(why)"
        case .invalidEvidence(let why): "invalid evidence: \(why)"
        case .walCorrupted(let offset, let reason): "write-ahead log corrupted at byte \(offset): \(reason)"
        case .walIO(let why): "write-ahead log I/O failed: \(why)"
        case .alreadyStarted(let height): "consensus already started (at height \(height)); create a new engine to restart"
        }
    }
}
