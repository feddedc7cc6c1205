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
