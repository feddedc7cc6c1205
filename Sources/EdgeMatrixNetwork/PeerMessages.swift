import EdgeMatrixCore
import GRPCCore

// Validator-to-validator transport. Every validator dials every other validator and keeps one Gossip stream open:
//  1. client → hello(its node key, a fresh nonce, chain id)
//  2. server → challenge(its node key, a fresh nonce, signature over both nonces and keys)  [peerHandshake domain]
//  3. client → auth(signature over the same transcript)
//  4. server → accepted, or rejected(code, message) when the key is not a pinned validator
// After that the client pushes consensus messages, transactions and its committed height; the server pushes its
// committed height. Block sync is a separate unary call, GetBlocks, that returns committed blocks with certificates.

public enum PeerFrame: Hashable, Sendable, CanonicalCodable {
    case hello(nodeKey: PublicKey, nonce: [UInt8], chainID: String)
    case challenge(nodeKey: PublicKey, nonce: [UInt8], signature: [UInt8])
    case auth(signature: [UInt8])
    case accepted
    case rejected(code: String, message: String)
    /// A canonical `ConsensusMessage` (signed by its author; verified by the engine).
    case consensus([UInt8])
    /// A signed transaction in wire form.
    case tx([UInt8])
    /// The sender's last committed height.
    case status(height: UInt64)

    public func encode(to writer: inout ByteWriter) {
        switch self {
        case .hello(let key, let nonce, let chainID):
            writer.write(UInt8(1)); key.encode(to: &writer); writer.write(bytes: nonce); writer.write(chainID)
        case .challenge(let key, let nonce, let signature):
            writer.write(UInt8(2)); key.encode(to: &writer); writer.write(bytes: nonce); writer.write(bytes: signature)
        case .auth(let signature):
            writer.write(UInt8(3)); writer.write(bytes: signature)
        case .accepted:
            writer.write(UInt8(4))
        case .rejected(let code, let message):
            writer.write(UInt8(5)); writer.write(code); writer.write(message)
        case .consensus(let bytes):
            writer.write(UInt8(6)); writer.write(bytes: bytes)
        case .tx(let bytes):
            writer.write(UInt8(7)); writer.write(bytes: bytes)
        case .status(let height):
            writer.write(UInt8(8)); writer.write(height)
        }
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        switch try reader.readUInt8() {
        case 1: self = .hello(nodeKey: try PublicKey(from: &reader), nonce: try reader.readBytes(), chainID: try reader.readString())
        case 2: self = .challenge(nodeKey: try PublicKey(from: &reader), nonce: try reader.readBytes(), signature: try reader.readBytes())
        case 3: self = .auth(signature: try reader.readBytes())
        case 4: self = .accepted
        case 5: self = .rejected(code: try reader.readString(), message: try reader.readString())
        case 6: self = .consensus(try reader.readBytes())
        case 7: self = .tx(try reader.readBytes())
        case 8: self = .status(height: try reader.readUInt64())
        case let tag: throw .invalidValue("peer frame tag \(tag)")
        }
    }
}

public enum PeerHandshake {
    public static let nonceLength = 32

    public static func randomNonce() -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<nonceLength).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
    }

    /// The transcript both sides sign; `role` is "server" or "client" so neither signature can stand for the other.
    public static func transcript(role: String, chainID: String, clientKey: PublicKey, clientNonce: [UInt8],
                                  serverKey: PublicKey, serverNonce: [UInt8]) -> [UInt8] {
        var writer = ByteWriter(capacity: 200)
        writer.write(role)
        writer.write(chainID)
        clientKey.encode(to: &writer)
        writer.write(bytes: clientNonce)
        serverKey.encode(to: &writer)
        writer.write(bytes: serverNonce)
        return writer.bytes
    }
}

/// GetBlocks request: committed blocks from `from`, at most `limit`.
public struct BlockRangeRequest: Hashable, Sendable, CanonicalCodable {
    public var from: UInt64
    public var limit: UInt32
    public init(from: UInt64, limit: UInt32) {
        self.from = from
        self.limit = limit
    }
    public func encode(to writer: inout ByteWriter) { writer.write(from); writer.write(limit) }
    public init(from reader: inout ByteReader) throws(DecodingError) {
        from = try reader.readUInt64()
        limit = try reader.readUInt32()
    }
}

/// Committed blocks as (value bytes, canonical commit certificate) pairs, in height order.
public struct BlockRangeResponse: Hashable, Sendable, CanonicalCodable {
    public struct Entry: Hashable, Sendable {
        public var value: [UInt8]
        public var certificate: [UInt8]
        public init(value: [UInt8], certificate: [UInt8]) {
            self.value = value
            self.certificate = certificate
        }
    }
    public var latestHeight: UInt64
    public var blocks: [Entry]
    public init(latestHeight: UInt64, blocks: [Entry]) {
        self.latestHeight = latestHeight
        self.blocks = blocks
    }
    public func encode(to writer: inout ByteWriter) {
        writer.write(latestHeight)
        writer.write(UInt32(blocks.count))
        for block in blocks { writer.write(bytes: block.value); writer.write(bytes: block.certificate) }
    }
    public init(from reader: inout ByteReader) throws(DecodingError) {
        latestHeight = try reader.readUInt64()
        let count = try reader.readUInt32()
        guard count <= 10_000 else { throw .invalidValue("too many blocks: \(count)") }
        var blocks = [Entry]()
        for _ in 0..<count { blocks.append(Entry(value: try reader.readBytes(), certificate: try reader.readBytes())) }
        self.blocks = blocks
    }
}

/// The validator peer service: served and called by validators.
public enum PeerService {
    public static let descriptor = ServiceDescriptor(fullyQualifiedService: "edgematrix.v1.Peer")
    public static let gossip = MethodDescriptor(service: descriptor, method: "Gossip", type: .bidirectionalStreaming)
    public static let getBlocks = MethodDescriptor(service: descriptor, method: "GetBlocks", type: .unary)
    /// The largest gRPC message a validator accepts (blocks with many transactions, block ranges).
    public static let maxMessageBytes = 64 << 20
}
