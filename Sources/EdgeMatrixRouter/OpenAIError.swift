import EdgeMatrixCore
import Foundation
import Hummingbird

/// An error in OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`, with a stable `code`.
public struct OpenAIError: Error, HTTPResponseError, Sendable, Equatable {
    public var status: HTTPResponse.Status
    public var type: String
    public var code: String
    public var message: String
    public var param: String?
    /// Sent as `Retry-After` (seconds) when the client should come back later.
    public var retryAfterSeconds: Int?
    /// The router sequence number of the accepted request this error answers, sent as `x-emc-request-id`.
    public var requestSequence: UInt64?

    public init(status: HTTPResponse.Status, type: String, code: String, message: String, param: String? = nil,
                retryAfterSeconds: Int? = nil) {
        self.status = status
        self.type = type
        self.code = code
        self.message = message
        self.param = param
        self.retryAfterSeconds = retryAfterSeconds
    }

    public var headers: HTTPFields {
        var headers: HTTPFields = [.contentType: "application/json"]
        if let retryAfterSeconds { headers[.retryAfter] = String(retryAfterSeconds) }
        if let requestSequence { headers[.emcRequestID] = String(requestSequence) }
        return headers
    }

    public var jsonBytes: [UInt8] {
        var error: [String: Any] = ["message": message, "type": type, "code": code, "param": param ?? NSNull()]
        if param == nil { error["param"] = NSNull() }
        let data = (try? JSONSerialization.data(withJSONObject: ["error": error], options: [.sortedKeys])) ?? Data()
        return Array(data)
    }

    public func response(from request: Request, context: some RequestContext) throws -> Response {
        var buffer = ByteBuffer()
        buffer.writeBytes(jsonBytes)
        return Response(status: status, headers: headers, body: .init(byteBuffer: buffer))
    }

    // The stable codes clients can match on.
    public static func invalidAPIKey() -> OpenAIError {
        OpenAIError(status: .unauthorized, type: "invalid_request_error", code: "invalid_api_key",
                    message: "Incorrect or missing API key. Send `Authorization: Bearer <key>` with a key made by `emc keys api`.")
    }

    public static func invalidJSON(_ detail: String) -> OpenAIError {
        OpenAIError(status: .badRequest, type: "invalid_request_error", code: "invalid_json",
                    message: "The request body is not valid JSON: \(detail)")
    }

    public static func missingParameter(_ name: String) -> OpenAIError {
        OpenAIError(status: .badRequest, type: "invalid_request_error", code: "missing_parameter",
                    message: "You must provide the '\(name)' parameter.", param: name)
    }

    public static func invalidParameter(_ name: String, _ why: String) -> OpenAIError {
        OpenAIError(status: .badRequest, type: "invalid_request_error", code: "invalid_parameter", message: why, param: name)
    }

    public static func modelNotFound(_ model: String) -> OpenAIError {
        OpenAIError(status: .notFound, type: "invalid_request_error", code: "model_not_found",
                    message: "The model '\(model)' does not exist or no compute node serves it right now. See GET /v1/models.",
                    param: "model")
    }

    public static func appNotFound(_ app: String) -> OpenAIError {
        OpenAIError(status: .notFound, type: "invalid_request_error", code: "app_not_found",
                    message: "No compute node serves the app '\(app)' right now.")
    }

    public static func noCapacity() -> OpenAIError {
        OpenAIError(status: .serviceUnavailable, type: "server_error", code: "no_capacity",
                    message: "Every compute node serving this model is busy; retry shortly.", retryAfterSeconds: 1)
    }

    /// The queue of requests waiting for a free compute node is full.
    public static func queueFull() -> OpenAIError {
        OpenAIError(status: .tooManyRequests, type: "server_error", code: "no_capacity",
                    message: "Too many requests are waiting for a free compute node; retry shortly.", retryAfterSeconds: 1)
    }

    public static func requestTimeout(seconds: Int) -> OpenAIError {
        OpenAIError(status: .requestTimeout, type: "invalid_request_error", code: "request_timeout",
                    message: "The request body did not arrive within \(seconds) s.")
    }

    public static func upstreamFailed(_ why: String) -> OpenAIError {
        OpenAIError(status: .badGateway, type: "server_error", code: "upstream_failed",
                    message: "No compute node could serve the request: \(why)")
    }

    /// A model server's own error answer, relayed on an OpenAI route in OpenAI's shape with a stable code: a 4xx keeps
    /// its status, message and code (`upstream_invalid_request` when the server gave no usable code); a 5xx becomes 502
    /// `upstream_failed` (the gateway's status for a failed upstream, which clients may retry elsewhere).
    public static func upstreamAnswer(status: UInt16, body: [UInt8]) -> OpenAIError {
        let error = (try? JSONSerialization.jsonObject(with: Data(body))).flatMap { ($0 as? [String: Any])?["error"] }
        let fields = error as? [String: Any]
        let text = (fields?["message"] as? String) ?? (error as? String) ?? String(decoding: body.prefix(512), as: UTF8.self)
        let message = String(text.prefix(1024))
        if status >= 500 || status < 400 {
            return OpenAIError(status: .badGateway, type: "server_error", code: "upstream_failed",
                               message: "The model server failed (status \(status)): \(message)")
        }
        let code = (fields?["code"] as? String).flatMap { code in
            code.utf8.count <= 64 && !code.isEmpty && code.utf8.allSatisfy { (0x61...0x7A).contains($0) || (0x30...0x39).contains($0) || $0 == 0x5F }
                ? code : nil
        }
        return OpenAIError(status: HTTPResponse.Status(code: Int(status)), type: "invalid_request_error", code: code ?? "upstream_invalid_request",
                           message: message, param: fields?["param"] as? String)
    }

    public static func requestTooLarge(limit: Int) -> OpenAIError {
        OpenAIError(status: .contentTooLarge, type: "invalid_request_error", code: "request_too_large",
                    message: "The request body exceeds \(limit) bytes.")
    }

    /// 402, not 429: OpenAI's clients retry a 429 by themselves, and more spending is not what the caller needs.
    public static func insufficientQuota(spent: UInt64, limit: UInt64) -> OpenAIError {
        OpenAIError(status: HTTPResponse.Status(code: 402, reasonPhrase: "Payment Required"), type: "insufficient_quota", code: "insufficient_quota",
                    message: "This API key has spent \(Amount(baseUnits: spent)) EMC of its \(Amount(baseUnits: limit)) EMC limit for this epoch. "
                        + "Wait for the next epoch, or bind a key with a higher limit (emc keys api new --spend-limit).")
    }

    /// 402 as well: the payer's escrow with this router cannot cover this request's worst case beside what it owes
    /// and what its requests in flight have reserved.
    public static func insufficientEscrow(unsettled: UInt64, reserved: UInt64, worst: UInt64, available: UInt64,
                                          router: PublicKey) -> OpenAIError {
        OpenAIError(status: HTTPResponse.Status(code: 402, reasonPhrase: "Payment Required"), type: "insufficient_quota", code: "insufficient_quota",
                    message: "This request may cost up to \(Amount(baseUnits: worst)) EMC; the paying account's escrow with this router has "
                        + "\(Amount(baseUnits: available)) EMC available on chain, of which \(Amount(baseUnits: unsettled)) EMC are owed for "
                        + "served requests not settled yet and \(Amount(baseUnits: reserved)) EMC are reserved by requests in flight. "
                        + "Lower max_tokens, or top it up: emc tx escrow open --router \(router.hex) --amount <EMC> --key <account key>.")
    }

    /// A malformed `X-EMC-Max-Price` header.
    public static func invalidMaxPrice(_ why: String) -> OpenAIError {
        OpenAIError(status: .badRequest, type: "invalid_request_error", code: "invalid_max_price", message: why, param: "X-EMC-Max-Price")
    }

    /// 400, not 429 or 5xx (OpenAI's clients would retry those): every node serving the request would cost more than
    /// its `X-EMC-Max-Price`.
    public static func noNodeWithinMaxPrice(maxPrice: UInt64, cheapest: UInt64) -> OpenAIError {
        OpenAIError(status: .badRequest, type: "invalid_request_error", code: "no_node_within_max_price",
                    message: "No compute node serves this request within X-EMC-Max-Price \(Amount(baseUnits: maxPrice)) EMC: at the cheapest, "
                        + "its worst case (prompt bound plus max_tokens) costs \(Amount(baseUnits: cheapest)) EMC. "
                        + "Raise the maximum or lower max_tokens.",
                    param: "X-EMC-Max-Price")
    }

    /// The router could not record the request durably (its disk), so it serves nothing it could not bill.
    public static func storeUnavailable() -> OpenAIError {
        OpenAIError(status: .serviceUnavailable, type: "server_error", code: "store_unavailable",
                    message: "The router cannot record requests right now; retry shortly.", retryAfterSeconds: 1)
    }

    public static func invalidBinding(_ why: String, param: String) -> OpenAIError {
        OpenAIError(status: .badRequest, type: "invalid_request_error", code: "invalid_binding", message: why, param: param)
    }

    public static func notFound(_ path: String) -> OpenAIError {
        OpenAIError(status: .notFound, type: "invalid_request_error", code: "not_found", message: "Unknown path \(path).")
    }
}
