import AsyncHTTPClient
@testable import EdgeMatrixChain
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNode
import EdgeMatrixRouter
import EdgeMatrixStore
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import Testing

/// One of the OpenAPI 3.1 documents in docs/openapi/, read with JSONSerialization, and a small JSON Schema checker for
/// the keywords the specs use (`$ref`, `type`, `required`, `properties`, `items`, `allOf`, `oneOf`, `anyOf`, `const`,
/// `enum`, `pattern`, `minimum`, `maximum`).
struct OpenAPIDocument: @unchecked Sendable {
    static let methods = ["get", "put", "post", "delete", "options", "head", "patch", "trace"]

    struct Operation: @unchecked Sendable, CustomStringConvertible {
        let path: String
        let method: String
        let object: [String: Any]
        var id: String { object["operationId"] as? String ?? "" }
        var responses: [String: Any] { object["responses"] as? [String: Any] ?? [:] }
        var parameters: [[String: Any]] { object["parameters"] as? [[String: Any]] ?? [] }
        var needsAPIKey: Bool { !((object["security"] as? [Any]) ?? []).isEmpty }
        var description: String { "\(method.uppercased()) \(path) (\(id))" }
    }

    let name: String
    let root: [String: Any]

    init(_ name: String) throws {
        self.name = name
        let data = try Data(contentsOf: URL(fileURLWithPath: Harness.packageRoot + "/docs/openapi/" + name))
        guard let root = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw HarnessError.processFailed("docs/openapi/\(name) is not a JSON object")
        }
        self.root = root
    }

    var operations: [Operation] {
        let paths = root["paths"] as? [String: Any] ?? [:]
        return paths.keys.sorted().flatMap { path in
            let item = paths[path] as? [String: Any] ?? [:]
            return Self.methods.compactMap { method in
                (item[method] as? [String: Any]).map { Operation(path: path, method: method, object: $0) }
            }
        }
    }

    /// The value at a local JSON pointer (`#/components/schemas/Name`).
    func pointer(_ reference: String) -> Any? {
        guard reference.hasPrefix("#/") else { return nil }
        var node: Any = root
        for part in reference.dropFirst(2).split(separator: "/") {
            let key = part.replacingOccurrences(of: "~1", with: "/").replacingOccurrences(of: "~0", with: "~")
            guard let next = (node as? [String: Any])?[key] else { return nil }
            node = next
        }
        return node
    }

    /// `value`, or what its `$ref` (a Reference Object, as responses may be) points to.
    func resolved(_ value: Any) -> Any {
        var value = value
        for _ in 0..<16 {
            guard let reference = (value as? [String: Any])?["$ref"] as? String, let target = pointer(reference) else { break }
            value = target
        }
        return value
    }

    /// Every `$ref` in the document, with where it is.
    func references(in value: Any? = nil, at path: String = "#") -> [(at: String, ref: String)] {
        let value = value ?? root
        if let object = value as? [String: Any] {
            var found = (object["$ref"] as? String).map { [(path, $0)] } ?? []
            for (key, child) in object { found += references(in: child, at: path + "/" + key) }
            return found
        }
        if let array = value as? [Any] { return array.enumerated().flatMap { references(in: $1, at: path + "/\($0)") } }
        return []
    }

    /// The response an answer with `status` and `headers` falls under: the status's own, else `default` when the answer
    /// carries every header `default` requires (a relayed answer: `x-emc-node`).
    func response(_ operation: Operation, status: Int, headers: (String) -> String?) -> (key: String, object: [String: Any])? {
        if let object = operation.responses[String(status)].map(resolved) as? [String: Any] { return (String(status), object) }
        guard let object = operation.responses["default"].map(resolved) as? [String: Any] else { return nil }
        let required = (object["headers"] as? [String: Any] ?? [:]).filter { (($0.value as? [String: Any])?["required"] as? Bool) == true }
        return required.keys.allSatisfy { headers($0) != nil } ? ("default", object) : nil
    }

    // MARK: JSON Schema subset

    /// What in `value` breaks `schema`; empty when it conforms.
    func violations(_ value: Any, _ schemaValue: Any, at path: String = "$", depth: Int = 0) -> [String] {
        guard depth < 64, let schema = schemaValue as? [String: Any] else { return [] }
        if let reference = schema["$ref"] as? String {
            guard let target = pointer(reference) else { return ["\(path): unresolved \(reference)"] }
            return violations(value, target, at: path, depth: depth + 1)
        }
        var found: [String] = []
        for part in schema["allOf"] as? [Any] ?? [] { found += violations(value, part, at: path, depth: depth + 1) }
        if let options = schema["oneOf"] as? [Any] {
            let matching = options.filter { violations(value, $0, at: path, depth: depth + 1).isEmpty }.count
            if matching != 1 { found.append("\(path): \(Self.describe(value)) matches \(matching) of oneOf, not exactly 1") }
        }
        if let options = schema["anyOf"] as? [Any], !options.contains(where: { violations(value, $0, at: path, depth: depth + 1).isEmpty }) {
            found.append("\(path): \(Self.describe(value)) matches none of anyOf")
        }
        if let types = (schema["type"] as? [String]) ?? (schema["type"] as? String).map({ [$0] }),
           !types.contains(where: { Self.isType(value, $0) }) {
            return found + ["\(path): \(Self.describe(value)) is not of type \(types.joined(separator: " or "))"]
        }
        if let constant = schema["const"], !Self.equal(value, constant) {
            found.append("\(path): \(Self.describe(value)) is not \(Self.describe(constant))")
        }
        if let choices = schema["enum"] as? [Any], !choices.contains(where: { Self.equal(value, $0) }) {
            found.append("\(path): \(Self.describe(value)) is none of \(choices)")
        }
        if let pattern = schema["pattern"] as? String, let text = value as? String {
            let regex = try? NSRegularExpression(pattern: pattern)
            if regex?.firstMatch(in: text, range: NSRange(text.startIndex..., in: text)) == nil {
                found.append("\(path): \"\(text.prefix(80))\" does not match \(pattern)")
            }
        }
        if let number = value as? NSNumber, !Self.isBool(value) {
            if let minimum = schema["minimum"] as? NSNumber, number.compare(minimum) == .orderedAscending {
                found.append("\(path): \(number) is below \(minimum)")
            }
            if let maximum = schema["maximum"] as? NSNumber, number.compare(maximum) == .orderedDescending {
                found.append("\(path): \(number) is above \(maximum)")
            }
        }
        if let object = value as? [String: Any] {
            for name in schema["required"] as? [String] ?? [] where object[name] == nil {
                found.append("\(path): required property '\(name)' is missing")
            }
            for (name, property) in schema["properties"] as? [String: Any] ?? [:] {
                if let child = object[name] { found += violations(child, property, at: path + "." + name, depth: depth + 1) }
            }
        }
        if let array = value as? [Any], let items = schema["items"] {
            for (index, item) in array.enumerated() { found += violations(item, items, at: path + "[\(index)]", depth: depth + 1) }
        }
        return found
    }

    /// JSONSerialization gives booleans as NSNumbers of type `c` (and 0 and 1 also bridge to Bool, so `is Bool` cannot tell).
    static func isBool(_ value: Any) -> Bool {
        guard let number = value as? NSNumber else { return false }
        return String(cString: number.objCType) == "c"
    }

    static func isType(_ value: Any, _ type: String) -> Bool {
        switch type {
        case "null": return value is NSNull
        case "boolean": return isBool(value)
        case "string": return value is String
        case "array": return value is [Any]
        case "object": return value is [String: Any]
        case "number": return value is NSNumber && !isBool(value)
        case "integer":
            guard let number = value as? NSNumber, !isBool(value) else { return false }
            let kind = String(cString: number.objCType)
            return (kind != "d" && kind != "f") || number.doubleValue.rounded() == number.doubleValue
        default: return false
        }
    }

    static func equal(_ a: Any, _ b: Any) -> Bool {
        if let x = a as? String, let y = b as? String { return x == y }
        if let x = a as? NSNumber, let y = b as? NSNumber { return isBool(x) == isBool(y) && x == y }
        return a is NSNull && b is NSNull
    }

    static func describe(_ value: Any) -> String {
        if let text = value as? String { return "\"\(text.prefix(80))\"" }
        if value is NSNull { return "null" }
        if isBool(value) { return (value as? NSNumber)?.boolValue == true ? "true" : "false" }
        if let number = value as? NSNumber { return number.stringValue }
        if value is [Any] { return "an array" }
        return "an object"
    }

    /// `/blocks/{height}` and Hummingbird's `/blocks/{height}` or `/v1/apps/{app}/**` compared without parameter names.
    static func routeShape(_ method: String, _ path: String) -> String {
        let parts = path.split(separator: "/").map { part -> String in
            part == "**" || (part.hasPrefix("{") && part.hasSuffix("}")) ? "{}" : String(part)
        }
        return method.uppercased() + " /" + parts.joined(separator: "/")
    }
}

/// Runs every operation of a spec against a live server and checks each answer against what the spec says.
struct SpecConformance {
    let spec: OpenAPIDocument
    let baseURL: String
    /// Values for parameters by name (path and query), used instead of the spec's examples.
    var values: [String: String] = [:]
    /// Request bodies by operationId (content type, bytes), used instead of the spec's example.
    var bodies: [String: (contentType: String, bytes: [UInt8])] = [:]
    var apiKey: String?

    struct Outcome {
        var result: Harness.HTTPResult
        var json: Any?
        var problems: [String]
    }

    func url(for operation: OpenAPIDocument.Operation) -> String {
        var path = operation.path
        var query: [String] = []
        for parameter in operation.parameters {
            guard let name = parameter["name"] as? String else { continue }
            let value = values[name] ?? (parameter["example"]).map { Self.text($0) }
            switch parameter["in"] as? String {
            case "path": path = path.replacingOccurrences(of: "{\(name)}", with: value ?? "MISSING-EXAMPLE")
            case "query": if let value { query.append("\(name)=\(value.addingPercentEncoding(withAllowedCharacters: .urlQueryAllowed) ?? value)") }
            default: break
            }
        }
        return baseURL + path + (query.isEmpty ? "" : "?" + query.joined(separator: "&"))
    }

    static func text(_ value: Any) -> String { (value as? String) ?? (value as? NSNumber)?.stringValue ?? "\(value)" }

    func body(for operation: OpenAPIDocument.Operation) -> (contentType: String, bytes: [UInt8])? {
        if let body = bodies[operation.id] { return body }
        let content = (operation.object["requestBody"] as? [String: Any])?["content"] as? [String: Any] ?? [:]
        for (type, media) in content.sorted(by: { $0.key < $1.key }) {
            if let example = (media as? [String: Any])?["example"],
               let data = try? JSONSerialization.data(withJSONObject: example, options: [.sortedKeys]) {
                return (type, Array(data))
            }
        }
        return nil
    }

    /// Sends the operation with example values; an SSE answer is read up to its first event.
    func send(_ operation: OpenAPIDocument.Operation) async throws -> Harness.HTTPResult {
        var request = HTTPClientRequest(url: url(for: operation))
        request.method = HTTPMethod(rawValue: operation.method.uppercased())
        if operation.needsAPIKey, let apiKey { request.headers.add(name: "authorization", value: "Bearer \(apiKey)") }
        if let body = body(for: operation) {
            request.headers.add(name: "content-type", value: body.contentType)
            request.body = .bytes(ByteBuffer(bytes: body.bytes))
        }
        let response = try await Harness.http.execute(request, timeout: .seconds(120))
        var bytes: [UInt8] = []
        if response.headers.first(name: "content-type")?.hasPrefix("text/event-stream") == true {
            for try await chunk in response.body {
                bytes += Array(buffer: chunk)
                if String(decoding: bytes, as: UTF8.self).contains("\n\n") { break }
            }
        } else {
            bytes = Array(buffer: try await response.body.collect(upTo: 64 << 20))
        }
        return Harness.HTTPResult(status: Int(response.status.code), headers: response.headers.map { ($0.name, $0.value) }, body: bytes)
    }

    /// The server's own "no such route" answer (not a handler's 404 for a missing block, batch, model or app): a 404 that
    /// is not in the API's error shape, or is, with code `not_found` and the router's message for an unknown path.
    static func isMissingRoute(_ result: Harness.HTTPResult) -> Bool {
        guard result.status == 404, result.header("x-emc-node") == nil else { return false }
        guard let error = result.json?["error"] as? [String: Any], let code = error["code"] as? String else { return true }
        let message = error["message"] as? String ?? ""
        return code == "not_found" && (message.hasPrefix("no route ") || message.hasPrefix("Unknown path "))
    }

    /// Sends `operation` and lists every way the answer departs from the spec.
    func check(_ operation: OpenAPIDocument.Operation) async throws -> Outcome {
        let result = try await send(operation)
        var problems: [String] = []
        let what = "\(operation) answered \(result.status)"
        // Catches: a documented route renamed or removed in the code (or a method changed) without the spec.
        if Self.isMissingRoute(result) { return Outcome(result: result, json: nil, problems: ["\(what): the server has no such route: \(result.text.prefix(200))"]) }
        // Catches: a status the code now answers that the spec does not list (a new error, a 200 that became 201).
        guard let matched = spec.response(operation, status: result.status, headers: { result.header($0) }) else {
            return Outcome(result: result, json: nil, problems: ["\(what), a status the spec does not list (\(operation.responses.keys.sorted())): \(result.text.prefix(300))"])
        }
        let (key, response) = (matched.key, matched.object)
        // Catches: a required response header (x-emc-request-id, x-emc-node, Retry-After) dropped or malformed.
        for (name, header) in response["headers"] as? [String: Any] ?? [:] {
            guard let header = header as? [String: Any] else { continue }
            if let value = result.header(name) {
                problems += spec.violations(value, header["schema"] ?? [:], at: "header \(name)").map { "\(what): \($0)" }
            } else if header["required"] as? Bool == true {
                problems.append("\(what): required header \(name) is missing")
            }
        }
        let content = response["content"] as? [String: Any] ?? [:]
        let contentType = (result.header("content-type") ?? "").lowercased()
        let mediaType = contentType.split(separator: ";").first.map { $0.trimmingCharacters(in: .whitespaces) } ?? ""
        // Catches: an answer in a content type the spec does not name (JSON that became text, an SSE route that is not).
        let media = content.first { type, _ in
            type == "*/*" || type.split(separator: ";").first.map { $0.trimmingCharacters(in: .whitespaces) } == mediaType
        }
        if !content.isEmpty, media == nil {
            problems.append("\(what) with content type '\(contentType)'; the spec names \(content.keys.sorted())")
        }
        // A node's or app's own answer relayed under an error status has the node's body, not the router's.
        let relayed = result.header("x-emc-node") != nil && !(200..<300).contains(result.status)
        var json: Any?
        if let found = media, let media = found.value as? [String: Any], !relayed {
            if mediaType == "application/json" {
                json = try? JSONSerialization.jsonObject(with: Data(result.body), options: [.fragmentsAllowed])
                if let json {
                    // Catches: a field renamed, dropped or retyped in the code (e.g. an amount sent as a number) without the spec.
                    problems += spec.violations(json, media["schema"] ?? [:]).map { "\(what): \($0)" }
                } else {
                    problems.append("\(what): the body is not JSON: \(result.text.prefix(200))")
                }
                // Catches: an error code the spec does not list for this operation and status (a renamed stable code).
                if let codes = response["x-codes"] as? [String] {
                    let code = ((json as? [String: Any])?["error"] as? [String: Any])?["code"] as? String
                    if code == nil || !codes.contains(code!) {
                        problems.append("\(what) with error code \(code ?? "none"); the spec lists \(codes) for \(key)")
                    }
                }
            }
            // Catches: an SSE event whose data no longer has the documented fields.
            if mediaType == "text/event-stream", let data = media["x-sse-data"] {
                let line = result.text.split(separator: "\n").first { $0.hasPrefix("data:") }
                let payload = line.map { $0.dropFirst(5).trimmingCharacters(in: .whitespaces) } ?? ""
                if let event = try? JSONSerialization.jsonObject(with: Data(payload.utf8)) {
                    problems += spec.violations(event, data, at: "event data").map { "\(what): \($0)" }
                } else {
                    problems.append("\(what): no JSON event data in \(result.text.prefix(200))")
                }
                if let name = media["x-sse-event"] as? String, !result.text.hasPrefix("event: \(name)\n") {
                    problems.append("\(what): the first event is not `event: \(name)`: \(result.text.prefix(100))")
                }
            }
        }
        return Outcome(result: result, json: json, problems: problems)
    }
}

extension Integration {
    /// docs/openapi/validator.json and router.json against the code and the real servers: a client written from the specs
    /// alone must work, so every documented route must exist and answer as documented, and every route must be documented.
    @Suite("OpenAPI specs match the servers", .serialized)
    struct OpenAPISpecTests {
        // Catches: a spec that is not valid JSON, not OpenAPI 3.1, with a duplicate or missing operationId (code generators
        // need unique ones), a dangling $ref, a path parameter without a declaration or an example, or an operation
        // without responses.
        @Test("both specs are OpenAPI 3.1.0 JSON with unique operationIds, resolvable $refs and declared path parameters")
        func wellFormed() throws {
            for name in ["validator.json", "router.json"] {
                let spec = try OpenAPIDocument(name)
                #expect(spec.root["openapi"] as? String == "3.1.0", "\(name)")
                #expect((spec.root["info"] as? [String: Any])?["title"] is String, "\(name)")
                let operations = spec.operations
                #expect(operations.count >= 19, "\(name) has \(operations.count) operations")
                let ids = operations.map(\.id)
                #expect(!ids.contains(""), "\(name): an operation has no operationId")
                #expect(Set(ids).count == ids.count, "\(name): duplicate operationIds \(Dictionary(grouping: ids, by: { $0 }).filter { $1.count > 1 }.keys.sorted())")
                for (at, reference) in spec.references() {
                    #expect(spec.pointer(reference) != nil, "\(name): \(at) refers to \(reference), which does not exist")
                }
                for operation in operations {
                    #expect(!operation.responses.isEmpty, "\(name): \(operation) has no responses")
                    let declared = operation.parameters.filter { $0["in"] as? String == "path" }
                    let inPath = operation.path.split(separator: "/").filter { $0.hasPrefix("{") }.map { String($0.dropFirst().dropLast()) }
                    #expect(Set(declared.compactMap { $0["name"] as? String }) == Set(inPath), "\(name): \(operation) path parameters")
                    for parameter in operation.parameters {
                        let label = "\(name): \(operation) parameter \(parameter["name"] ?? "?")"
                        if parameter["required"] as? Bool == true { #expect(parameter["example"] != nil, "\(label) has no example") }
                        if let example = parameter["example"] {
                            #expect(spec.violations(example, parameter["schema"] ?? [:]).isEmpty, "\(label): the example breaks the schema")
                        }
                    }
                    for (status, response) in operation.responses {
                        #expect(status == "default" || Int(status).map { (100...599).contains($0) } == true, "\(name): \(operation) status \(status)")
                        #expect((spec.resolved(response) as? [String: Any])?["description"] is String, "\(name): \(operation) \(status) has no description")
                    }
                }
            }
        }

        // Catches: a route added to (or a method changed in) Gateway.swift or SettlementDataRoutes.swift without the
        // router spec, and a documented route the gateway no longer registers.
        @Test("every route the router's gateway registers is in router.json, and nothing else")
        func routerRoutesAreDocumented() throws {
            let spec = try OpenAPIDocument("router.json")
            let database = try RouterDatabase(path: Harness.temporaryDirectory("openapi-routes") + "/router.sqlite")
            let logger = Logger(label: "test.openapi")
            let pool = NodePool(seed: 1, logger: logger)
            let key = SigningKey()
            let gateway = Gateway(pool: pool, forwarder: Forwarder(pool: pool, policy: FailoverPolicy(), logger: logger),
                                  keys: APIKeyCache(store: APIKeyStore(database: database)), receipts: ReceiptStore(database: database),
                                  routerKey: key.publicKey,
                                  settlementData: SettlementDataRoutes(store: SettlementStore(database: database), router: key.publicKey, logger: logger),
                                  metricsText: { [] }, logger: logger)
            let inCode = Set(gateway.makeRouter().routes.map { OpenAPIDocument.routeShape($0.method.rawValue, $0.path.description) })
            let inSpec = Set(spec.operations.map { OpenAPIDocument.routeShape($0.method, $0.path) })
            #expect(inCode.subtracting(inSpec).isEmpty, "routes the router serves that router.json lacks: \(inCode.subtracting(inSpec).sorted())")
            #expect(inSpec.subtracting(inCode).isEmpty, "routes router.json documents that the router lacks: \(inSpec.subtracting(inCode).sorted())")
        }

        @Test("validator.json: every route exists on a live validator, every answer has a listed status and the documented shape, and every route is documented")
        func validatorConforms() async throws {
            let chain = try InProcessChain(validators: 1, running: 1)
            do { try await validator(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        func validator(_ chain: InProcessChain) async throws {
            let spec = try OpenAPIDocument("validator.json")
            // Catches: a route added to ChainAPI.swift without the spec (the live checks below catch the reverse).
            let inCode = Set(ChainAPI(node: chain.nodes[0]).makeRouter().routes.map { OpenAPIDocument.routeShape($0.method.rawValue, $0.path.description) })
            let inSpec = Set(spec.operations.map { OpenAPIDocument.routeShape($0.method, $0.path) })
            #expect(inCode.subtracting(inSpec).isEmpty, "routes the validator serves that validator.json lacks: \(inCode.subtracting(inSpec).sorted())")
            #expect(inSpec.subtracting(inCode).isEmpty, "routes validator.json documents that the validator lacks: \(inSpec.subtracting(inCode).sorted())")

            let base = chain.url()
            try await Harness.eventually(timeout: .seconds(20), "the validator commits") {
                (try await Harness.request(.GET, base + "/status", timeout: .seconds(1)).json?["height"] as? Int ?? 0) >= 2
            }
            // State for every list to have entries: a transfer, a router and a priced compute node with their stakes, an
            // escrow, and a settlement of that router that becomes final (so the node has earnings).
            let client = ChainClient(baseURL: base)
            let funded = try chain.funded
            let payer = Account(owner: funded.publicKey)
            let transferTx = transfer(funded, to: Account(owner: SigningKey().publicKey), amount: Amount(emc: 3), chainID: "emc-test", memo: "spec")
            #expect(try await client.waitForCommit(hash: try await client.submit(transferTx))["status"] as? String == "committed")
            let router = SigningKey(), node = SigningKey()
            let enrollment = NodeEnrollment(client: client, owner: funded)
            let routerStake = LedgerParameters.standard.staking.router, computeStake = LedgerParameters.standard.staking.compute
            try await enrollment.enroll(node: router, role: .router, stake: routerStake.minimumStake, lockDays: routerStake.minimumLockDays,
                                        endpoints: ["127.0.0.1:9"])
            try await enrollment.enroll(node: node, role: .compute, stake: computeStake.minimumStake, lockDays: computeStake.minimumLockDays,
                                        endpoints: [])
            try await enrollment.ensurePrices(node: node.publicKey, prices: PriceList(entries: [
                PriceEntry(name: "*", perMillionPromptTokens: Amount(baseUnits: 1_000_000), perMillionCompletionTokens: Amount(baseUnits: 100_000_000)),
            ]))
            _ = try await enrollment.ensureEscrow(router: router.publicKey, amount: Amount(emc: 10))
            try await settleOnce(client: client, router: router, node: node, payer: payer)
            try await Harness.eventually(timeout: .seconds(60), "the settlement becomes final") {
                try await client.settlements(router: router.publicKey).first?["status"] as? String == "final"
            }
            try await noticeOnce(client: client, router: router, node: node, payer: payer)

            let fresh = transfer(funded, to: Account(owner: SigningKey().publicKey), amount: Amount(emc: 1), chainID: "emc-test", memo: "post")
            var conformance = SpecConformance(spec: spec, baseURL: base)
            conformance.values = ["hash": transferTx.id.hex, "account": payer.description, "router": router.publicKey.hex,
                                  "key": node.publicKey.hex, "node": node.publicKey.hex, "height": "2"]
            conformance.bodies = ["submitTransaction": ("text/plain", Array(Hex.encode(fresh.encoded).utf8))]
            var answers: [String: Any] = [:]
            for operation in spec.operations {
                let outcome = try await conformance.check(operation)
                for problem in outcome.problems { Issue.record(Comment(rawValue: problem)) }
                answers[operation.id] = outcome.json
                // Each example is chosen to succeed: a 4xx here means the example or the route's parameters drifted.
                #expect((200..<300).contains(outcome.result.status), "\(operation) answered \(outcome.result.status): \(outcome.result.text.prefix(300))")
            }
            // The lists whose items the schemas describe were not empty, so the item schemas (required fields, types) were
            // checked against real entries, not just the envelopes.
            func list(_ id: String, _ key: String) -> [Any] { ((answers[id] as? [String: Any])?[key] as? [Any]) ?? [] }
            for (id, key) in [("listBlocks", "blocks"), ("listNodes", "nodes"), ("listStakes", "stakes"), ("getAccount", "stakes"),
                              ("listAccountEscrows", "escrows"), ("listRouterEscrows", "escrows"), ("listSettlements", "settlements"),
                              ("getEarnings", "earnings"), ("listValidators", "validators"), ("listNotices", "notices")] {
                #expect(!list(id, key).isEmpty, "\(id): '\(key)' is empty, so its item schema was not exercised")
            }
            #expect((answers["getTransaction"] as? [String: Any])?["transaction"] != nil, "GET /txs/{hash} has no decoded transaction")
            #expect((answers["getBlock"] as? [String: Any])?["certificate"] != nil, "GET /blocks/{height} has no certificate")
            let nodes = list("listNodes", "nodes").compactMap { $0 as? [String: Any] }
            #expect(nodes.contains { !(($0["prices"] as? [Any]) ?? []).isEmpty }, "no node with prices in GET /nodes")

            // Errors: each documented error status is one the route really answers, in the documented shape.
            var broken = conformance
            broken.values = ["hash": "xyz", "account": "not-an-account", "router": "00", "key": "00", "height": "abc", "limit": "0"]
            broken.bodies = ["submitTransaction": ("text/plain", Array("hello".utf8))]
            for operation in spec.operations where !operation.parameters.isEmpty || operation.object["requestBody"] != nil {
                let outcome = try await broken.check(operation)
                for problem in outcome.problems { Issue.record(Comment(rawValue: problem)) }
                #expect((400..<500).contains(outcome.result.status), "\(operation) with bad parameters answered \(outcome.result.status)")
            }
        }

        /// One settlement of `router` on chain: receipts of `node` for `payer` in a router store, closed and sent by the
        /// router's settlement submitter.
        func settleOnce(client: ChainClient, router: SigningKey, node: SigningKey, payer: Account) async throws {
            let prices = UnitPrices(perMillionPromptTokens: 1_000_000, perMillionCompletionTokens: 100_000_000, perItem: 0)
            let database = try RouterDatabase(path: Harness.temporaryDirectory("openapi-settle") + "/router.sqlite")
            let inFlight = InFlightSequences()
            let receipts = ReceiptStore(database: database, holds: inFlight)
            for i in 0..<3 {
                let sequence = try await receipts.accept(keyHash: Hash32.of([1]), payer: payer)
                try await receipts.recordAssignment(Assignment(sequence: sequence, attempt: 0, nodeID: node.nodeID, app: "llm", model: "m",
                                                               requestHash: Hash32.of([2]), requestBytes: 100, payer: payer, prices: prices))
                let body = ReceiptBody(payer: payer, router: router.publicKey, node: node.publicKey, sequence: sequence, attempt: 0,
                                       app: "llm", model: "m", prices: prices, units: WorkUnits(promptTokens: 5, completionTokens: UInt64(10 + i)),
                                       startedAtMillis: 1, endedAtMillis: 2, requestHash: Hash32.of([2]), responseHash: Hash32.of([3]), status: 200)
                var receipt = Receipt(signing: body, with: node)
                try receipt.countersign(nodeKey: node.publicKey, routerKey: router)
                #expect(try await receipts.append(receipt) == .stored)
                inFlight.release(sequence)
            }
            let settlements = SettlementStore(database: database)
            let submitter = SettlementSubmitter(client: client, routerKey: router, store: settlements, inFlight: inFlight,
                                                logger: Logger(label: "test.openapi.settle"))
            var view = SettlementSubmitter.ChainView()
            await submitter.tick(&view)
            #expect(try await settlements.batch(0)?.status == .included)
        }

        /// One receipt of `node` noticed on chain (kind 14) past the router's settled range, so GET /notices lists one.
        func noticeOnce(client: ChainClient, router: SigningKey, node: SigningKey, payer: Account) async throws {
            let prices = UnitPrices(perMillionPromptTokens: 1_000_000, perMillionCompletionTokens: 100_000_000, perItem: 0)
            let cursor = try await client.settlementCursor(router: router.publicKey)
            let body = ReceiptBody(payer: payer, router: router.publicKey, node: node.publicKey, sequence: cursor.nextSequence + 5, attempt: 0,
                                   app: "llm", model: "m", prices: prices, units: WorkUnits(promptTokens: 5, completionTokens: 10),
                                   startedAtMillis: 1, endedAtMillis: 2, requestHash: Hash32.of([9]), responseHash: Hash32.of([3]), status: 200)
            var receipt = Receipt(signing: body, with: node)
            try receipt.countersign(nodeKey: node.publicKey, routerKey: router)
            let notice = try NodeSettlement(router: router.publicKey, node: node.publicKey, receipts: [try #require(receipt.settlementBytes)])
            let tx = Transaction(signing: TransactionBody(chainID: "emc-test", createdAtMillis: UInt64(Date().timeIntervalSince1970 * 1000),
                                                          kind: .nodeSettle(notice)), with: node)
            #expect(try await client.waitForCommit(hash: try await client.submit(tx))["status"] as? String == "committed")
        }

        @Test("router.json: every route exists on a live router, every answer has a listed status, headers and shape")
        func routerConforms() async throws {
            let network = try await TestNetwork(name: "openapi")
            defer { network.stopAll() }
            do { try await router(network) } catch {
                Issue.record(Comment(rawValue: network.logs))
                throw error
            }
        }

        func router(_ network: TestNetwork) async throws {
            let spec = try OpenAPIDocument("router.json")
            try await network.startRouter()
            // The embeddings server doubles as a REST app, so that the pass-through routes reach a real app.
            try await network.startComputeNode(extraApps: [.init(name: "vectors", kind: .rest, baseURL: network.models.embeddingsURL,
                                                           healthPath: "/health")])
            try await network.waitForNodes(1)
            let base = "http://127.0.0.1:\(network.httpPort)"

            // Request 1 is paid by an account of its own (not the router's, whose use is never settled), so that batch 0 has
            // an entry and its receipts route has leaves to serve: the account binds a key, and funds an escrow with the
            // router, registered on chain for that.
            let payerKey = SigningKey()
            let payer = Account(owner: payerKey.publicKey)
            let secret = APIKeyBinding.newSecret()
            let paid = SignedAPIKeyBinding(signing: APIKeyBinding(router: network.routerKey.publicKey, account: payer,
                                                                  keyHash: APIKeyBinding.hash(ofSecret: secret),
                                                                  spendLimitPerEpoch: APIKeyBinding.unlimited, createdAtMillis: wallClockMillis()),
                                           with: payerKey)
            let bound = try await Harness.request(.POST, base + "/v1/keys", body: Harness.json(["binding": Hex.encode(paid.bytes),
                                                                                                 "signature": Hex.encode(paid.signature)]))
            #expect(bound.status == 201, "\(bound.text)")
            try await RegistryChain.shared.enrollRouter(network.routerKey, tunnelAddress: "127.0.0.1:\(network.tunnelPort)")
            try await RegistryChain.shared.fundEscrow(payerKey, router: network.routerKey.publicKey, amount: Amount(emc: 1))
            try await Harness.eventually(timeout: .seconds(60), "a request paid from the payer's escrow") {
                // 402 until the router has read the escrow from the chain; refused requests get no sequence number.
                try await Harness.request(.POST, base + "/v1/embeddings", key: secret,
                                          body: Harness.json(["model": "all-minilm-l6-v2", "input": ["paid"]])).status == 200
            }

            // A real binding for POST /v1/keys: a fresh account's owner signs a fresh key's hash for this router.
            let owner = SigningKey()
            let binding = APIKeyBinding(router: network.routerKey.publicKey, account: Account(owner: owner.publicKey),
                                        keyHash: APIKeyBinding.hash(ofSecret: APIKeyBinding.newSecret()),
                                        spendLimitPerEpoch: Amount(emc: 5).baseUnits, createdAtMillis: wallClockMillis())
            let signed = SignedAPIKeyBinding(signing: binding, with: owner)
            var conformance = SpecConformance(spec: spec, baseURL: base)
            conformance.apiKey = network.apiKey
            conformance.values = ["app": "vectors", "path": "health", "batch": "0"]
            conformance.bodies = ["bindAPIKey": ("application/json", Harness.json(["binding": Hex.encode(signed.bytes),
                                                                                    "signature": Hex.encode(signed.signature), "label": "spec"]))]
            // The examples reach the success paths where one exists without settlement data.
            let expected = ["getHealth": 200, "getMetrics": 200, "getRouter": 200, "listModels": 200, "listNetworkNodes": 200,
                            "createChatCompletion": 200, "createCompletion": 200, "createEmbeddings": 200, "getApp": 200, "bindAPIKey": 201]
            for operation in spec.operations {
                var outcome = try await conformance.check(operation)
                // Seen once: 404 for a model served a moment before (its app briefly unhealthy, presumably a health probe
                // that timed out while the model server was busy): try again. Every answer is checked against the spec.
                for _ in 0..<3 where expected[operation.id].map({ $0 != outcome.result.status }) == true {
                    for problem in outcome.problems { Issue.record(Comment(rawValue: problem)) }
                    try await Task.sleep(for: .seconds(2))
                    outcome = try await conformance.check(operation)
                }
                for problem in outcome.problems { Issue.record(Comment(rawValue: problem)) }
                if let status = expected[operation.id] {
                    #expect(outcome.result.status == status, "\(operation) answered \(outcome.result.status): \(outcome.result.text.prefix(300))")
                }
            }

            // The requests above were accepted, so the router closes batch 0 behind them: its answer has the documented
            // shape too. Catches: a settlement data field renamed without the spec.
            let batchOperation = try #require(spec.operations.first { $0.id == "getSettlementBatch" })
            try await Harness.eventually(timeout: .seconds(60), "the router closes batch 0") {
                try await Harness.request(.GET, base + "/v1/settlements/0", timeout: .seconds(5)).status == 200
            }
            let batch = try await conformance.check(batchOperation)
            for problem in batch.problems { Issue.record(Comment(rawValue: problem)) }
            #expect(batch.result.status == 200)
            let entries = ((batch.json as? [String: Any])?["entries"] as? [[String: Any]]) ?? []
            let entry = try #require(entries.first { $0["payer"] as? String == payer.description }, "batch 0 has no entry of the payer: \(batch.result.text)")
            // One pair's receipts with their proofs, in the documented shape.
            let receiptsOperation = try #require(spec.operations.first { $0.id == "listSettlementReceipts" })
            var pair = conformance
            pair.values["payer"] = payer.description
            pair.values["node"] = entry["node"] as? String
            let receipts = try await pair.check(receiptsOperation)
            for problem in receipts.problems { Issue.record(Comment(rawValue: problem)) }
            #expect(receipts.result.status == 200, "\(receipts.result.text.prefix(300))")
            let leaves = ((receipts.json as? [String: Any])?["receipts"] as? [Any]) ?? []
            #expect(!leaves.isEmpty, "\(receipts.result.text.prefix(300))")

            // Without a key, the routes that need one answer 401 invalid_api_key as documented.
            var anonymous = conformance
            anonymous.apiKey = nil
            for operation in spec.operations where operation.needsAPIKey {
                let outcome = try await anonymous.check(operation)
                for problem in outcome.problems { Issue.record(Comment(rawValue: problem)) }
                #expect(outcome.result.status == 401, "\(operation) without a key answered \(outcome.result.status)")
            }
            // Malformed parameters: the documented 4xx with a documented code.
            var broken = conformance
            broken.values = ["batch": "x", "app": "no-such-app", "path": "x", "payer": "not-an-account"]
            broken.bodies = ["createChatCompletion": ("application/json", Harness.json(["messages": []])),
                             "bindAPIKey": ("application/json", Array("[]".utf8))]
            for id in ["getSettlementBatch", "listSettlementReceipts", "getApp", "createChatCompletion", "bindAPIKey"] {
                let operation = try #require(spec.operations.first { $0.id == id })
                let outcome = try await broken.check(operation)
                for problem in outcome.problems { Issue.record(Comment(rawValue: problem)) }
                #expect((400..<500).contains(outcome.result.status), "\(operation) with bad input answered \(outcome.result.status)")
            }
        }
    }
}
