import EdgeMatrixCore
import Foundation

/// What kind of work a request is, which decides the price that meters it (docs/SETTLEMENT.md): token-metered
/// OpenAI calls (chat, completions) pay per million prompt and completion tokens; embeddings per input; image
/// generation per image; a plain REST app per call.
public enum PricedWorkKind: String, Sendable, Codable, CaseIterable, Hashable {
    case chat
    case embeddings
    case images
    case rest
}

/// One row of a node's price list: the prices, in base units, for requests to the model (or app) `name`.
public struct PriceEntry: Hashable, Sendable, Codable {
    /// A model name (`llama3.2:3b`), or an app name for apps without models; `*` applies to anything not listed.
    public var name: String
    public var perMillionPromptTokens: Amount
    public var perMillionCompletionTokens: Amount
    public var perEmbeddingInput: Amount
    public var perImage: Amount
    public var perRestCall: Amount

    public init(name: String, perMillionPromptTokens: Amount = .zero, perMillionCompletionTokens: Amount = .zero,
                perEmbeddingInput: Amount = .zero, perImage: Amount = .zero, perRestCall: Amount = .zero) {
        self.name = name
        self.perMillionPromptTokens = perMillionPromptTokens
        self.perMillionCompletionTokens = perMillionCompletionTokens
        self.perEmbeddingInput = perEmbeddingInput
        self.perImage = perImage
        self.perRestCall = perRestCall
    }

    /// The unit prices a receipt carries for work of `kind` under this entry.
    public func unitPrices(kind: PricedWorkKind) -> UnitPrices {
        switch kind {
        case .chat: UnitPrices(perMillionPromptTokens: perMillionPromptTokens.baseUnits,
                               perMillionCompletionTokens: perMillionCompletionTokens.baseUnits)
        case .embeddings: UnitPrices(perItem: perEmbeddingInput.baseUnits)
        case .images: UnitPrices(perItem: perImage.baseUnits)
        case .rest: UnitPrices(perItem: perRestCall.baseUnits)
        }
    }

    enum CodingKeys: String, CodingKey {
        case name
        case perMillionPromptTokens = "per_million_prompt_tokens"
        case perMillionCompletionTokens = "per_million_completion_tokens"
        case perEmbeddingInput = "per_embedding_input"
        case perImage = "per_image"
        case perRestCall = "per_rest_call"
    }
}

/// A compute node's registered prices, signed by its owner (`set_prices`). Entries are sorted by name bytes with
/// no repeats, so a list has exactly one encoding. An empty list means the node charges nothing.
public struct PriceList: Hashable, Sendable, Codable {
    /// Ledger limits, checked on apply (`invalid_price_list`).
    public static let maxEntries = 64
    public static let maxNameBytes = 128
    /// Decoder limits (a longer prefix is malformed before anything is allocated).
    static let decoderMaxEntries = 1_024
    static let decoderMaxNameBytes = 1_024
    /// The entry that applies to models and apps not listed by name.
    public static let wildcard = "*"

    public var entries: [PriceEntry]

    public init(entries: [PriceEntry] = []) { self.entries = entries }

    /// JSON form: the bare array of entries (also what `emc tx node prices --file` reads, or `{"prices": [...]}`).
    public init(from decoder: any Decoder) throws {
        entries = try decoder.singleValueContainer().decode([PriceEntry].self)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(entries)
    }

    /// The same entries in canonical order (sorted by name bytes); what a client should sign.
    public var sorted: PriceList {
        PriceList(entries: entries.sorted { Array($0.name.utf8).lexicographicallyPrecedes(Array($1.name.utf8)) })
    }

    public static let empty = PriceList()

    /// The entry for `model`, else for `app`, else the `*` entry; nil if none applies.
    public func entry(model: String, app: String) -> PriceEntry? {
        entries.first { $0.name == model } ?? entries.first { $0.name == app } ?? entries.first { $0.name == Self.wildcard }
    }

    /// The unit prices for one request: the entry for `model` (else `app`, else `*`), mapped by the work's kind
    /// (chat → tokens; embeddings → per input; images → per image; rest → per call). Nothing listed = free.
    public func unitPrices(model: String, app: String, kind: PricedWorkKind) -> UnitPrices {
        entry(model: model, app: app)?.unitPrices(kind: kind) ?? .free
    }

    /// nil if the list is acceptable on chain; otherwise the offending field (`prices[3].name`) and why.
    public func problem() -> (field: String, reason: String)? {
        guard entries.count <= Self.maxEntries else {
            return ("prices", "at most \(Self.maxEntries) entries, got \(entries.count); list fewer models or use a \"*\" entry")
        }
        var previous: [UInt8]? = nil
        for (i, entry) in entries.enumerated() {
            let bytes = Array(entry.name.utf8)
            guard !bytes.isEmpty, bytes.count <= Self.maxNameBytes,
                  entry.name.unicodeScalars.allSatisfy({ $0.isASCII && $0.value > 0x20 && $0.value < 0x7f }) else {
                return ("prices[\(i)].name", "must be 1 to \(Self.maxNameBytes) printable ASCII characters without spaces, e.g. llama3.2:3b")
            }
            if let previous {
                guard previous != bytes else { return ("prices[\(i)].name", "'\(entry.name)' is listed twice") }
                guard previous.lexicographicallyPrecedes(bytes) else {
                    return ("prices[\(i)].name", "entries must be sorted by name (byte order); `emc tx node prices` sorts them for you")
                }
            }
            previous = bytes
        }
        return nil
    }
}

extension PriceList: CanonicalCodable {
    public func encode(to writer: inout ByteWriter) {
        writer.write(UInt32(clamping: entries.count))
        for e in entries {
            writer.write(e.name)
            e.perMillionPromptTokens.encode(to: &writer)
            e.perMillionCompletionTokens.encode(to: &writer)
            e.perEmbeddingInput.encode(to: &writer)
            e.perImage.encode(to: &writer)
            e.perRestCall.encode(to: &writer)
        }
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let count = Int(try reader.readUInt32())
        guard count <= Self.decoderMaxEntries else { throw .lengthTooLarge(count, limit: Self.decoderMaxEntries) }
        var entries = [PriceEntry]()
        entries.reserveCapacity(count)
        for _ in 0..<count {
            let name = try reader.readBoundedString(max: Self.decoderMaxNameBytes)
            entries.append(PriceEntry(name: name, perMillionPromptTokens: try Amount(from: &reader),
                                      perMillionCompletionTokens: try Amount(from: &reader), perEmbeddingInput: try Amount(from: &reader),
                                      perImage: try Amount(from: &reader), perRestCall: try Amount(from: &reader)))
        }
        self.entries = entries
    }
}

// MARK: - Price files

extension PriceList {
    /// Why a price file cannot be used; `field` is the JSON path (`prices[2].per_image`).
    public struct FileError: Error, Equatable, Sendable, CustomStringConvertible {
        public var field: String
        public var reason: String
        public var description: String { field.isEmpty ? reason : "\(field): \(reason)" }
    }

    /// Key paths are immutable values; the array is never mutated.
    nonisolated(unsafe) static let priceKeys: [(key: String, path: WritableKeyPath<PriceEntry, Amount>)] = [
        ("per_million_prompt_tokens", \.perMillionPromptTokens), ("per_million_completion_tokens", \.perMillionCompletionTokens),
        ("per_embedding_input", \.perEmbeddingInput), ("per_image", \.perImage), ("per_rest_call", \.perRestCall),
    ]

    /// Reads a price file: `{"prices": [...]}` or a bare array; each entry names its model (`model`, `app` or `name`,
    /// exactly one) and gives prices as EMC strings (`"0.5"`; missing prices are 0). Returns the list sorted into
    /// canonical order and checked as the ledger checks it, so a bad file fails here, naming the field.
    public static func parse(json data: Data) throws(FileError) -> PriceList {
        guard let root = try? JSONSerialization.jsonObject(with: data) else {
            throw FileError(field: "", reason: "not JSON; write {\"prices\": [{\"model\": \"llama3.2:3b\", \"per_million_prompt_tokens\": \"0.5\"}]}")
        }
        let array: [Any]
        if let list = root as? [Any] { array = list } else if let object = root as? [String: Any] {
            guard Set(object.keys) == ["prices"], let list = object["prices"] as? [Any] else {
                throw FileError(field: "", reason: "expected an object with only a \"prices\" array (or the array itself)")
            }
            array = list
        } else {
            throw FileError(field: "", reason: "expected an object with a \"prices\" array (or the array itself)")
        }
        guard array.count <= maxEntries else {
            throw FileError(field: "prices", reason: "at most \(maxEntries) entries, got \(array.count); list fewer models or use a \"*\" entry")
        }
        var entries = [PriceEntry]()
        for (i, item) in array.enumerated() {
            let field = "prices[\(i)]"
            guard let object = item as? [String: Any] else { throw FileError(field: field, reason: "must be an object") }
            let names = ["model", "app", "name"].filter { object[$0] != nil }
            guard names.count == 1, let name = object[names[0]] as? String else {
                throw FileError(field: field, reason: "needs exactly one of \"model\", \"app\" or \"name\" (a string; \"*\" = anything not listed)")
            }
            var entry = PriceEntry(name: name)
            for key in object.keys.sorted() where key != names[0] {
                guard let path = priceKeys.first(where: { $0.key == key })?.path else {
                    throw FileError(field: "\(field).\(key)", reason: "unknown key; prices are \(priceKeys.map(\.key).joined(separator: ", "))")
                }
                guard let text = object[key] as? String else {
                    throw FileError(field: "\(field).\(key)", reason: "must be an EMC amount as a string, e.g. \"0.5\"")
                }
                do { entry[keyPath: path] = try Amount(parsing: text) } catch {
                    throw FileError(field: "\(field).\(key)", reason: error.description)
                }
            }
            entries.append(entry)
        }
        let list = PriceList(entries: entries).sorted
        if let (field, reason) = list.problem() {
            // Name the entry as it appears in the file, not in sorted order.
            var fileField = field
            if field.hasPrefix("prices["), let sortedIndex = Int(field.dropFirst(7).prefix { $0.isNumber }),
               let original = entries.firstIndex(where: { $0.name == list.entries[sortedIndex].name }) {
                let duplicate = entries.indices.last(where: { $0 != original && entries[$0].name == list.entries[sortedIndex].name })
                fileField = "prices[\(duplicate ?? original)].name"
            }
            throw FileError(field: fileField, reason: reason)
        }
        return list
    }
}
