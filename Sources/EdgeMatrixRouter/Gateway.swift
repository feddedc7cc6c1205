import EdgeMatrixCore
import EdgeMatrixNetwork
import EdgeMatrixStore
import Foundation
import Hummingbird
import Logging
import Metrics
import HTTPTypes
import NIOCore
import Synchronization

/// Checks `Authorization: Bearer <key>` against the router's hashed API keys. A valid key is remembered by its
/// hash (no secret stays in memory) for at most `validity`, so a key revoked with `emc keys api revoke` stops
/// working within that time; an unknown key is looked up each time, so a new key works at once.
public actor APIKeyCache {
    let store: APIKeyStore
    let validity: Duration
    static let maxEntries = 10_000
    private var checked: [Hash32: (at: ContinuousClock.Instant, key: AuthorizedKey)] = [:]

    public init(store: APIKeyStore, validity: Duration = .seconds(1)) {
        self.store = store
        self.validity = validity
    }

    public func isValid(_ key: String) -> Bool { lookup(key) != nil }

    /// The key's binding (account and limit), or nil for an unknown or revoked key.
    public func lookup(_ key: String) -> AuthorizedKey? {
        // Anything longer than a real key is not one; hashing it would only cost time.
        guard key.utf8.count <= 256 else { return nil }
        let hash = APIKeyBinding.hash(ofSecret: key)
        let now = ContinuousClock.now
        if let entry = checked[hash], now - entry.at < validity { return entry.key }
        guard let found = try? store.lookup(key) else {
            checked[hash] = nil
            return nil
        }
        if checked.count >= Self.maxEntries { checked.removeAll() }
        checked[hash] = (now, found)
        return found
    }
}

/// The gateway's request context: what the API-key middleware found, for the handlers.
public struct RouterRequestContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    /// The request's API key and its binding; set by `APIKeyMiddleware` on `/v1` routes.
    public var apiKey: AuthorizedKey?

    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
    }
}

struct APIKeyMiddleware: RouterMiddleware {
    typealias Context = RouterRequestContext
    let keys: APIKeyCache

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        guard let header = request.headers[.authorization], header.hasPrefix("Bearer "),
              let key = await keys.lookup(String(header.dropFirst(7)).trimmingCharacters(in: .whitespaces)) else {
            Counter(label: "emc_router_errors_total", dimensions: [("code", "invalid_api_key")]).increment()
            throw OpenAIError.invalidAPIKey()
        }
        var context = context
        context.apiKey = key
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

    /// A key binding is a few hundred bytes of hex.
    public static let keyBindingMaxBodyBytes = 8 << 10

    let pool: NodePool
    let forwarder: Forwarder
    let keys: APIKeyCache
    let receipts: ReceiptStore
    /// The router's node key: bindings must name it, and keys from before bindings bill its own account.
    let routerKey: PublicKey
    let metricsText: @Sendable () -> [UInt8]
    let logger: Logger
    /// The epoch API-key spend limits count in.
    let epochs: any SpendEpochs
    /// The payers' escrows with this router on chain.
    let escrows: any EscrowView
    /// The compute nodes' prices: admission prices a request's worst case at each node that could serve it.
    let prices: any PriceBook
    /// Requests still being served (the receipt store holds each accepted number; the gateway releases it once the
    /// answer is over), so settlement batches close only behind them. Nil when nothing is settled.
    let inFlight: InFlightSequences?
    /// The settlement batches' data (`GET /v1/settlements/...`), when the router settles.
    let settlementData: SettlementDataRoutes?
    private let bindingLimiter = RateWindow(perSecond: 20)

    public init(pool: NodePool, forwarder: Forwarder, keys: APIKeyCache, receipts: ReceiptStore, routerKey: PublicKey,
                epochs: any SpendEpochs = SingleSpendEpoch(), escrows: any EscrowView = UncheckedEscrow(),
                prices: any PriceBook = FreePriceBook(), inFlight: InFlightSequences? = nil,
                settlementData: SettlementDataRoutes? = nil, metricsText: @escaping @Sendable () -> [UInt8], logger: Logger) {
        self.prices = prices
        self.inFlight = inFlight
        self.settlementData = settlementData
        self.epochs = epochs
        self.escrows = escrows
        self.pool = pool
        self.forwarder = forwarder
        self.keys = keys
        self.receipts = receipts
        self.routerKey = routerKey
        self.metricsText = metricsText
        self.logger = logger
    }

    public func makeRouter() -> Router<RouterRequestContext> {
        let router = Router(context: RouterRequestContext.self)
        router.add(middleware: OpenAIErrorMiddleware())
        router.get("/health") { _, _ in
            Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(string: #"{"status":"ok"}"#)))
        }
        router.get("/metrics") { _, _ in
            Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
                     body: .init(byteBuffer: ByteBuffer(bytes: metricsText())))
        }
        // Outside API-key auth: this is how a key comes to exist. The signed binding is the credential.
        router.post("v1/keys") { request, _ in try await bindKey(request) }
        // The key a binding must name (`emc keys api new --router` asks for it; pin it with --router-key instead).
        router.get("v1/router") { _, _ in
            let body = try JSONSerialization.data(withJSONObject: ["object": "router", "router_key": routerKey.hex,
                                                                    "node_id": routerKey.nodeID.description], options: [.sortedKeys])
            return Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: body)))
        }
        // Settlement batches' data: public, outside API-key auth (docs/PROTOCOL.md § 12).
        settlementData?.register(on: router)
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

    /// Accepts a request on an authenticated key: allocates its sequence number, durably, and names its payer. Unless
    /// the payer is the router's own account, the request's worst-case cost is reserved against the payer's escrow in
    /// the same step (docs/SETTLEMENT.md § 8).
    func accept(_ context: RouterRequestContext, worstCost: UInt64) async throws -> (sequence: UInt64, payer: Account) {
        guard let key = context.apiKey else { throw OpenAIError.invalidAPIKey() }
        // A key from before bindings bills the router's own account; every other key exactly its binding's account.
        let payer = key.account ?? Account(owner: routerKey)
        let acceptance: ReceiptStore.Acceptance
        do {
            // The router's own account (operator keys) has no escrow with itself: its use is not settled.
            let escrowAvailable = payer.owner == routerKey && payer.subaccount == nil ? nil : escrows.available(payer: payer)
            acceptance = try await receipts.accept(keyHash: key.keyHash, payer: payer, epoch: epochs.current(),
                                                   spendLimit: key.spendLimitPerEpoch, escrowAvailable: escrowAvailable,
                                                   worstCost: worstCost)
        } catch {
            logger.error("cannot record an accepted request", metadata: ["error": "\(error)"])
            throw OpenAIError.storeUnavailable()
        }
        switch acceptance {
        case .accepted(let sequence): return (sequence, payer)
        case .overLimit(let spent):
            Counter(label: "emc_router_admission_refused_total", dimensions: [("reason", "spend_limit")]).increment()
            throw OpenAIError.insufficientQuota(spent: spent, limit: key.spendLimitPerEpoch)
        case .overEscrow(let unsettled, let reserved, let worst, let available):
            Counter(label: "emc_router_admission_refused_total", dimensions: [("reason", "escrow")]).increment()
            throw OpenAIError.insufficientEscrow(unsettled: unsettled, reserved: reserved, worst: worst, available: available,
                                                 router: routerKey)
        }
    }

    /// Runs a work route's handler for an accepted request: every answer, errors included, names its sequence number.
    func accepted(_ context: RouterRequestContext, worstCost: UInt64,
                  _ handle: (_ sequence: UInt64, _ payer: Account) async throws -> Response) async throws -> Response {
        let (sequence, payer) = try await accept(context, worstCost: worstCost)
        do {
            // On success the response body releases the number once the answer is relayed, and the reservation ends
            // once the tunnel has handled the answer's receipt (`respond`).
            return try await handle(sequence, payer)
        } catch var error as OpenAIError {
            inFlight?.release(sequence)
            await receipts.releaseReservation(sequence)
            error.requestSequence = sequence
            throw error
        } catch {
            inFlight?.release(sequence)
            await receipts.releaseReservation(sequence)
            throw error
        }
    }

    /// What admission decided about a request's price: the nodes it may go to and its worst-case cost there.
    struct Priced {
        var eligible: Set<NodeID>
        var worstCost: UInt64
    }

    /// Prices the request's worst case (`bound`) at every node serving the route now: a node whose worst case is above
    /// `maxPrice` is left out; the request reserves the highest worst case among the rest (nothing served: 0, and the
    /// forwarder answers that the model or app is not served). A cost beyond 64 bits counts as 2^64 − 1.
    func price(route: WorkRoute, model: String, path: String, bound: WorkUnits, maxPrice: UInt64?) async throws -> Priced {
        var costs = [NodeID: UInt64]()
        for (node, app) in await pool.servers(of: route) {
            costs[node] = await prices.prices(node: node, app: app, model: model, path: path).cost(of: bound) ?? .max
        }
        let eligible = costs.filter { node in maxPrice.map { node.value <= $0 } ?? true }
        if let maxPrice, eligible.isEmpty, let cheapest = costs.values.min() {
            Counter(label: "emc_router_admission_refused_total", dimensions: [("reason", "max_price")]).increment()
            throw OpenAIError.noNodeWithinMaxPrice(maxPrice: maxPrice, cheapest: cheapest)
        }
        return Priced(eligible: Set(eligible.keys), worstCost: eligible.values.max() ?? 0)
    }

    /// `X-EMC-Max-Price`: the most this request may cost, in EMC (docs/PROTOCOL.md § 8.1). Nil when absent.
    static func maxPrice(_ headers: HTTPFields) throws -> UInt64? {
        guard let text = headers[HTTPField.Name.emcMaxPrice] else { return nil }
        guard text.utf8.count <= 32 else {
            throw OpenAIError.invalidMaxPrice("X-EMC-Max-Price must be an EMC amount such as 0.002 (at most 32 characters)")
        }
        do { return try Amount(parsing: text).baseUnits } catch {
            throw OpenAIError.invalidMaxPrice("X-EMC-Max-Price: \(error.description)")
        }
    }

    /// An OpenAI request's body as the gateway forwards it, and what admission needs to know of it.
    struct OpenAIBody {
        var model: String
        var stream: Bool
        /// The bytes forwarded: the client's, with `max_tokens` added where it named no completion limit.
        var forwarded: [UInt8]
        var bound: WorkUnits
    }

    func openAIBody(_ request: Request, path: String) async throws -> OpenAIBody {
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
        // The router's completion ceiling is the app's too: without it the app could generate past what was reserved
        // (the node would bill no more, but would work unpaid).
        var forwarded = bytes
        if path != "/v1/embeddings", let limited = RequestBound.withDefaultMaxTokens(bytes, object: object) { forwarded = limited }
        return OpenAIBody(model: model, stream: stream, forwarded: forwarded,
                          bound: RequestBound.units(path: path, requestBytes: UInt64(forwarded.count), object: object))
    }

    func openAI(_ request: Request, context: RouterRequestContext, path: String, route: String) async throws -> Response {
        let started = ContinuousClock.now
        let maxPrice = try Self.maxPrice(request.headers)
        // The body is read before admission, since the worst case depends on it. What is wrong with it is answered
        // after admission, as before, so that every answer past authentication and admission names its sequence.
        let parsed: Result<OpenAIBody, OpenAIError>
        do { parsed = .success(try await openAIBody(request, path: path)) } catch let error as OpenAIError { parsed = .failure(error) }
        var priced = Priced(eligible: [], worstCost: 0)
        if case .success(let body) = parsed {
            priced = try await price(route: .model(body.model), model: body.model, path: path, bound: body.bound, maxPrice: maxPrice)
        }
        return try await accepted(context, worstCost: priced.worstCost) { sequence, payer in
            let body = try parsed.get()
            let (model, forwarded, isStream) = (body.model, body.forwarded, body.stream)
            // Prices are filled in for the chosen node when the tunnel hands it the request.
            let answer = try await forwarder.start(route: .model(model), bodyBytes: forwarded.count, eligible: priced.eligible) { app, attempt in
                WorkRequest(requestID: String(sequence), app: app, model: model, method: "POST", path: path,
                            contentType: "application/json", body: forwarded, stream: isStream, sequence: sequence, attempt: attempt,
                            payer: payer, prices: .free)
            }
            return await respond(with: answer, route: route, started: started)
        }
    }

    func passThrough(_ request: Request, context: RouterRequestContext) async throws -> Response {
        let started = ContinuousClock.now
        let maxPrice = try Self.maxPrice(request.headers)
        let app = try context.parameters.require("app")
        var path = "/" + context.parameters.getCatchAll().joined(separator: "/")
        if let query = request.uri.query, !query.isEmpty { path += "?" + query }
        let targetPath = path
        // Read before admission (the worst case depends on it); a body that cannot be read is answered after it.
        let read: Result<[UInt8], OpenAIError>
        do { read = .success(try await readBody(request, limit: Self.appMaxBodyBytes)) } catch let error as OpenAIError { read = .failure(error) }
        var priced = Priced(eligible: [], worstCost: 0)
        if case .success(let body) = read {
            priced = try await price(route: .app(app), model: "", path: targetPath,
                                     bound: RequestBound.units(path: targetPath, body: body), maxPrice: maxPrice)
        }
        return try await accepted(context, worstCost: priced.worstCost) { sequence, payer in
            let body = try read.get()
            let contentType = request.headers[.contentType] ?? "application/octet-stream"
            let answer = try await forwarder.start(route: .app(app), bodyBytes: body.count, eligible: priced.eligible) { appName, attempt in
                WorkRequest(requestID: String(sequence), app: appName, model: "", method: request.method.rawValue, path: targetPath,
                            contentType: contentType, body: body, stream: false, sequence: sequence, attempt: attempt, payer: payer,
                            prices: .free)
            }
            return await respond(with: answer, route: "app", started: started)
        }
    }

    /// How much of a model server's error answer is read to build the client's error (the rest is drained).
    static let maxRelayedErrorBytes = 64 << 10

    /// Streams the node's answer to the client chunk by chunk. If the node drops mid-answer, an SSE stream ends
    /// with an error event in OpenAI's shape (the client has already seen bytes, so it cannot be retried).
    func respond(with answer: StartedAnswer, route: String, started: ContinuousClock.Instant) async -> Response {
        let job = answer.job
        let isSSE = answer.contentType.hasPrefix("text/event-stream")
        let logger = logger
        let status = answer.status
        var headers: HTTPFields = [.contentType: answer.contentType]
        if isSSE { headers[.cacheControl] = "no-cache" }
        headers[HTTPField.Name.emcRequestID] = String(job.request.sequence)
        headers[HTTPField.Name.emcNode] = job.nodeID.description
        let inFlight = inFlight
        // The reservation ends once the tunnel has handled this answer's receipt (stored: its cost is then unsettled),
        // whether or not the body is ever written.
        let receipts = receipts
        Task {
            await job.untilHandled()
            await receipts.releaseReservation(job.request.sequence)
        }
        // On the OpenAI routes an error answer reaches the client in OpenAI's shape with a stable code, whatever the
        // model server sent (llama.cpp answers some malformed requests 500 with `"code": null`). The node's receipt
        // still covers the bytes the node sent; app pass-through routes relay the app's answer as it is.
        if status >= 400, route != "app" {
            var body: [UInt8] = []
            do {
                while let message = try await job.responses.next() {
                    if case .chunk(let bytes) = message, body.count < Self.maxRelayedErrorBytes {
                        body += bytes.prefix(Self.maxRelayedErrorBytes - body.count)
                    }
                }
            } catch {
                logger.warning("compute node failed mid-error-answer", metadata: ["request": "\(job.request.sequence)", "error": "\(error)"])
            }
            inFlight?.release(job.request.sequence)
            var error = OpenAIError.upstreamAnswer(status: status, body: body)
            error.requestSequence = job.request.sequence
            var errorHeaders = error.headers
            errorHeaders[HTTPField.Name.emcNode] = job.nodeID.description
            Counter(label: "emc_router_requests_total", dimensions: [("route", route), ("status", String(error.status.code))]).increment()
            Counter(label: "emc_router_errors_total", dimensions: [("code", error.code)]).increment()
            return Response(status: error.status, headers: errorHeaders, body: .init(byteBuffer: ByteBuffer(bytes: error.jsonBytes)))
        }
        let body = ResponseBody { writer in
            // The answer is over (relayed, failed or abandoned): the tunnel still holds the number until its receipt
            // is handled.
            defer { inFlight?.release(job.request.sequence) }
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
                            "request": "\(job.request.sequence)", "node": "\(job.nodeID.short)", "error": "\(error)",
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

    /// `POST /v1/keys`: stores an account's signed binding of an API key (by its hash) to this router. Body:
    /// `{"binding": hex, "signature": hex, "label": string?}`; see docs/PROTOCOL.md, "API key binding".
    func bindKey(_ request: Request) async throws -> Response {
        guard bindingLimiter.admit() else {
            throw OpenAIError(status: .tooManyRequests, type: "rate_limit_error", code: "rate_limited",
                              message: "Too many key bindings right now; retry in a second.", retryAfterSeconds: 1)
        }
        let bytes = try await readBody(request, limit: Self.keyBindingMaxBodyBytes)
        guard let object = (try? JSONSerialization.jsonObject(with: Data(bytes))) as? [String: Any] else {
            throw OpenAIError.invalidJSON("expected a JSON object with 'binding' and 'signature' (hex)")
        }
        func hexField(_ name: String) throws -> [UInt8] {
            guard let value = object[name] else { throw OpenAIError.missingParameter(name) }
            guard let text = value as? String, let raw = Hex.decode(text) else {
                throw OpenAIError.invalidBinding("'\(name)' must be a string of hex digits", param: name)
            }
            return raw
        }
        let bindingBytes = try hexField("binding"), signature = try hexField("signature")
        var label = "bound"
        if let value = object["label"], !(value is NSNull) {
            guard let text = value as? String, text.utf8.count <= APIKeyStore.maxLabelBytes else {
                throw OpenAIError.invalidParameter("label", "'label' must be a string of at most \(APIKeyStore.maxLabelBytes) bytes")
            }
            label = text
        }
        let signed: SignedAPIKeyBinding
        do { signed = try SignedAPIKeyBinding(bytes: bindingBytes, signature: signature, router: routerKey) } catch {
            Counter(label: "emc_router_errors_total", dimensions: [("code", error.code)]).increment()
            throw OpenAIError(status: .badRequest, type: "invalid_request_error", code: error.code, message: error.description,
                              param: error.code == "bad_signature" ? "signature" : "binding")
        }
        let outcome: APIKeyBindOutcome
        do { outcome = try keys.store.bind(signed, label: label) } catch {
            logger.error("cannot store an API key binding", metadata: ["error": "\(error)"])
            throw OpenAIError.storeUnavailable()
        }
        switch outcome {
        case .stored: break
        case .exists:
            throw OpenAIError(status: .conflict, type: "invalid_request_error", code: "key_exists",
                              message: "A key with this hash is already bound at this router (revoked keys stay revoked); generate a new secret.")
        case .tooManyKeys:
            throw OpenAIError(status: .forbidden, type: "invalid_request_error", code: "too_many_keys",
                              message: "This account holds \(APIKeyStore.maxKeysPerAccount) keys at this router already.")
        }
        let binding = signed.binding
        logger.info("API key bound", metadata: ["account": "\(binding.account)", "key": "\(binding.keyHash.hex.prefix(APIKeyStore.idLength))"])
        let limit: Any = binding.spendLimitPerEpoch == APIKeyBinding.unlimited ? NSNull() : Amount(baseUnits: binding.spendLimitPerEpoch).description
        let body = try JSONSerialization.data(withJSONObject: [
            "object": "api_key", "id": String(binding.keyHash.hex.prefix(APIKeyStore.idLength)), "account": binding.account.description,
            "router": routerKey.hex, "spend_limit_per_epoch": limit, "label": label,
        ], options: [.sortedKeys])
        return Response(status: .created, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: body)))
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

/// At most `perSecond` events in any one-second window (a coarse router-wide limit on unauthenticated writes).
final class RateWindow: Sendable {
    private let state = Mutex((start: ContinuousClock.now, count: 0))
    let perSecond: Int
    init(perSecond: Int) { self.perSecond = perSecond }

    func admit() -> Bool {
        state.withLock { window in
            let now = ContinuousClock.now
            if now - window.start >= .seconds(1) { window = (now, 0) }
            window.count += 1
            return window.count <= perSecond
        }
    }
}

extension HTTPField.Name {
    static let emcRequestID = HTTPField.Name("x-emc-request-id")!
    static let emcNode = HTTPField.Name("x-emc-node")!
    static let emcMaxPrice = HTTPField.Name("x-emc-max-price")!
}
