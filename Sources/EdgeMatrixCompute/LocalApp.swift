import AsyncHTTPClient
import EdgeMatrixCore
import EdgeMatrixNetwork
import Foundation
import NIOCore
import NIOHTTP1
import NIOFoundationCompat

/// The answer of a local app: status, content type and the body as it is produced.
public struct LocalAnswer: Sendable {
    public var status: UInt16
    public var contentType: String
    public var body: HTTPClientResponse.Body

    public init(status: UInt16, contentType: String, body: HTTPClientResponse.Body) {
        self.status = status
        self.contentType = contentType
        self.body = body
    }
}

/// The result of probing a local app.
public struct AppProbe: Sendable, Equatable {
    public var healthy: Bool
    public var models: [String]
    public var detail: String

    public init(healthy: Bool, models: [String], detail: String) {
        self.healthy = healthy
        self.models = models
        self.detail = detail
    }
}

/// A local AI app a compute node fronts. The seam between the node and whatever serves the work.
public protocol LocalApp: Sendable {
    var name: String { get }
    var kind: AppDescriptor.Kind { get }
    func probe() async -> AppProbe
    func send(_ request: WorkRequest) async throws -> LocalAnswer
    /// Whether `meter` reads the answer's bytes; when it does not, the node does not keep them.
    var metersAnswerBytes: Bool { get }
    /// Work units of an answer, from its bytes (a usage block for OpenAI apps, one item for REST calls).
    func meter(_ request: WorkRequest, answer: [UInt8], isSSE: Bool) -> WorkUnits
}

public enum LocalAppError: Error, CustomStringConvertible, Sendable {
    case unreachable(app: String, reason: String)

    public var description: String {
        switch self {
        case .unreachable(let app, let reason): "local app '\(app)' is unreachable: \(reason)"
        }
    }
}

/// Forwards over HTTP to an app on this machine. `kind` decides probing and metering.
public struct HTTPLocalApp: LocalApp {
    public let name: String
    public let kind: AppDescriptor.Kind
    let baseURL: String
    let configuredModels: [String]?
    let healthPath: String
    let client: HTTPClient

    public init(entry: ComputeConfiguration.AppEntry, client: HTTPClient) {
        name = entry.name
        kind = entry.kind
        baseURL = entry.baseURL.hasSuffix("/") ? String(entry.baseURL.dropLast()) : entry.baseURL
        configuredModels = entry.models
        healthPath = entry.healthPath ?? (entry.kind == .openai ? "/v1/models" : "/")
        self.client = client
    }

    public func probe() async -> AppProbe {
        var request = HTTPClientRequest(url: baseURL + healthPath)
        request.method = .GET
        do {
            let response = try await client.execute(request, timeout: .seconds(5))
            let body = try await response.body.collect(upTo: 4 << 20)
            guard response.status.code < 500 else {
                return AppProbe(healthy: false, models: configuredModels ?? [], detail: "HTTP \(response.status.code)")
            }
            var models = configuredModels ?? []
            if kind == .openai, configuredModels?.isEmpty ?? true,
               let object = try? JSONSerialization.jsonObject(with: Data(buffer: body)) as? [String: Any],
               let data = object["data"] as? [[String: Any]] {
                models = data.compactMap { $0["id"] as? String }
            }
            return AppProbe(healthy: true, models: models, detail: "HTTP \(response.status.code)")
        } catch {
            return AppProbe(healthy: false, models: configuredModels ?? [], detail: "\(error)")
        }
    }

    public func send(_ work: WorkRequest) async throws -> LocalAnswer {
        var request = HTTPClientRequest(url: baseURL + work.path)
        request.method = HTTPMethod(rawValue: work.method)
        request.headers.add(name: "content-type", value: work.contentType)
        if work.stream { request.headers.add(name: "accept", value: "text/event-stream") }
        if !work.body.isEmpty { request.body = .bytes(ByteBuffer(bytes: work.body)) }
        let response: HTTPClientResponse
        do {
            response = try await client.execute(request, timeout: .seconds(600))
        } catch {
            throw LocalAppError.unreachable(app: name, reason: "\(error)")
        }
        return LocalAnswer(status: UInt16(clamping: response.status.code),
                           contentType: response.headers.first(name: "content-type") ?? "application/octet-stream",
                           body: response.body)
    }

    public var metersAnswerBytes: Bool { kind == .openai }

    public func meter(_ request: WorkRequest, answer: [UInt8], isSSE: Bool) -> WorkUnits {
        kind == .openai ? UsageMeter.openAI(answer: answer, isSSE: isSSE) : WorkUnits(items: 1)
    }
}

/// Reads work units from OpenAI-shaped answers.
public enum UsageMeter {
    public static func openAI(answer: [UInt8], isSSE: Bool) -> WorkUnits {
        if !isSSE {
            guard let object = try? JSONSerialization.jsonObject(with: Data(answer)) as? [String: Any] else { return WorkUnits() }
            var units = usage(in: object) ?? WorkUnits()
            if (object["object"] as? String) == "list", let data = object["data"] as? [Any] { units.items = UInt64(clamping: data.count) }
            return units
        }
        // Streams: take a usage block if the server sent one; otherwise count content deltas (one token each).
        var units = WorkUnits()
        var deltas: UInt64 = 0
        var sawUsage = false
        for line in answer.split(separator: UInt8(ascii: "\n")) where line.starts(with: Array("data:".utf8)) {
            let payload = line.dropFirst(5).drop { $0 == UInt8(ascii: " ") }
            guard let object = try? JSONSerialization.jsonObject(with: Data(payload)) as? [String: Any] else { continue }
            if let found = usage(in: object) { units = found; sawUsage = true }
            if let choices = object["choices"] as? [[String: Any]], choices.contains(where: hasContent) { deltas += 1 }
        }
        if !sawUsage { units.completionTokens = deltas }
        return units
    }

    private static func usage(in object: [String: Any]) -> WorkUnits? {
        guard let usage = object["usage"] as? [String: Any] else { return nil }
        return WorkUnits(promptTokens: count(usage["prompt_tokens"]), completionTokens: count(usage["completion_tokens"]))
    }

    /// A token count from the app's JSON: a negative, fractional or absurd number counts as 0, never wraps.
    private static func count(_ value: Any?) -> UInt64 {
        guard let number = value as? NSNumber, let exact = Int64(exactly: number.doubleValue),
              (0...(1 << 40)).contains(exact) else { return 0 }
        return UInt64(exact)
    }

    private static func hasContent(_ choice: [String: Any]) -> Bool {
        if let text = choice["text"] as? String, !text.isEmpty { return true }
        if let delta = choice["delta"] as? [String: Any], let content = delta["content"] as? String, !content.isEmpty { return true }
        return false
    }
}
