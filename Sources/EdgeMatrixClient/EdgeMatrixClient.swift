import AsyncHTTPClient
import Foundation
import NIOCore
import NIOFoundationCompat
import NIOHTTP1

/// An error from the router, in OpenAI's shape, or from the transport.
public enum ClientError: Error, CustomStringConvertible, Sendable, Equatable {
    case api(status: Int, code: String, message: String)
    case badResponse(String)
    case streamError(code: String, message: String)

    public var description: String {
        switch self {
        case .api(let status, let code, let message): "HTTP \(status) \(code): \(message)"
        case .badResponse(let why): "unexpected response: \(why)"
        case .streamError(let code, let message): "stream ended with error \(code): \(message)"
        }
    }
}

public struct ChatMessage: Codable, Sendable, Equatable {
    public var role: String
    public var content: String
    public init(role: String, content: String) {
        self.role = role
        self.content = content
    }
}

public struct Usage: Codable, Sendable, Equatable {
    public var promptTokens: Int
    public var completionTokens: Int?
    public var totalTokens: Int?

    enum CodingKeys: String, CodingKey {
        case promptTokens = "prompt_tokens"
        case completionTokens = "completion_tokens"
        case totalTokens = "total_tokens"
    }
}

public struct ChatCompletion: Codable, Sendable {
    public struct Choice: Codable, Sendable {
        public var index: Int
        public var message: ChatMessage
        public var finishReason: String?
        enum CodingKeys: String, CodingKey {
            case index, message
            case finishReason = "finish_reason"
        }
    }

    public var id: String
    public var model: String
    public var choices: [Choice]
    public var usage: Usage?

    public var text: String { choices.first?.message.content ?? "" }
}

public struct Completion: Codable, Sendable {
    public struct Choice: Codable, Sendable {
        public var index: Int
        public var text: String
    }

    public var id: String
    public var model: String
    public var choices: [Choice]
    public var usage: Usage?
}

public struct EmbeddingsResponse: Codable, Sendable {
    public struct Item: Codable, Sendable {
        public var index: Int
        public var embedding: [Float]
    }

    public var model: String
    public var data: [Item]
    public var usage: Usage?
}

public struct ModelList: Codable, Sendable {
    public struct Model: Codable, Sendable, Equatable {
        public var id: String
        public var ownedBy: String?
        enum CodingKeys: String, CodingKey {
            case id
            case ownedBy = "owned_by"
        }
    }

    public var data: [Model]
}

/// The Swift SDK for an EdgeMatrix router's OpenAI-compatible API.
public struct EdgeMatrixClient: Sendable {
    public let baseURL: String
    let apiKey: String
    let http: HTTPClient

    /// `baseURL` ends in `/v1`, as `OPENAI_BASE_URL` does.
    public init(baseURL: String, apiKey: String, httpClient: HTTPClient = .shared) {
        self.baseURL = baseURL.hasSuffix("/") ? String(baseURL.dropLast()) : baseURL
        self.apiKey = apiKey
        http = httpClient
    }

    /// Reads `OPENAI_BASE_URL` and `OPENAI_API_KEY`.
    public static func fromEnvironment(httpClient: HTTPClient = .shared) -> EdgeMatrixClient? {
        let env = ProcessInfo.processInfo.environment
        guard let url = env["OPENAI_BASE_URL"], let key = env["OPENAI_API_KEY"] else { return nil }
        return EdgeMatrixClient(baseURL: url, apiKey: key, httpClient: httpClient)
    }

    public func models() async throws -> [ModelList.Model] {
        try await send(method: .GET, path: "/models", body: Optional<[String: String]>.none, as: ModelList.self).data
    }

    public func chat(model: String, messages: [ChatMessage], maxTokens: Int? = nil, temperature: Double? = nil,
                     seed: Int? = nil) async throws -> ChatCompletion {
        try await send(method: .POST, path: "/chat/completions",
                       body: ChatRequest(model: model, messages: messages, maxTokens: maxTokens, temperature: temperature,
                                         seed: seed, stream: nil),
                       as: ChatCompletion.self)
    }

    public func completion(model: String, prompt: String, maxTokens: Int? = nil, temperature: Double? = nil) async throws -> Completion {
        try await send(method: .POST, path: "/completions",
                       body: CompletionRequest(model: model, prompt: prompt, maxTokens: maxTokens, temperature: temperature),
                       as: Completion.self)
    }

    public func embeddings(model: String, input: [String]) async throws -> EmbeddingsResponse {
        try await send(method: .POST, path: "/embeddings", body: EmbeddingsRequest(model: model, input: input),
                       as: EmbeddingsResponse.self)
    }

    /// Streams a chat answer: yields each content delta as the router passes it on.
    public func streamChat(model: String, messages: [ChatMessage], maxTokens: Int? = nil, temperature: Double? = nil,
                           seed: Int? = nil) -> AsyncThrowingStream<String, any Error> {
        let body = ChatRequest(model: model, messages: messages, maxTokens: maxTokens, temperature: temperature, seed: seed,
                               stream: true)
        return AsyncThrowingStream { continuation in
            let task = Task {
                do {
                    let response = try await execute(method: .POST, path: "/chat/completions", body: try JSONEncoder().encode(body))
                    guard response.status == .ok else {
                        throw try await apiError(response)
                    }
                    var parser = ServerSentEvents()
                    for try await buffer in response.body {
                        for event in try parser.feed(Array(buffer: buffer)) {
                            if event == "[DONE]" { continuation.finish(); return }
                            let object = try JSONSerialization.jsonObject(with: Data(event.utf8)) as? [String: Any]
                            if let error = object?["error"] as? [String: Any] {
                                throw ClientError.streamError(code: error["code"] as? String ?? "unknown",
                                                              message: error["message"] as? String ?? "")
                            }
                            if let choices = object?["choices"] as? [[String: Any]],
                               let delta = choices.first?["delta"] as? [String: Any],
                               let content = delta["content"] as? String, !content.isEmpty {
                                continuation.yield(content)
                            }
                        }
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    // MARK: - Plumbing

    struct ChatRequest: Encodable {
        var model: String
        var messages: [ChatMessage]
        var maxTokens: Int?
        var temperature: Double?
        var seed: Int?
        var stream: Bool?
        enum CodingKeys: String, CodingKey {
            case model, messages, temperature, seed, stream
            case maxTokens = "max_tokens"
        }
    }

    struct CompletionRequest: Encodable {
        var model: String
        var prompt: String
        var maxTokens: Int?
        var temperature: Double?
        enum CodingKeys: String, CodingKey {
            case model, prompt, temperature
            case maxTokens = "max_tokens"
        }
    }

    struct EmbeddingsRequest: Encodable {
        var model: String
        var input: [String]
    }

    func execute(method: HTTPMethod, path: String, body: Data?) async throws -> HTTPClientResponse {
        var request = HTTPClientRequest(url: baseURL + path)
        request.method = method
        request.headers.add(name: "authorization", value: "Bearer \(apiKey)")
        if let body {
            request.headers.add(name: "content-type", value: "application/json")
            request.body = .bytes(ByteBuffer(data: body))
        }
        return try await http.execute(request, timeout: .seconds(600))
    }

    func send<Body: Encodable, Response: Decodable>(method: HTTPMethod, path: String, body: Body?,
                                                    as: Response.Type) async throws -> Response {
        let response = try await execute(method: method, path: path, body: try body.map { try JSONEncoder().encode($0) })
        guard response.status == .ok else { throw try await apiError(response) }
        let bytes = try await response.body.collect(upTo: 64 << 20)
        do { return try JSONDecoder().decode(Response.self, from: Data(buffer: bytes)) } catch {
            throw ClientError.badResponse("\(error)")
        }
    }

    func apiError(_ response: HTTPClientResponse) async throws -> ClientError {
        let bytes = try await response.body.collect(upTo: 1 << 20)
        let object = try? JSONSerialization.jsonObject(with: Data(buffer: bytes)) as? [String: Any]
        let error = object?["error"] as? [String: Any]
        return .api(status: Int(response.status.code), code: error?["code"] as? String ?? "unknown",
                    message: error?["message"] as? String ?? String(buffer: bytes))
    }
}

/// Splits a byte stream into SSE `data:` payloads, however the bytes were chunked.
public struct ServerSentEvents: Sendable {
    /// One event larger than this is refused: a server that never ends an event cannot grow our memory for ever.
    public static let maxEventBytes = 8 << 20
    private var buffer: [UInt8] = []
    /// Where the search for the next event end resumes, so each byte is scanned about once.
    private var scanned = 0
    public init() {}

    public mutating func feed(_ bytes: [UInt8]) throws(ClientError) -> [String] {
        buffer.append(contentsOf: bytes)
        var events = [String]()
        while let end = eventEnd() {
            let raw = String(decoding: buffer[..<end.start], as: UTF8.self)
            buffer.removeSubrange(..<end.next)
            scanned = 0
            let data = raw.split(separator: "\n", omittingEmptySubsequences: false)
                .map { $0.hasSuffix("\r") ? $0.dropLast() : $0 }
                .filter { $0.hasPrefix("data:") }
                .map { $0.dropFirst(5).drop { $0 == " " } }
                .joined(separator: "\n")
            if !data.isEmpty { events.append(data) }
        }
        guard buffer.count <= Self.maxEventBytes else {
            throw .streamError(code: "event_too_large", message: "a server-sent event exceeds \(Self.maxEventBytes) bytes")
        }
        return events
    }

    private mutating func eventEnd() -> (start: Int, next: Int)? {
        var i = scanned
        while i + 1 < buffer.count {
            if buffer[i] == 10, buffer[i + 1] == 10 { return (i, i + 2) }
            if buffer[i] == 13, buffer[i + 1] == 10 {
                // A CR LF CR LF end may still be arriving: look at it again once more bytes are here.
                guard i + 3 < buffer.count else { break }
                if buffer[i + 2] == 13, buffer[i + 3] == 10 { return (i, i + 4) }
            }
            i += 1
        }
        scanned = i
        return nil
    }
}
