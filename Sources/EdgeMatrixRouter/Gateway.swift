import EdgeMatrixCore
import EdgeMatrixNetwork
import EdgeMatrixStore
import Foundation
import Hummingbird
import Logging
import Metrics
import HTTPTypes
import NIOCore

/// Checks `Authorization: Bearer <key>` against the router's hashed API keys. A valid key is remembered by its
/// hash (no secret stays in memory) for at most `validity`, so a key revoked with `emc keys api revoke` stops
/// working within that time; an unknown key is looked up each time, so a new key works at once.
public actor APIKeyCache {
    let store: APIKeyStore
    let validity: Duration
    static let maxEntries = 10_000
    private var checked: [Hash32: ContinuousClock.Instant] = [:]

    public init(store: APIKeyStore, validity: Duration = .seconds(1)) {
        self.store = store
        self.validity = validity
    }

    public func isValid(_ key: String) -> Bool {
        // Anything longer than a real key is not one; hashing it would only cost time.
        guard key.utf8.count <= 256 else { return false }
        let hash = Hash32.of(Array(key.utf8))
        let now = ContinuousClock.now
        if let at = checked[hash], now - at < validity { return true }
        guard (try? store.isValid(key)) == true else {
            checked[hash] = nil
            return false
        }
        if checked.count >= Self.maxEntries { checked.removeAll() }
        checked[hash] = now
        return true
    }
}

struct APIKeyMiddleware<Context: RequestContext>: RouterMiddleware {
    let keys: APIKeyCache

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        guard let header = request.headers[.authorization], header.hasPrefix("Bearer "),
              await keys.isValid(String(header.dropFirst(7)).trimmingCharacters(in: .whitespaces)) else {
            Counter(label: "emc_router_errors_total", dimensions: [("code", "invalid_api_key")]).increment()
            throw OpenAIError.invalidAPIKey()
        }
        return try await next(request, context)
    }
}

/// Converts anything thrown below into OpenAI's error shape, and counts requests by route and status.
struct OpenAIErrorMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch let error as OpenAIError {
            Counter(label: "emc_router_errors_total", dimensions: [("code", error.code)]).increment()
            return try error.response(from: request, context: context)
        } catch let error as HTTPError where error.status == .notFound {
            return try OpenAIError.notFound(request.uri.path).response(from: request, context: context)
        } catch let error as HTTPError where error.status == .contentTooLarge {
            return try OpenAIError.requestTooLarge(limit: Gateway.maxBodyBytes).response(from: request, context: context)
        } catch let error as HTTPError where error.status == .requestTimeout {
            return try OpenAIError.requestTimeout(seconds: Gateway.bodyReadTimeoutSeconds).response(from: request, context: context)
        }
    }
}

/// The OpenAI-compatible HTTP API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`
/// (with `stream: true` as SSE), pass-through `/v1/apps/{app}/...` for REST apps, and `/metrics`.
public struct Gateway: Sendable {
    /// Request-body limits per route: OpenAI routes and app pass-through.
    public static let maxBodyBytes = 16 << 20
    public static let appMaxBodyBytes = 16 << 20
    /// A whole request body must arrive within this time (the idle timeout alone lets a client drip bytes for ever).
    public static let bodyReadTimeoutSeconds = 60

    let pool: NodePool
    let forwarder: Forwarder
    let keys: APIKeyCache
    let metricsText: @Sendable () -> [UInt8]
    let logger: Logger

    public init(pool: NodePool, forwarder: Forwarder, keys: APIKeyCache, metricsText: @escaping @Sendable () -> [UInt8],
                logger: Logger) {
        self.pool = pool
        self.forwarder = forwarder
        self.keys = keys
        self.metricsText = metricsText
        self.logger = logger
    }

    public func makeRouter() -> Router<BasicRequestContext> {
        let router = Router()
        router.add(middleware: OpenAIErrorMiddleware())
        router.get("/health") { _, _ in
            Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(string: #"{"status":"ok"}"#)))
        }
        router.get("/metrics") { _, _ in
            Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
                     body: .init(byteBuffer: ByteBuffer(bytes: metricsText())))
        }
        let v1 = router.group("v1").add(middleware: APIKeyMiddleware(keys: keys))
        v1.get("models") { _, _ in try await models() }
        v1.get("network/nodes") { _, _ in try await nodes() }
        v1.post("chat/completions") { request, context in try await openAI(request, context: context, path: "/v1/chat/completions", route: "chat") }
        v1.post("completions") { request, context in try await openAI(request, context: context, path: "/v1/completions", route: "completions") }
        v1.post("embeddings") { request, context in try await openAI(request, context: context, path: "/v1/embeddings", route: "embeddings") }
        for method in [HTTPRequest.Method.get, .post, .put, .delete, .patch] {
            for path in ["apps/:app", "apps/:app/**"] {
                v1.on(RouterPath(path), method: method) { request, context in try await passThrough(request, context: context) }
            }
        }
        return router
    }

    func models() async throws -> Response {
        let data = await pool.liveModels().map { ["id": $0, "object": "model", "created": 0, "owned_by": "edgematrix"] as [String: Any] }
        let body = try JSONSerialization.data(withJSONObject: ["object": "list", "data": data], options: [.sortedKeys])
        return Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: body)))
    }

    /// Connected compute nodes and how the router sees them (not part of OpenAI's API).
    func nodes() async throws -> Response {
        let nodes = await pool.summaries().map { node -> [String: Any] in
            [
                "id": node.nodeID.description, "capacity": node.capacity, "in_flight": node.inFlight, "idle_slots": node.idleSlots,
                "latency_ewma_ms": node.quality.latencyEWMAms, "success_rate": node.quality.successRate,
                "apps": node.apps.map { ["name": $0.name, "kind": $0.kind.rawValue, "models": $0.models, "healthy": $0.healthy] as [String: Any] },
            ]
        }
        let body = try JSONSerialization.data(withJSONObject: ["object": "list", "data": nodes], options: [.sortedKeys])
        return Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: body)))
    }

    func openAI(_ request: Request, context: BasicRequestContext, path: String, route: String) async throws -> Response {
        let started = ContinuousClock.now
        let bytes = try await readBody(request, limit: Self.maxBodyBytes)
        let object: [String: Any]
        do {
            guard let parsed = try JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any] else {
                throw OpenAIError.invalidJSON("expected a JSON object")
            }
            object = parsed
        } catch let error as OpenAIError { throw error } catch {
            throw OpenAIError.invalidJSON("\(error.localizedDescription)")
        }
        guard let modelValue = object["model"] else { throw OpenAIError.missingParameter("model") }
        guard let model = modelValue as? String, !model.isEmpty else {
            throw OpenAIError.invalidParameter("model", "'model' must be a non-empty string")
        }
        var stream = false
        if let value = object["stream"], !(value is NSNull) {
            guard let flag = value as? Bool else {
                throw OpenAIError.invalidParameter("stream", "'stream' must be a boolean")
            }
            stream = flag
        }
        let requestID = "req-" + UUID().uuidString.lowercased()
        let isStream = stream
        let answer = try await forwarder.start(route: .model(model), bodyBytes: bytes.count) { app in
            WorkRequest(requestID: requestID, app: app, model: model, method: "POST", path: path,
                        contentType: "application/json", body: bytes, stream: isStream)
        }
        return respond(with: answer, route: route, started: started)
    }

    func passThrough(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let started = ContinuousClock.now
        let app = try context.parameters.require("app")
        var path = "/" + context.parameters.getCatchAll().joined(separator: "/")
        if let query = request.uri.query, !query.isEmpty { path += "?" + query }
        let body = try await readBody(request, limit: Self.appMaxBodyBytes)
        let requestID = "req-" + UUID().uuidString.lowercased()
        let contentType = request.headers[.contentType] ?? "application/octet-stream"
        let targetPath = path
        let answer = try await forwarder.start(route: .app(app), bodyBytes: body.count) { appName in
            WorkRequest(requestID: requestID, app: appName, model: "", method: request.method.rawValue, path: targetPath,
                        contentType: contentType, body: body, stream: false)
        }
        return respond(with: answer, route: "app", started: started)
    }

    /// Streams the node's answer to the client chunk by chunk. If the node drops mid-answer, an SSE stream ends
    /// with an error event in OpenAI's shape (the client has already seen bytes, so it cannot be retried).
    func respond(with answer: StartedAnswer, route: String, started: ContinuousClock.Instant) -> Response {
        let job = answer.job
        let isSSE = answer.contentType.hasPrefix("text/event-stream")
        let logger = logger
        let status = answer.status
        var headers: HTTPFields = [.contentType: answer.contentType]
        if isSSE { headers[.cacheControl] = "no-cache" }
        headers[HTTPField.Name.emcRequestID] = job.request.requestID
        headers[HTTPField.Name.emcNode] = job.nodeID.description
        let body = ResponseBody { writer in
            var outcome = "ok"
            do {
                while true {
                    let message: NodeWorkMessage?
                    do {
                        message = try await withTaskCancellationHandler { try await job.responses.next() } onCancel: { job.cancel() }
                    } catch is CancellationError {
                        throw CancellationError()
                    } catch {
                        // The node failed after the answer began: it cannot be moved to another node.
                        outcome = "node_disconnected"
                        Counter(label: "emc_router_errors_total", dimensions: [("code", "node_disconnected")]).increment()
                        logger.warning("compute node failed mid-answer", metadata: [
                            "request": "\(job.request.requestID)", "node": "\(job.nodeID.short)", "error": "\(error)",
                        ])
                        if isSSE {
                            let event = OpenAIError(status: .badGateway, type: "server_error", code: "node_disconnected",
                                                    message: "The compute node serving this stream failed mid-answer (\(error)); retry the request.")
                            try await writer.write(ByteBuffer(bytes: Array("data: ".utf8) + event.jsonBytes + Array("\n\n".utf8)))
                        }
                        break
                    }
                    guard let message else { break }
                    if case .chunk(let bytes) = message { try await writer.write(ByteBuffer(bytes: bytes)) }
                }
            } catch {
                // The client went away (or its connection broke): stop the node's work.
                job.cancel()
                Counter(label: "emc_router_requests_total", dimensions: [("route", route), ("status", "client_closed")]).increment()
                throw error
            }
            Counter(label: "emc_router_requests_total", dimensions: [("route", route), ("status", outcome == "ok" ? String(status) : outcome)])
                .increment()
            Metrics.Timer(label: "emc_router_request_duration_seconds", dimensions: [("route", route)])
                .recordInterval(since: started)
            try await writer.finish(nil)
        }
        // The tunnel endpoint admits only 200...599; checked again here because an out-of-range code traps.
        let httpStatus = (200...599).contains(status) ? HTTPResponse.Status(code: Int(status)) : .badGateway
        return Response(status: httpStatus, headers: headers, body: body)
    }

    /// Reads a request body of at most `limit` bytes (413 `request_too_large` beyond) within the read timeout.
    func readBody(_ request: Request, limit: Int) async throws -> [UInt8] {
        if let declared = request.headers[.contentLength].flatMap({ Int($0) }), declared > limit {
            throw OpenAIError.requestTooLarge(limit: limit)
        }
        let seconds = Self.bodyReadTimeoutSeconds
        do {
            return try await withThrowingTaskGroup(of: [UInt8]?.self) { group in
                group.addTask { Array(buffer: try await request.body.collect(upTo: limit)) }
                group.addTask {
                    try await Task.sleep(for: .seconds(seconds))
                    return nil
                }
                defer { group.cancelAll() }
                guard let first = try await group.next(), let bytes = first else { throw OpenAIError.requestTimeout(seconds: seconds) }
                return bytes
            }
        } catch let error as HTTPError where error.status == .contentTooLarge {
            throw OpenAIError.requestTooLarge(limit: limit)
        }
    }
}

extension Metrics.Timer {
    func recordInterval(since start: ContinuousClock.Instant) {
        let elapsed = ContinuousClock.now - start
        recordNanoseconds(elapsed.components.seconds * 1_000_000_000 + elapsed.components.attoseconds / 1_000_000_000)
    }
}

extension HTTPField.Name {
    static let emcRequestID = HTTPField.Name("x-emc-request-id")!
    static let emcNode = HTTPField.Name("x-emc-node")!
}
