import Crypto

/// A SHA-256 digest.
public struct Hash32: Hashable, Comparable, Sendable, CustomStringConvertible, Codable {
    public let bytes: [UInt8]

    public static let zero = Hash32(uncheckedBytes: [UInt8](repeating: 0, count: 32))

    public init?(bytes: [UInt8]) {
        guard bytes.count == 32 else { return nil }
        self.bytes = bytes
    }

    init(uncheckedBytes: [UInt8]) { self.bytes = uncheckedBytes }

    public init?(hex: String) {
        guard let raw = Hex.decode(hex) else { return nil }
        self.init(bytes: raw)
    }

    /// SHA-256 of the given bytes.
    public static func of<D: DataProtocol>(_ data: D) -> Hash32 {
        Hash32(uncheckedBytes: Array(SHA256.hash(data: data)))
    }

    public static func of(_ bytes: [UInt8]) -> Hash32 {
        Hash32(uncheckedBytes: Array(SHA256.hash(data: bytes)))
    }

    public var hex: String { Hex.encode(bytes) }
    public var description: String { hex }

    public static func < (lhs: Hash32, rhs: Hash32) -> Bool { lhs.bytes.lexicographicallyPrecedes(rhs.bytes) }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let value = Hash32(hex: text) else {
            throw Swift.DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "expected 64 hex characters"))
        }
        self = value
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(hex)
    }
}

extension Hash32: CanonicalCodable {
    public func encode(to writer: inout ByteWriter) { writer.writeRaw(bytes) }
    public init(from reader: inout ByteReader) throws(DecodingError) {
        self.init(uncheckedBytes: try reader.readRaw(count: 32))
    }
}

/// An incremental SHA-256, for hashing streamed bodies chunk by chunk.
public struct StreamingHasher {
    private var hasher = SHA256()
    public init() {}
    public mutating func update<D: DataProtocol>(_ data: D) { hasher.update(data: data) }
    public func finalize() -> Hash32 { Hash32(uncheckedBytes: Array(hasher.finalize())) }
}

import Foundation
