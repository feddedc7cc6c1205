/// An amount of EMC in base units (1 EMC = 100,000,000 base units). Integer only: no floating point anywhere
/// near money. Text form always has 8 decimals, e.g. `12.50000000`.
public struct Amount: Hashable, Comparable, Sendable, CustomStringConvertible, Codable {
    public static let decimals = 8
    public static let unitsPerEMC: UInt64 = 100_000_000
    public static let zero = Amount(baseUnits: 0)

    public var baseUnits: UInt64

    public init(baseUnits: UInt64) { self.baseUnits = baseUnits }

    /// Whole EMC; traps on overflow, so use only with literals and genesis constants.
    public init(emc: UInt64) { baseUnits = emc * Amount.unitsPerEMC }

    /// Parses a decimal EMC amount such as `12.5`, `0.00000001` or `1000`. At most 8 decimals; no sign, no exponent.
    public init(parsing text: String) throws(AmountError) {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        let parts = trimmed.split(separator: ".", omittingEmptySubsequences: false)
        guard !trimmed.isEmpty, parts.count <= 2 else { throw .malformed(text) }
        let whole = parts[0]
        let fraction = parts.count == 2 ? parts[1] : ""
        guard !(whole.isEmpty && fraction.isEmpty),
              whole.allSatisfy({ $0.isASCII && $0.isNumber }),
              fraction.allSatisfy({ $0.isASCII && $0.isNumber }) else { throw .malformed(text) }
        guard fraction.count <= Amount.decimals else { throw .tooManyDecimals(text) }
        let wholeValue = whole.isEmpty ? 0 : UInt64(whole)
        let paddedFraction = fraction + String(repeating: "0", count: Amount.decimals - fraction.count)
        guard let wholeValue, let fractionValue = UInt64(paddedFraction) else { throw .overflow(text) }
        let (scaled, overflow1) = wholeValue.multipliedReportingOverflow(by: Amount.unitsPerEMC)
        let (total, overflow2) = scaled.addingReportingOverflow(fractionValue)
        guard !overflow1, !overflow2 else { throw .overflow(text) }
        baseUnits = total
    }

    public var description: String {
        let whole = baseUnits / Amount.unitsPerEMC
        let fraction = String(baseUnits % Amount.unitsPerEMC)
        return "\(whole).\(String(repeating: "0", count: Amount.decimals - fraction.count))\(fraction)"
    }

    public static func < (lhs: Amount, rhs: Amount) -> Bool { lhs.baseUnits < rhs.baseUnits }

    public func adding(_ other: Amount) -> Amount? {
        let (sum, overflow) = baseUnits.addingReportingOverflow(other.baseUnits)
        return overflow ? nil : Amount(baseUnits: sum)
    }

    public func subtracting(_ other: Amount) -> Amount? {
        other.baseUnits > baseUnits ? nil : Amount(baseUnits: baseUnits - other.baseUnits)
    }

    /// JSON form is the 8-decimal string, so no client ever sees a float.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let units = try? container.decode(UInt64.self) {
            throw Swift.DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath,
                debugDescription: "amounts are strings in EMC with up to 8 decimals, e.g. \"12.5\" (got the number \(units))"))
        }
        let text = try container.decode(String.self)
        do { self = try Amount(parsing: text) } catch {
            throw Swift.DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: error.description))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

extension Amount: CanonicalCodable {
    public func encode(to writer: inout ByteWriter) { writer.write(baseUnits) }
    public init(from reader: inout ByteReader) throws(DecodingError) { baseUnits = try reader.readUInt64() }
}

public enum AmountError: Error, Equatable, CustomStringConvertible, Sendable {
    case malformed(String)
    case tooManyDecimals(String)
    case overflow(String)

    public var description: String {
        switch self {
        case .malformed(let text): "'\(text)' is not an EMC amount; write it like 12.5 or 0.00000001"
        case .tooManyDecimals(let text): "'\(text)' has more than 8 decimals; 0.00000001 EMC is the smallest unit"
        case .overflow(let text): "'\(text)' is larger than any EMC amount"
        }
    }
}

import Foundation
