import EdgeMatrixCore
import Foundation
import GRPCCore
import SwiftProtobuf

/// A Swift value that travels as a generated protobuf message. `proto` builds the message; `init(proto:)` checks
/// every field that came from outside (sizes, keys) and is the only way such bytes become a value.
///
/// Protobuf is not a canonical encoding (field order, repeated fields, unknown fields and non-minimal varints all
/// decode to the same message), so nothing that is signed or hashed is ever a protobuf encoding: signed payloads
/// travel inside `bytes` fields in their canonical encoding (docs/PROTOCOL.md § 1).
public protocol ProtobufWireMessage: Sendable {
    associatedtype Proto: SwiftProtobuf.Message
    var proto: Proto { get }
    init(proto: Proto) throws(DecodingError)
    /// Checks on the raw bytes before they are decoded (bounding repeated fields before they are allocated).
    static func precheck(_ bytes: [UInt8]) throws(DecodingError)
}

extension ProtobufWireMessage {
    public static func precheck(_ bytes: [UInt8]) throws(DecodingError) {}

    /// The protobuf encoding of `proto`.
    public func protobufBytes() throws -> [UInt8] { try proto.serializedBytes() }

    /// Decodes and checks a message from a peer. Unknown fields are dropped; nesting is bounded by swift-protobuf's
    /// recursion limit; the total size is bounded by the transport's message limit.
    public init(protobufBytes bytes: [UInt8]) throws(DecodingError) {
        try Self.precheck(bytes)
        var options = BinaryDecodingOptions()
        options.discardUnknownFields = true
        let message: Proto
        do { message = try Proto(serializedBytes: bytes, options: options) } catch {
            throw .invalidValue("malformed protobuf \(Proto.protoMessageName): \(error)")
        }
        try self.init(proto: message)
    }
}

/// gRPC serializer for a `ProtobufWireMessage`.
public struct ProtobufWireSerializer<Message: ProtobufWireMessage>: MessageSerializer {
    public init() {}
    public func serialize<Bytes: GRPCContiguousBytes>(_ message: Message) throws -> Bytes {
        do { return Bytes(try message.protobufBytes()) } catch {
            throw RPCError(code: .internalError, message: "cannot encode \(Message.Proto.protoMessageName): \(error)")
        }
    }
}

/// gRPC deserializer for a `ProtobufWireMessage`: malformed or out-of-bounds input is `invalidArgument`.
public struct ProtobufWireDeserializer<Message: ProtobufWireMessage>: MessageDeserializer {
    public init() {}
    public func deserialize<Bytes: GRPCContiguousBytes>(_ serializedMessageBytes: Bytes) throws -> Message {
        let bytes = serializedMessageBytes.withUnsafeBytes { Array($0) }
        do { return try Message(protobufBytes: bytes) } catch {
            throw RPCError(code: .invalidArgument, message: "malformed message: \(error.description)",
                           cause: MalformedWireMessage(detail: error.description))
        }
    }
}

/// The cause of the `RPCError` a `ProtobufWireDeserializer` throws: the peer sent bytes that are not a valid message,
/// which a server tells apart from a connection that merely went away.
public struct MalformedWireMessage: Error, Sendable, CustomStringConvertible {
    public let detail: String
    public var description: String { "malformed message: \(detail)" }

    /// The malformed message behind `error`, if that is what it is.
    public static func cause(of error: any Error) -> MalformedWireMessage? {
        (error as? RPCError)?.cause as? MalformedWireMessage
    }
}

/// Field checks shared by the `init(proto:)` of peer-facing messages.
enum ProtobufWire {
    static func exact(_ data: Data, _ length: Int, _ field: String) throws(DecodingError) -> [UInt8] {
        guard data.count == length else { throw .invalidValue("\(field): expected \(length) bytes, got \(data.count)") }
        return [UInt8](data)
    }

    static func bounded(_ data: Data, _ limit: Int, _ field: String) throws(DecodingError) -> [UInt8] {
        guard data.count <= limit else { throw .lengthTooLarge(data.count, limit: limit) }
        return [UInt8](data)
    }

    static func bounded(_ text: String, _ limit: Int, _ field: String) throws(DecodingError) -> String {
        guard text.utf8.count <= limit else { throw .lengthTooLarge(text.utf8.count, limit: limit) }
        return text
    }

    static func key(_ data: Data, _ field: String) throws(DecodingError) -> PublicKey {
        do { return try PublicKey(rawRepresentation: [UInt8](data)) } catch {
            throw .invalidValue("\(field): \(error)")
        }
    }

    /// The payloads of every length-delimited occurrence of top-level field `number` (a oneof member seen more than
    /// once gives several; the decoder keeps the last). Malformed framing is an error.
    static func payloads(ofField number: UInt64, in bytes: [UInt8]) throws(DecodingError) -> [[UInt8]] {
        var payloads = [[UInt8]]()
        try walk(bytes) { field, wireType, range in
            if field == number, wireType == 2 { payloads.append(Array(bytes[range])) }
            return true
        }
        return payloads
    }

    /// How many times top-level field `number` occurs in an encoded message, counting no further than `limit` + 1.
    /// Walks the wire format without allocating; malformed framing is an error (the decoder would refuse it too).
    static func occurrences(ofField number: UInt64, in bytes: [UInt8], limit: Int) throws(DecodingError) -> Int {
        var count = 0
        try walk(bytes) { field, _, _ in
            if field == number { count += 1 }
            return count <= limit
        }
        return count
    }

    /// Walks the top-level fields of an encoded message without allocating, calling `visit` with each field number,
    /// wire type and payload range (the value's bytes; for length-delimited fields without the length) until it
    /// returns false. Malformed framing is an error (the decoder would refuse it too).
    static func walk(_ bytes: [UInt8], _ visit: (UInt64, UInt64, Range<Int>) -> Bool) throws(DecodingError) {
        var index = 0
        func varint() throws(DecodingError) -> UInt64 {
            var value: UInt64 = 0
            var shift: UInt64 = 0
            while true {
                guard index < bytes.count else { throw .truncated(needed: 1, available: 0) }
                let byte = bytes[index]
                index += 1
                guard shift < 64 else { throw .invalidValue("varint longer than 10 bytes") }
                value |= UInt64(byte & 0x7F) << shift
                if byte & 0x80 == 0 { return value }
                shift += 7
            }
        }
        func skip(_ length: UInt64) throws(DecodingError) -> Range<Int> {
            let available = bytes.count - index
            guard length <= UInt64(available) else { throw .truncated(needed: Int(clamping: length), available: available) }
            let start = index
            index += Int(length)
            return start..<index
        }
        while index < bytes.count {
            let key = try varint()
            let range: Range<Int>
            switch key & 7 {
            case 0: let start = index; _ = try varint(); range = start..<index
            case 1: range = try skip(8)
            case 2: range = try skip(try varint())
            case 5: range = try skip(4)
            default: throw .invalidValue("protobuf wire type \(key & 7)")
            }
            if !visit(key >> 3, key & 7, range) { return }
        }
    }
}

/// `edgematrix.ledger.v1.SignedTransaction` (proto/edgematrix/ledger/v1/transaction.proto): a signed transaction
/// for clients that speak protobuf. The body stays the exact canonical bytes that were signed; only the framing
/// changes, so the canonical envelope (version ‖ bytes(body) ‖ signer ‖ signature) is rebuilt around them.
public enum SignedTransactionWire {
    /// The largest protobuf body accepted (a transaction body is at most 16 KiB; room for keys and framing).
    public static let maxBytes = 64 << 10
    public static let envelopeVersion: UInt8 = 1

    /// The canonical transaction envelope (docs/PROTOCOL.md § 6.7) for a protobuf `SignedTransaction`.
    public static func envelope(protobufBytes bytes: [UInt8]) throws(DecodingError) -> [UInt8] {
        guard bytes.count <= maxBytes else { throw .lengthTooLarge(bytes.count, limit: maxBytes) }
        var options = BinaryDecodingOptions()
        options.discardUnknownFields = true
        let message: Edgematrix_Ledger_V1_SignedTransaction
        do { message = try Edgematrix_Ledger_V1_SignedTransaction(serializedBytes: bytes, options: options) } catch {
            throw .invalidValue("malformed protobuf SignedTransaction: \(error)")
        }
        let signer = try ProtobufWire.key(message.signer, "signer")
        let signature = try ProtobufWire.exact(message.signature, 64, "signature")
        guard !message.body.isEmpty else { throw .invalidValue("body: empty") }
        var writer = ByteWriter(capacity: message.body.count + 104)
        writer.write(envelopeVersion)
        writer.write(bytes: [UInt8](message.body))
        signer.encode(to: &writer)
        writer.writeRaw(signature)
        return writer.bytes
    }

    /// The protobuf `SignedTransaction` for parts (what a Swift client would send).
    public static func protobufBytes(body: [UInt8], signer: PublicKey, signature: [UInt8]) throws -> [UInt8] {
        try Edgematrix_Ledger_V1_SignedTransaction.with {
            $0.body = Data(body); $0.signer = Data(signer.rawRepresentation); $0.signature = Data(signature)
        }.serializedBytes()
    }
}
