import EdgeMatrixConsensus
import EdgeMatrixCore
import EdgeMatrixLedger

/// The value validators agree on at each height: canonical bytes of (height, time, proposer, raw transactions,
/// equivocation evidence). Its SHA-256 is the block hash that commit certificates sign.
public struct ChainBlock: Hashable, Sendable, CanonicalCodable {
    public static let version: UInt8 = 1
    public static let maxTransactions = 20_000
    public static let maxEvidence = 100

    public var height: UInt64
    public var timeMillis: UInt64
    public var proposer: NodeID
    public var transactions: [[UInt8]]
    public var evidence: [DuplicateVoteEvidence]

    public init(height: UInt64, timeMillis: UInt64, proposer: NodeID, transactions: [[UInt8]], evidence: [DuplicateVoteEvidence]) {
        self.height = height
        self.timeMillis = timeMillis
        self.proposer = proposer
        self.transactions = transactions
        self.evidence = evidence
    }

    public func encode(to writer: inout ByteWriter) {
        writer.write(Self.version)
        writer.write(height)
        writer.write(timeMillis)
        proposer.encode(to: &writer)
        writer.write(UInt32(transactions.count))
        for tx in transactions { writer.write(bytes: tx) }
        writer.write(UInt32(evidence.count))
        for e in evidence { writer.write(bytes: e.canonicalBytes) }
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let version = try reader.readUInt8()
        guard version == Self.version else { throw .invalidValue("block version \(version)") }
        height = try reader.readUInt64()
        timeMillis = try reader.readUInt64()
        proposer = try NodeID(from: &reader)
        let count = try reader.readUInt32()
        guard count <= Self.maxTransactions else { throw .invalidValue("block has \(count) transactions; the limit is \(Self.maxTransactions)") }
        var txs = [[UInt8]]()
        txs.reserveCapacity(Int(count))
        for _ in 0..<count { txs.append(try reader.readBytes()) }
        transactions = txs
        let evidenceCount = try reader.readUInt32()
        guard evidenceCount <= Self.maxEvidence else {
            throw .invalidValue("block has \(evidenceCount) pieces of evidence; the limit is \(Self.maxEvidence)")
        }
        var evidence = [DuplicateVoteEvidence]()
        for _ in 0..<evidenceCount { evidence.append(try DuplicateVoteEvidence(canonicalBytes: try reader.readBytes())) }
        self.evidence = evidence
    }

    public var hash: Hash32 { Hash32.of(canonicalBytes) }
}

/// Errors of the validator node, with what to do about them.
public enum ChainError: Error, CustomStringConvertible, Sendable {
    case genesis(String)
    case storage(String)
    case wal(String)
    case corruptBlock(height: UInt64, reason: String)
    case replayMismatch(height: UInt64, stored: Hash32, computed: Hash32)

    public var description: String {
        switch self {
        case .genesis(let why): "genesis: \(why)"
        case .storage(let why): "block store: \(why)"
        case .wal(let why): "consensus WAL: \(why); the node stops so that it can never sign two conflicting votes"
        case .corruptBlock(let height, let reason): "stored block \(height) is unreadable: \(reason)"
        case .replayMismatch(let height, let stored, let computed):
            "replaying block \(height) gives state root \(computed.hex), but \(stored.hex) was stored: the data dir is from another chain or build"
        }
    }
}

/// Stable snake_case code for a ledger error (API and CLI).
func errorCode(_ error: LedgerError) -> String {
    switch error {
    case .tooOld: return "too_old"
    case .badSignature: return "bad_signature"
    case .badNodeSignature: return "bad_node_signature"
    case .registrationOwnerMismatch: return "registration_owner_mismatch"
    default:
        let label = Mirror(reflecting: error).children.first?.label ?? "generic_error"
        var out = ""
        for ch in label {
            if ch.isUppercase { out += "_" + ch.lowercased() } else { out.append(ch) }
        }
        return out
    }
}

func wallClockMillis() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return UInt64(ts.tv_sec) * 1000 + UInt64(ts.tv_nsec) / 1_000_000
}

#if canImport(Glibc)
import Glibc
#endif
