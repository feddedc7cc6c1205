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
            throw RPCError(code: .invalidArgument, message: "malformed message: \(error.description)")
        }
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

    /// How many times top-level field `number` occurs in an encoded message, counting no further than `limit` + 1.
    /// Walks the wire format without allocating; malformed framing is an error (the decoder would refuse it too).
    static func occurrences(ofField number: UInt64, in bytes: [UInt8], limit: Int) throws(DecodingError) -> Int {
        var index = 0
        var count = 0
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
        func skip(_ length: UInt64) throws(DecodingError) {
            let available = bytes.count - index
            guard length <= UInt64(available) else { throw .truncated(needed: Int(clamping: length), available: available) }
            index += Int(length)
        }
        while index < bytes.count {
            let key = try varint()
            if key >> 3 == number {
                count += 1
                if count > limit { return count }
            }
            switch key & 7 {
            case 0: _ = try varint()
            case 1: try skip(8)
            case 2: try skip(try varint())
            case 5: try skip(4)
            default: throw .invalidValue("protobuf wire type \(key & 7)")
            }
        }
        return count
    }
}
