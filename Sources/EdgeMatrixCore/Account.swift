

/// An ICRC-1 subaccount: exactly 32 bytes. The all-zero subaccount is the default one and is never stored
/// (an `Account` normalises it to `nil`), so one account has exactly one representation.
public struct Subaccount: Hashable, Comparable, Sendable, CustomStringConvertible {
    public static let byteCount = 32
    public let bytes: [UInt8]

    public init?(bytes: [UInt8]) {
        guard bytes.count == Self.byteCount else { return nil }
        self.bytes = bytes
    }

    /// A subaccount whose last 8 bytes hold `index` big-endian (a convenient way to number subaccounts).
    public init(index: UInt64) {
        var raw = [UInt8](repeating: 0, count: 24)
        for shift in stride(from: 56, through: 0, by: -8) { raw.append(UInt8(truncatingIfNeeded: index >> UInt64(shift))) }
        bytes = raw
    }

    public var isDefault: Bool { bytes.allSatisfy { $0 == 0 } }
    public var description: String { Hex.encode(bytes) }
    public static func < (lhs: Subaccount, rhs: Subaccount) -> Bool { lhs.bytes.lexicographicallyPrecedes(rhs.bytes) }
}

/// A ledger account in ICRC-1's model: an owner (here an Ed25519 public key; ICRC-1's "principal") plus an
/// optional subaccount. The textual form is ICRC-1's (see `AccountText`), with the 32 key bytes as the principal.
public struct Account: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let owner: PublicKey
    /// `nil` means the default (all-zero) subaccount.
    public let subaccount: Subaccount?

    public init(owner: PublicKey, subaccount: Subaccount? = nil) {
        self.owner = owner
        self.subaccount = (subaccount?.isDefault ?? true) ? nil : subaccount
    }

    /// The 32 subaccount bytes, zeros for the default subaccount (what ICRC-1 checksums).
    public var effectiveSubaccount: [UInt8] { subaccount?.bytes ?? [UInt8](repeating: 0, count: Subaccount.byteCount) }

    /// ICRC-1 textual encoding.
    public var description: String { AccountText.encode(owner: owner.rawRepresentation, subaccount: subaccount?.bytes) }

    /// Parses ICRC-1 textual encoding; the owner must be a 32-byte Ed25519 public key.
    public init(text: String) throws(AccountTextError) {
        let (ownerBytes, sub) = try AccountText.decode(text)
        guard ownerBytes.count == 32, let owner = try? PublicKey(rawRepresentation: ownerBytes) else {
            throw .notAnEd25519Key(byteCount: ownerBytes.count)
        }
        self.init(owner: owner, subaccount: sub.flatMap { Subaccount(bytes: $0) })
    }

    /// Orders by owner bytes, then subaccount (default first): the canonical order used for state hashing.
    public static func < (lhs: Account, rhs: Account) -> Bool {
        if lhs.owner.rawRepresentation != rhs.owner.rawRepresentation {
            return lhs.owner.rawRepresentation.lexicographicallyPrecedes(rhs.owner.rawRepresentation)
        }
        return lhs.effectiveSubaccount.lexicographicallyPrecedes(rhs.effectiveSubaccount)
    }
}

extension Account: Codable {
    /// JSON form is the ICRC-1 text.
    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        do { self = try Account(text: text) } catch {
            throw Swift.DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: error.description))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

extension Account: CanonicalCodable {
    /// owner (32 raw bytes) ‖ 0x00, or owner ‖ 0x01 ‖ subaccount (32 raw bytes).
    public func encode(to writer: inout ByteWriter) {
        owner.encode(to: &writer)
        if let subaccount { writer.write(true); writer.writeRaw(subaccount.bytes) } else { writer.write(false) }
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let owner = try PublicKey(from: &reader)
        guard try reader.readBool() else { self.init(owner: owner); return }
        let raw = try reader.readRaw(count: Subaccount.byteCount)
        // A second encoding of the same account would give a second transaction id for the same transfer.
        guard raw.contains(where: { $0 != 0 }) else {
            throw .invalidValue("the all-zero subaccount must be encoded as absent")
        }
        self.init(owner: owner, subaccount: Subaccount(bytes: raw))
    }
}

// MARK: - ICRC-1 textual encoding

public enum AccountTextError: Error, Equatable, Sendable, CustomStringConvertible {
    case empty
    case malformedOwner(String)
    case badOwnerChecksum
    case badChecksum(expected: String, got: String)
    case invalidSubaccount(String)
    case nonCanonical(canonical: String)
    case notAnEd25519Key(byteCount: Int)

    public var description: String {
        switch self {
        case .empty: "empty account text; expected ICRC-1 text such as <owner>-<checksum>.<subaccount hex> or just <owner>"
        case .malformedOwner(let why): "the owner part of the account is malformed: \(why)"
        case .badOwnerChecksum: "the owner's built-in checksum does not match: the account text was mistyped or cut short; copy it again"
        case .badChecksum(let expected, let got):
            "account checksum '\(got)' does not match the owner and subaccount (expected '\(expected)'): the account text was mistyped; copy it again"
        case .invalidSubaccount(let why): "the subaccount part is invalid: \(why)"
        case .nonCanonical(let canonical): "account text is not in canonical ICRC-1 form; write it as \(canonical)"
        case .notAnEd25519Key(let count): "the owner is \(count) bytes, not a 32-byte Ed25519 public key"
        }
    }
}

/// ICRC-1's textual encoding of accounts, over arbitrary owner ("principal") bytes:
/// - default subaccount: the owner's principal text, `base32(crc32(owner) ‖ owner)` in lowercase without
///   padding, grouped in 5 characters with dashes;
/// - otherwise: `<owner text>-<checksum>.<subaccount hex without leading zeros>`, where checksum is
///   `base32(crc32(owner ‖ subaccount))` (7 characters).
public enum AccountText {
    public static func principalText(_ owner: [UInt8]) -> String {
        let encoded = Base32.encode(CRC32.bigEndianBytes(CRC32.checksum(owner)) + owner)
        var grouped = ""
        for (i, ch) in encoded.enumerated() {
            if i > 0, i % 5 == 0 { grouped.append("-") }
            grouped.append(ch)
        }
        return grouped
    }

    public static func encode(owner: [UInt8], subaccount: [UInt8]?) -> String {
        let principal = principalText(owner)
        guard let subaccount, subaccount.contains(where: { $0 != 0 }) else { return principal }
        let checksum = Base32.encode(CRC32.bigEndianBytes(CRC32.checksum(owner + subaccount)))
        var hex = Substring(Hex.encode(subaccount))
        while hex.first == "0" { hex = hex.dropFirst() }
        return "\(principal)-\(checksum).\(hex)"
    }

    public static func parsePrincipal(_ text: some StringProtocol) throws(AccountTextError) -> [UInt8] {
        let compact = text.filter { $0 != "-" }
        guard !compact.isEmpty else { throw .malformedOwner("no characters") }
        guard let decoded = Base32.decode(String(compact)), decoded.count > 4 else {
            throw .malformedOwner("not lowercase base32 (letters a-z and digits 2-7)")
        }
        let owner = Array(decoded.dropFirst(4))
        guard Array(decoded.prefix(4)) == CRC32.bigEndianBytes(CRC32.checksum(owner)) else { throw .badOwnerChecksum }
        let canonical = principalText(owner)
        guard canonical == text else { throw .nonCanonical(canonical: canonical) }
        return owner
    }

    /// Returns the owner bytes and the subaccount (nil for the default one).
    public static func decode(_ text: String) throws(AccountTextError) -> (owner: [UInt8], subaccount: [UInt8]?) {
        guard !text.isEmpty else { throw .empty }
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count <= 2 else { throw .invalidSubaccount("more than one '.'") }
        if parts.count == 1 { return (try parsePrincipal(text), nil) }

        let left = parts[0], subHex = parts[1]
        guard let dash = left.lastIndex(of: "-") else { throw .malformedOwner("missing '-<checksum>' before '.'") }
        let principalPart = left[..<dash]
        let checksumPart = String(left[left.index(after: dash)...])
        let owner = try parsePrincipal(principalPart)
        guard !subHex.isEmpty, subHex.count <= 64 else { throw .invalidSubaccount("expected 1 to 64 hex digits after '.'") }
        guard !subHex.hasPrefix("0") else {
            throw .nonCanonical(canonical: "\(left).\(subHex.drop(while: { $0 == "0" }))")
        }
        let padded = String(repeating: "0", count: 64 - subHex.count) + subHex
        guard subHex.allSatisfy({ $0.isHexDigit && !$0.isUppercase }), let sub = Hex.decode(padded) else {
            throw .invalidSubaccount("'\(subHex)' is not lowercase hex")
        }
        let expected = Base32.encode(CRC32.bigEndianBytes(CRC32.checksum(owner + sub)))
        guard checksumPart == expected else { throw .badChecksum(expected: expected, got: checksumPart) }
        return (owner, sub)
    }
}

/// CRC-32 (IEEE 802.3, the zlib polynomial), as ICRC-1 and the IC principal encoding use.
enum CRC32 {
    private static let table: [UInt32] = (0..<256).map { n -> UInt32 in
        var c = UInt32(n)
        for _ in 0..<8 { c = (c & 1) != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }

    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in bytes { crc = table[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8) }
        return crc ^ 0xFFFF_FFFF
    }

    static func bigEndianBytes(_ value: UInt32) -> [UInt8] {
        [UInt8(value >> 24), UInt8(truncatingIfNeeded: value >> 16), UInt8(truncatingIfNeeded: value >> 8), UInt8(truncatingIfNeeded: value)]
    }
}

/// RFC 4648 base32, lowercase, no padding.
enum Base32 {
    private static let alphabet = Array("abcdefghijklmnopqrstuvwxyz234567")

    public static func encode(_ bytes: [UInt8]) -> String {
        var out = ""
        var buffer: UInt32 = 0
        var bits = 0
        for byte in bytes {
            buffer = (buffer << 8) | UInt32(byte)
            bits += 8
            while bits >= 5 {
                out.append(alphabet[Int((buffer >> UInt32(bits - 5)) & 31)])
                bits -= 5
            }
        }
        if bits > 0 { out.append(alphabet[Int((buffer << UInt32(5 - bits)) & 31)]) }
        return out
    }

    /// Lowercase only; returns nil on any other character or on non-zero padding bits.
    public static func decode(_ text: String) -> [UInt8]? {
        var out = [UInt8]()
        var buffer: UInt32 = 0
        var bits = 0
        for scalar in text.unicodeScalars {
            let value: UInt32
            switch scalar {
            case "a"..."z": value = scalar.value - 97
            case "2"..."7": value = scalar.value - 50 + 26
            default: return nil
            }
            buffer = ((buffer << 5) | value) & 0xFFFF
            bits += 5
            if bits >= 8 {
                out.append(UInt8(truncatingIfNeeded: buffer >> UInt32(bits - 8)))
                bits -= 8
            }
        }
        guard bits < 5, buffer & ((1 << UInt32(bits)) - 1) == 0 else { return nil }
        return out
    }
}
