/// The unit prices in force for one request, in base units, as a receipt carries them. The node's registered
/// price list names five prices per model (see the ledger's `PriceList`); for one request the router picks the
/// item price that matches the app's kind (an embedding input, an image or a REST call), so a receipt needs three.
public struct UnitPrices: Hashable, Sendable, Codable {
    public var perMillionPromptTokens: UInt64
    public var perMillionCompletionTokens: UInt64
    public var perItem: UInt64

    public init(perMillionPromptTokens: UInt64 = 0, perMillionCompletionTokens: UInt64 = 0, perItem: UInt64 = 0) {
        self.perMillionPromptTokens = perMillionPromptTokens
        self.perMillionCompletionTokens = perMillionCompletionTokens
        self.perItem = perItem
    }

    public static let free = UnitPrices()

    enum CodingKeys: String, CodingKey {
        case perMillionPromptTokens = "per_million_prompt_tokens"
        case perMillionCompletionTokens = "per_million_completion_tokens"
        case perItem = "per_item"
    }

    /// What `units` cost at these prices, in base units, or nil when it does not fit in 64 bits.
    ///
    /// Rounding (docs/SETTLEMENT.md): the token part is `floor((prompt·p + completion·c) / 1_000_000)`, computed
    /// in 128 bits, so a fraction of a base unit is never charged; the item part is exact. Rounding down favours
    /// the payer, never the router or the node.
    public func cost(of units: WorkUnits) -> UInt64? {
        let prompt = units.promptTokens.multipliedFullWidth(by: perMillionPromptTokens)
        let completion = units.completionTokens.multipliedFullWidth(by: perMillionCompletionTokens)
        // 128-bit sum of the two products as (high, low).
        let (low, carry) = prompt.low.addingReportingOverflow(completion.low)
        let (high1, o1) = prompt.high.addingReportingOverflow(completion.high)
        let (high, o2) = high1.addingReportingOverflow(carry ? 1 : 0)
        guard !o1, !o2, high < 1_000_000 else { return nil }
        let (tokenCost, _) = UInt64(1_000_000).dividingFullWidth((high: high, low: low))
        let (itemCost, o3) = units.items.multipliedReportingOverflow(by: perItem)
        guard !o3 else { return nil }
        let (total, o4) = tokenCost.addingReportingOverflow(itemCost)
        return o4 ? nil : total
    }
}

extension UnitPrices: CanonicalCodable {
    public func encode(to writer: inout ByteWriter) {
        writer.write(perMillionPromptTokens)
        writer.write(perMillionCompletionTokens)
        writer.write(perItem)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        perMillionPromptTokens = try reader.readUInt64()
        perMillionCompletionTokens = try reader.readUInt64()
        perItem = try reader.readUInt64()
    }
}
