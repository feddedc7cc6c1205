import EdgeMatrixCore
import Foundation
import GRPCCore
import SwiftProtobuf

// Validator-to-validator transport. Every validator dials every other validator and keeps one Gossip stream open:
//  1. client → hello(its node key, a fresh nonce, chain id)
//  2. server → challenge(its node key, a fresh nonce, signature over both nonces and keys)  [peerHandshake domain]
//  3. client → auth(signature over the same transcript)
//  4. server → accepted, or rejected(code, message) when the key is not a pinned validator
// After that the client pushes consensus messages, transactions and its committed height; the server pushes its
// committed height. Block sync is a separate unary call, GetBlocks, that returns committed blocks with certificates.
//
// On the wire these are the protobuf messages of proto/edgematrix/peer/v1/peer.proto (generated code in
// Generated/). The Swift types below are what the node works with: `init(proto:)` checks every field a peer sent
// (sizes, keys) before anything else sees it, and signed payloads stay the exact canonical bytes that were signed.

public enum PeerFrame: Hashable, Sendable {
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

    /// Bounds on the handshake fields (honest peers stay far below; anything above is refused before use).
    public static let maxChainIDBytes = 64
    public static let maxSignatureBytes = 64
    public static let maxRejectCodeBytes = 64
    public static let maxRejectMessageBytes = 4_096
}

extension PeerFrame: ProtobufWireMessage {
    public var proto: Edgematrix_Peer_V1_PeerFrame {
        var frame = Edgematrix_Peer_V1_PeerFrame()
        switch self {
        case .hello(let key, let nonce, let chainID):
            frame.hello = .with { $0.nodeKey = Data(key.rawRepresentation); $0.nonce = Data(nonce); $0.chainID = chainID }
        case .challenge(let key, let nonce, let signature):
            frame.challenge = .with { $0.nodeKey = Data(key.rawRepresentation); $0.nonce = Data(nonce); $0.signature = Data(signature) }
        case .auth(let signature):
            frame.auth = .with { $0.signature = Data(signature) }
        case .accepted:
            frame.accepted = Edgematrix_Peer_V1_Accepted()
        case .rejected(let code, let message):
            frame.rejected = .with { $0.code = code; $0.message = message }
        case .consensus(let bytes):
            frame.consensus = Data(bytes)
        case .tx(let bytes):
            frame.tx = Data(bytes)
        case .status(let height):
            frame.status = .with { $0.height = height }
        }
        return frame
    }

    public init(proto frame: Edgematrix_Peer_V1_PeerFrame) throws(DecodingError) {
        switch frame.kind {
        case .hello(let hello)?:
            self = .hello(nodeKey: try ProtobufWire.key(hello.nodeKey, "hello.node_key"),
                          nonce: try ProtobufWire.exact(hello.nonce, PeerHandshake.nonceLength, "hello.nonce"),
                          chainID: try ProtobufWire.bounded(hello.chainID, Self.maxChainIDBytes, "hello.chain_id"))
        case .challenge(let challenge)?:
            self = .challenge(nodeKey: try ProtobufWire.key(challenge.nodeKey, "challenge.node_key"),
                              nonce: try ProtobufWire.exact(challenge.nonce, PeerHandshake.nonceLength, "challenge.nonce"),
                              signature: try ProtobufWire.bounded(challenge.signature, Self.maxSignatureBytes, "challenge.signature"))
        case .auth(let auth)?:
            self = .auth(signature: try ProtobufWire.bounded(auth.signature, Self.maxSignatureBytes, "auth.signature"))
        case .accepted?:
            self = .accepted
        case .rejected(let rejected)?:
            self = .rejected(code: try ProtobufWire.bounded(rejected.code, Self.maxRejectCodeBytes, "rejected.code"),
                             message: try ProtobufWire.bounded(rejected.message, Self.maxRejectMessageBytes, "rejected.message"))
        case .consensus(let bytes)?:
            self = .consensus([UInt8](bytes))
        case .tx(let bytes)?:
            self = .tx([UInt8](bytes))
        case .status(let status)?:
            self = .status(height: status.height)
        case nil:
            throw .invalidValue("peer frame with no kind set")
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
    /// Canonical encoding (docs/PROTOCOL.md § 1), independent of the protobuf framing of the frames.
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
public struct BlockRangeRequest: Hashable, Sendable, ProtobufWireMessage {
    public var from: UInt64
    public var limit: UInt32
    public init(from: UInt64, limit: UInt32) {
        self.from = from
        self.limit = limit
    }
    public var proto: Edgematrix_Peer_V1_BlockRangeRequest {
        .with { $0.fromHeight = from; $0.limit = limit }
    }
    public init(proto request: Edgematrix_Peer_V1_BlockRangeRequest) throws(DecodingError) {
        self.init(from: request.fromHeight, limit: request.limit)
    }
}

/// Committed blocks as (value bytes, canonical commit certificate) pairs, in height order.
public struct BlockRangeResponse: Hashable, Sendable, ProtobufWireMessage {
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

    /// The most entries a response may hold; counted on the raw bytes, before any entry is allocated.
    public static let maxBlocks = 10_000

    public var proto: Edgematrix_Peer_V1_BlockRangeResponse {
        .with { response in
            response.latestHeight = latestHeight
            response.blocks = blocks.map { entry in .with { $0.block = Data(entry.value); $0.certificate = Data(entry.certificate) } }
        }
    }

    public static func precheck(_ bytes: [UInt8]) throws(DecodingError) {
        // Field 2 (`blocks`) repeated: an empty entry is 2 bytes, so 64 MiB could otherwise hold 32 million of them.
        let count = try ProtobufWire.occurrences(ofField: 2, in: bytes, limit: maxBlocks)
        guard count <= maxBlocks else { throw .invalidValue("too many blocks: more than \(maxBlocks)") }
    }

    public init(proto response: Edgematrix_Peer_V1_BlockRangeResponse) throws(DecodingError) {
        guard response.blocks.count <= Self.maxBlocks else { throw .invalidValue("too many blocks: \(response.blocks.count)") }
        latestHeight = response.latestHeight
        blocks = response.blocks.map { Entry(value: [UInt8]($0.block), certificate: [UInt8]($0.certificate)) }
    }
}

/// The validator peer service (`edgematrix.peer.v1.Peer`): served and called by validators.
public enum PeerService {
    public static let descriptor = Edgematrix_Peer_V1_Peer.descriptor
    public static let gossip = Edgematrix_Peer_V1_Peer.Method.Gossip.descriptor
    public static let getBlocks = Edgematrix_Peer_V1_Peer.Method.GetBlocks.descriptor
    /// The largest gRPC message a validator accepts (blocks with many transactions, block ranges).
    public static let maxMessageBytes = 64 << 20
}
