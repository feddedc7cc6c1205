import Foundation

/// Errors from decoding the project's canonical binary encoding.
public enum DecodingError: Error, Equatable, CustomStringConvertible, Sendable {
    case truncated(needed: Int, available: Int)
    case lengthTooLarge(Int, limit: Int)
    case invalidUTF8
    case invalidValue(String)
    case trailingBytes(Int)

    public var description: String {
        switch self {
        case .truncated(let needed, let available): "truncated input: needed \(needed) more bytes, \(available) available"
        case .lengthTooLarge(let length, let limit): "length \(length) exceeds the limit of \(limit) bytes"
        case .invalidUTF8: "string is not valid UTF-8"
        case .invalidValue(let what): "invalid value: \(what)"
        case .trailingBytes(let count): "\(count) unexpected trailing bytes"
        }
    }
}

/// Writes the canonical binary encoding: big-endian integers, u32-length-prefixed byte strings.
/// Everything signed in EdgeMatrix is signed over bytes produced by this writer and sent as they are.
public struct ByteWriter: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }

    public mutating func write(_ value: UInt8) { bytes.append(value) }
    public mutating func write(_ value: Bool) { bytes.append(value ? 1 : 0) }
    public mutating func write(_ value: UInt16) { writeInteger(value) }
    public mutating func write(_ value: UInt32) { writeInteger(value) }
    public mutating func write(_ value: UInt64) { writeInteger(value) }
    public mutating func write(_ value: Int64) { writeInteger(UInt64(bitPattern: value)) }

    private mutating func writeInteger<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.bigEndian) { bytes.append(contentsOf: $0) }
    }

    /// Raw bytes with no length prefix (fixed-size fields such as hashes and keys).
    public mutating func writeRaw<C: Collection>(_ raw: C) where C.Element == UInt8 { bytes.append(contentsOf: raw) }

    /// Length-prefixed bytes.
    public mutating func write<C: Collection>(bytes value: C) where C.Element == UInt8 {
        write(UInt32(value.count))
        bytes.append(contentsOf: value)
    }

    public mutating func write(_ value: String) { write(bytes: Array(value.utf8)) }

    public mutating func write(optional value: [UInt8]?) {
        if let value { write(true); write(bytes: value) } else { write(false) }
    }
}

/// Reads the canonical binary encoding. Never traps on any input: every read is bounds-checked.
public struct ByteReader: Sendable {
    public let bytes: [UInt8]
    public private(set) var offset: Int = 0
    /// Upper bound for any single length-prefixed field, so a hostile length cannot allocate unbounded memory.
    public var maxFieldLength: Int

    public init<C: Collection>(_ bytes: C, maxFieldLength: Int = 16 << 20) where C.Element == UInt8 {
        self.bytes = Array(bytes)
        self.maxFieldLength = maxFieldLength
    }

    public var remaining: Int { bytes.count - offset }
    public var isAtEnd: Bool { offset == bytes.count }

    public mutating func readRaw(count: Int) throws(DecodingError) -> [UInt8] {
        guard count >= 0, count <= remaining else { throw .truncated(needed: count, available: remaining) }
        defer { offset += count }
        return Array(bytes[offset..<offset + count])
    }

    private mutating func readInteger<T: FixedWidthInteger>(_: T.Type) throws(DecodingError) -> T {
        let size = MemoryLayout<T>.size
        guard size <= remaining else { throw .truncated(needed: size, available: remaining) }
        var value: T = 0
        for i in 0..<size { value = (value << 8) | T(bytes[offset + i]) }
        offset += size
        return value
    }

    public mutating func readUInt8() throws(DecodingError) -> UInt8 { try readInteger(UInt8.self) }
    public mutating func readUInt16() throws(DecodingError) -> UInt16 { try readInteger(UInt16.self) }
    public mutating func readUInt32() throws(DecodingError) -> UInt32 { try readInteger(UInt32.self) }
    public mutating func readUInt64() throws(DecodingError) -> UInt64 { try readInteger(UInt64.self) }
    public mutating func readInt64() throws(DecodingError) -> Int64 { Int64(bitPattern: try readInteger(UInt64.self)) }

    public mutating func readBool() throws(DecodingError) -> Bool {
        switch try readUInt8() {
        case 0: return false
        case 1: return true
        case let other: throw .invalidValue("boolean byte \(other)")
        }
    }

    public mutating func readBytes() throws(DecodingError) -> [UInt8] {
        let length = Int(try readUInt32())
        guard length <= maxFieldLength else { throw .lengthTooLarge(length, limit: maxFieldLength) }
        return try readRaw(count: length)
    }

    public mutating func readString() throws(DecodingError) -> String {
        let raw = try readBytes()
        guard let string = String(validating: raw, as: UTF8.self) else { throw .invalidUTF8 }
        return string
    }

    public mutating func readOptionalBytes() throws(DecodingError) -> [UInt8]? {
        try readBool() ? try readBytes() : nil
    }

    public func expectEnd() throws(DecodingError) {
        guard isAtEnd else { throw .trailingBytes(remaining) }
    }
}

/// Types with one canonical binary form.
public protocol CanonicalEncodable {
    func encode(to writer: inout ByteWriter)
}

public protocol CanonicalDecodable {
    init(from reader: inout ByteReader) throws(DecodingError)
}

public typealias CanonicalCodable = CanonicalEncodable & CanonicalDecodable

extension CanonicalEncodable {
    public var canonicalBytes: [UInt8] {
        var writer = ByteWriter()
        encode(to: &writer)
        return writer.bytes
    }
}

extension CanonicalDecodable {
    /// Decodes a whole buffer; trailing bytes are an error.
    public init<C: Collection>(canonicalBytes: C) throws(DecodingError) where C.Element == UInt8 {
        var reader = ByteReader(canonicalBytes)
        self = try Self(from: &reader)
        try reader.expectEnd()
    }
}

// MARK: - Hex

public enum Hex {
    private static let digits = Array("0123456789abcdef".utf8)

    public static func encode<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 {
        var out = [UInt8]()
        out.reserveCapacity(bytes.count * 2)
        for byte in bytes {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 0x0f)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Returns nil for odd length or any non-hex character.
    public static func decode(_ text: some StringProtocol) -> [UInt8]? {
        let utf8 = Array(text.utf8)
        guard utf8.count % 2 == 0 else { return nil }
        var out = [UInt8]()
        out.reserveCapacity(utf8.count / 2)
        var i = 0
        while i < utf8.count {
            guard let hi = nibble(utf8[i]), let lo = nibble(utf8[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}
