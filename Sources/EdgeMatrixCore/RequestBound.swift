import Foundation

/// The most units one request can bill, known from the request the router forwards alone (docs/SETTLEMENT.md § 8).
/// The router reserves their cost against the payer's escrow before forwarding, the node bills no more
/// (`BilledUnits.billed(..., requestBound:)`), and the router refuses a receipt above them; so the reservation is a
/// true bound whatever the app does. Node and router compute it with this one function from the same bytes.
public enum RequestBound {
    /// Completion tokens per choice when a chat or completions request names neither `max_tokens` nor
    /// `max_completion_tokens` (the router's gateway then adds `"max_tokens": 4096` before forwarding), and the
    /// completion bound of any other route, whose body the router does not read.
    public static let defaultMaxTokens: UInt64 = 4096

    enum Route { case chat, embeddings, other }

    static func route(ofPath path: String) -> Route {
        switch path.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? "" {
        case "/v1/chat/completions", "/v1/completions": .chat
        case "/v1/embeddings": .embeddings
        default: .other
        }
    }

    /// The bound for a forwarded request (`path` on the app, e.g. `/v1/chat/completions`; `body` as forwarded).
    public static func units(path: String, body: [UInt8]) -> WorkUnits {
        let object = route(ofPath: path) == .other ? nil : (try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any]
        return units(path: path, requestBytes: UInt64(body.count), object: object)
    }

    /// The same from a body already parsed (`object`, nil when it is not a JSON object).
    ///
    /// - prompt tokens: `request_bytes + 4096` (a byte-level tokenizer makes at most one token per byte; a chat
    ///   template adds at most `BilledUnits.promptTemplateAllowance` tokens): the bound receipts are held to already;
    /// - chat and completions: completion tokens `max_tokens × choices`, with `max_tokens` the larger of the valid
    ///   `max_tokens` / `max_completion_tokens` (else 4096) and `choices` the largest valid `n` / `best_of` (else 1);
    ///   no items;
    /// - embeddings: no completion tokens; items = the number of inputs (1 for a string or one token array);
    /// - any other path: 4096 completion tokens and one item (a REST call, an image request).
    public static func units(path: String, requestBytes: UInt64, object: [String: Any]?) -> WorkUnits {
        let (prompt, promptOverflow) = requestBytes.addingReportingOverflow(BilledUnits.promptTemplateAllowance)
        var units = WorkUnits(promptTokens: promptOverflow ? .max : prompt)
        switch route(ofPath: path) {
        case .chat:
            let maxTokens = [object?["max_tokens"], object?["max_completion_tokens"]].compactMap(count).max() ?? defaultMaxTokens
            let choices = max(1, [object?["n"], object?["best_of"]].compactMap(count).max() ?? 1)
            let (completion, overflow) = maxTokens.multipliedReportingOverflow(by: choices)
            units.completionTokens = overflow ? .max : completion
        case .embeddings:
            units.items = inputs(object?["input"])
        case .other:
            units.completionTokens = defaultMaxTokens
            units.items = 1
        }
        return units
    }

    /// A non-negative integer from the request's JSON, or nil for anything else (null, a string, a fraction). Read
    /// through its double value (no trapping conversion); one beyond 64 bits counts as 2^64 − 1, whose cost cannot
    /// be reserved, which is the truth.
    static func count(_ value: Any?) -> UInt64? {
        guard let number = value as? NSNumber else { return nil }
        let double = number.doubleValue
        guard double.isFinite, double >= 0, double.rounded(.towardZero) == double else { return nil }
        return UInt64(exactly: double) ?? .max
    }

    /// Embeddings inputs: a string or one token array is one input; an array of strings or of token arrays is one
    /// per element; anything else (the app refuses it) counts as one.
    static func inputs(_ input: Any?) -> UInt64 {
        guard let array = input as? [Any], !array.isEmpty else { return 1 }
        if array.allSatisfy({ $0 is NSNumber }) { return 1 }
        return UInt64(clamping: array.count)
    }

    /// The forwarded body of a chat or completions request that names no completion limit: `"max_tokens": 4096`
    /// appended as the object's last member, so the app stops where the reservation does. Nil when the request
    /// names one (even as null: a second member of that name would be read differently by different parsers) or
    /// the body is not a JSON object with at least one member.
    public static func withDefaultMaxTokens(_ body: [UInt8], object: [String: Any]) -> [UInt8]? {
        guard !object.isEmpty, object["max_tokens"] == nil, object["max_completion_tokens"] == nil,
              let close = body.lastIndex(where: { !Self.isJSONWhitespace($0) }), body[close] == UInt8(ascii: "}") else { return nil }
        var forwarded = Array(body[..<close])
        forwarded.append(contentsOf: Array(#","max_tokens":\#(defaultMaxTokens)}"#.utf8))
        return forwarded
    }

    private static func isJSONWhitespace(_ byte: UInt8) -> Bool {
        byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D
    }
}
