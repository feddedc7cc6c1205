import EdgeMatrixCore
import GRPCCore

/// gRPC serializer for the project's canonical binary messages (no protobuf: the messages are few, and
/// the same encoding is what gets signed).
public struct CanonicalSerializer<Message: CanonicalEncodable & Sendable>: MessageSerializer {
    public init() {}
    public func serialize<Bytes: GRPCContiguousBytes>(_ message: Message) throws -> Bytes {
        Bytes(message.canonicalBytes)
    }
}

public struct CanonicalDeserializer<Message: CanonicalDecodable & Sendable>: MessageDeserializer {
    public init() {}
    public func deserialize<Bytes: GRPCContiguousBytes>(_ serializedMessageBytes: Bytes) throws -> Message {
        let bytes = serializedMessageBytes.withUnsafeBytes { Array($0) }
        do { return try Message(canonicalBytes: bytes) } catch {
            throw RPCError(code: .invalidArgument, message: "malformed message: \(error.description)")
        }
    }
}

/// The tunnel service: served by routers, called by compute nodes.
public enum TunnelService {
    public static let descriptor = ServiceDescriptor(fullyQualifiedService: "edgematrix.v1.Tunnel")
    public static let control = MethodDescriptor(service: descriptor, method: "Control", type: .bidirectionalStreaming)
    public static let work = MethodDescriptor(service: descriptor, method: "Work", type: .bidirectionalStreaming)
}
