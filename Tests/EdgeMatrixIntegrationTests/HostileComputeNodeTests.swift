import EdgeMatrixCompute
import EdgeMatrixCore
import EdgeMatrixNetwork
import EdgeMatrixStore
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Synchronization
import Testing

/// Any bytes at all, as one gRPC message: lets a hostile node put on the wire what no honest encoder would.
struct RawFrame: Sendable {
    var bytes: [UInt8]
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    init(_ message: some ProtobufWireMessage) { bytes = (try? message.protobufBytes()) ?? [] }
}

struct RawSerializer: MessageSerializer {
    func serialize<Bytes: GRPCContiguousBytes>(_ message: RawFrame) throws -> Bytes { Bytes(message.bytes) }
}

/// A compute node under the test's full control. It speaks the real tunnel protocol (TLS pinned to the router
/// key, key proof, registration, Work streams), then sends whatever the test tells it to.
final class HostileSession: Sendable {
    struct State {
        var token: [UInt8]?
        var rejected: String?
        var acks: [Hash32] = []
        /// Set when the router ended the control stream.
        var closed: String?
    }

    struct WorkOutcome: Sendable {
        var request: WorkRequest?
        var acks: [Hash32] = []
        var cancelled = false
        var error: String?
    }

    let key: SigningKey
    let routerKey: PublicKey
    let client: GRPCClient<HTTP2ClientTransport.Posix>
    let control: AsyncStream<RawFrame>.Continuation
    let state = Mutex(State())

    init(key: SigningKey, routerKey: PublicKey, client: GRPCClient<HTTP2ClientTransport.Posix>,
         control: AsyncStream<RawFrame>.Continuation) {
        self.key = key
        self.routerKey = routerKey
        self.client = client
        self.control = control
    }

    var snapshot: State { state.withLock { $0 } }

    func sendControl(_ frame: RawFrame) { control.yield(frame) }

    /// Polls the session state until `condition` holds or the timeout passes.
    func wait(timeout: Duration = .seconds(15), until condition: (State) -> Bool) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if condition(snapshot) { return true }
            try? await Task.sleep(for: .milliseconds(25))
        }
        return condition(snapshot)
    }

    /// Opens one Work stream, waits for an assignment, sends `frames(request)`, and reads until the router ends it.
    func serve(options: CallOptions = .defaults, _ frames: @escaping @Sendable (WorkRequest) -> [RawFrame]) async -> WorkOutcome {
        let outcome = Mutex(WorkOutcome())
        guard let token = snapshot.token else { return WorkOutcome(error: "not registered") }
        let (outbound, sink) = AsyncStream<RawFrame>.makeStream()
        sink.yield(RawFrame(NodeWorkMessage.ready(sessionToken: token)))
        do {
            try await client.bidirectionalStreaming(
                request: StreamingClientRequest<RawFrame> { writer in for await frame in outbound { try await writer.write(frame) } },
                descriptor: TunnelService.work, serializer: RawSerializer(), deserializer: ProtobufWireDeserializer<RouterWorkMessage>(),
                options: options
            ) { response in
                for try await message in response.messages {
                    switch message {
                    case .assign(let request):
                        outcome.withLock { $0.request = request }
                        for frame in frames(request) { sink.yield(frame) }
                    case .receiptAck(let id, _):
                        outcome.withLock { $0.acks.append(id) }
                        sink.finish()
                    case .cancel:
                        outcome.withLock { $0.cancelled = true }
                        sink.finish()
                    }
                }
            }
        } catch {
            outcome.withLock { $0.error = "\(error)" }
        }
        sink.finish()
        return outcome.withLock { $0 }
    }

    /// A receipt as an honest node would sign it for `request`, answered with `answer`, with `edit` applied.
    func receipt(for request: WorkRequest, answer: [UInt8], edit: (inout ReceiptBody) -> Void = { _ in }) -> Receipt {
        let now = UInt64(Date().timeIntervalSince1970 * 1000)
        var body = ReceiptBody(payer: request.payer, router: routerKey, node: key.publicKey, sequence: request.sequence,
                               attempt: request.attempt, app: request.app, model: request.model, prices: request.prices,
                               units: WorkUnits(promptTokens: 3, completionTokens: 5), startedAtMillis: now - 5, endedAtMillis: now,
                               requestHash: ReceiptBody.requestHash(method: request.method, path: request.path, contentType: request.contentType,
                                                                    stream: request.stream, body: request.body),
                               responseHash: Hash32.of(answer), status: 200)
        edit(&body)
        return Receipt(signing: body, with: key)
    }

    /// An honest answer to `request` (head, one chunk, end with a receipt), with the receipt body edited.
    func answer(_ request: WorkRequest, editReceipt: (inout ReceiptBody) -> Void = { _ in }) -> [RawFrame] {
        let answer = Array(#"{"object":"chat.completion","choices":[]}"#.utf8)
        let receipt = receipt(for: request, answer: answer, edit: editReceipt)
        return [RawFrame(NodeWorkMessage.head(status: 200, contentType: "application/json")), RawFrame(NodeWorkMessage.chunk(answer)),
                RawFrame(NodeWorkMessage.end(receiptBody: receipt.bodyBytes, nodeSignature: receipt.nodeSignature))]
    }
}

enum HostileNode {
    /// Registers a fresh node key serving `model` and runs `body` while its control stream stays open.
    /// `heartbeat`: send a status every 2 s as an honest node does (without it the router drops the node as silent).
    static func session<T: Sendable>(network: TestNetwork, model: String, maxConcurrent: UInt32 = 2, heartbeat: Bool = true,
                                     _ body: @escaping @Sendable (HostileSession) async throws -> T) async throws -> T {
        let key = SigningKey()
        try await network.enroll(key)  // registered on chain: hostile, but admitted, so every check past admission is exercised
        let routerKey = network.routerKey.publicKey
        let transport = try HTTP2ClientTransport.Posix(target: .ipv4(address: "127.0.0.1", port: network.tunnelPort),
                                                       transportSecurity: NodeTLS.clientSecurity(pinnedServer: routerKey))
        return try await withGRPCClient(transport: transport) { client in
            let (outbound, control) = AsyncStream<RawFrame>.makeStream()
            let session = HostileSession(key: key, routerKey: routerKey, client: client, control: control)
            let nodeNonce = TunnelHandshake.randomNonce()
            let descriptor = NodeDescriptor(apps: [AppDescriptor(name: "hostile", kind: .openai, models: [model])],
                                            maxConcurrent: maxConcurrent,
                                            hardware: HardwareInfo(cpuCores: 1, memoryMiB: 1, gpus: []), version: "hostile").canonicalBytes
            control.yield(RawFrame(NodeControlMessage.hello(nodeNonce: nodeNonce)))
            let controlTask = Task {
                do {
                    try await client.bidirectionalStreaming(
                        request: StreamingClientRequest<RawFrame> { writer in for await frame in outbound { try await writer.write(frame) } },
                        descriptor: TunnelService.control, serializer: RawSerializer(),
                        deserializer: ProtobufWireDeserializer<RouterControlMessage>(), options: .defaults
                    ) { response in
                        for try await message in response.messages {
                            switch message {
                            case .challenge(let presented, let routerNonce, _):
                                let payload = TunnelHandshake.registrationPayload(routerNonce: routerNonce, nodeNonce: nodeNonce,
                                                                                  routerID: presented.nodeID, descriptorBytes: descriptor)
                                control.yield(RawFrame(NodeControlMessage.register(
                                    nodeKey: key.publicKey, descriptorBytes: descriptor, signature: key.sign(payload, domain: .tunnelRegistration))))
                            case .accepted(let token): session.state.withLock { $0.token = token }
                            case .rejected(let code, _): session.state.withLock { $0.rejected = code }
                            case .receiptAck(let id, _): session.state.withLock { $0.acks.append(id) }
                            }
                        }
                    }
                    session.state.withLock { $0.closed = "ended" }
                } catch {
                    session.state.withLock { $0.closed = "\(error)" }
                }
            }
            let heartbeatTask = Task {
                while heartbeat, !Task.isCancelled {
                    try? await Task.sleep(for: .seconds(2))
                    control.yield(RawFrame(NodeControlMessage.status(inFlight: 0, healthyApps: ["hostile"])))
                }
            }
            defer {
                heartbeatTask.cancel()
                control.finish()
                controlTask.cancel()
            }
            guard await session.wait(until: { $0.token != nil || $0.closed != nil }), session.snapshot.token != nil else {
                throw HarnessError.processFailed("hostile node did not register: \(session.snapshot)")
            }
            return try await body(session)
        }
    }
}

extension TestNetwork {
    /// Posts a chat request for `model` once a hostile node has an idle Work stream for it.
    func chat(model: String) async throws -> Harness.HTTPResult {
        try await Harness.request(.POST, baseURL + "/chat/completions", key: apiKey, body: Harness.json([
            "model": model, "messages": [["role": "user", "content": "hi"]],
        ]), timeout: .seconds(60))
    }

    func waitForIdleSlot(model: String) async throws {
        try await Harness.eventually(timeout: .seconds(10), "an idle Work stream for \(model)") {
            try await connectedNodes().contains { node in
                let apps = node["apps"] as? [[String: Any]] ?? []
                return apps.contains { ($0["models"] as? [String])?.contains(model) == true } && (node["idle_slots"] as? Int ?? 0) > 0
            }
        }
    }

    /// The value of an unlabelled counter on the router's /metrics (0 when it was never incremented).
    func routerCounter(_ name: String) async throws -> Double {
        let metrics = try await Harness.request(.GET, "http://127.0.0.1:\(httpPort)/metrics", timeout: .seconds(5)).text
        let line = metrics.split(separator: "\n").first { $0.hasPrefix(name + " ") }
        return line.flatMap { Double($0.split(separator: " ").last ?? "") } ?? 0
    }

    func misbehaviourCounts() async throws -> [String: Double] {
        let metrics = try await Harness.request(.GET, "http://127.0.0.1:\(httpPort)/metrics", timeout: .seconds(5)).text
        var counts = [String: Double]()
        for line in metrics.split(separator: "\n") where line.hasPrefix("emc_router_node_misbehaviour_total{") {
            guard let kindStart = line.range(of: "kind=\"")?.upperBound, let kindEnd = line[kindStart...].firstIndex(of: "\""),
                  let value = Double(line.split(separator: " ").last ?? "") else { continue }
            counts[String(line[kindStart..<kindEnd])] = value
        }
        return counts
    }
}

extension Integration {
@Suite("Hostile compute node", .serialized)
struct HostileComputeNodeTests {
    /// One hostile behaviour: what the node sends on its Work stream once it is assigned a request, what the
    /// client must get, and the misbehaviour kind the router must count (nil: the stream just fails).
    struct WorkCase: Sendable, CustomStringConvertible {
        var name: String
        var clientStatus: Int
        var clientCode: String?
        var kind: String?
        var frames: @Sendable (HostileSession, WorkRequest) -> [RawFrame]
        var description: String { name }
    }

    static let seed: UInt64 = 0xE06E_7A11

    static func workCases() -> [WorkCase] {
        let head: @Sendable (UInt16) -> RawFrame = { status in RawFrame(NodeWorkMessage.head(status: status, contentType: "application/json")) }
        var random = SeededRandom(seed: seed)
        let garbage = (0..<8).map { _ in random.bytes(Int(random.next() % 64) + 1) }
        var cases: [WorkCase] = []
        // Bug caught: HTTPResponse.Status(code:) traps on anything outside 0...999: the router process died.
        for status: UInt16 in [1000, 65535, 99, 0, 600, 101] {
            cases.append(WorkCase(name: "status \(status)", clientStatus: 502, clientCode: "upstream_failed", kind: "bad_status") { _, _ in
                [head(status)]
            })
        }
        cases.append(WorkCase(name: "header injection in content type", clientStatus: 502, clientCode: "upstream_failed",
                              kind: "bad_head") { _, _ in
            [RawFrame(NodeWorkMessage.head(status: 200, contentType: "text/plain\r\nset-cookie: stolen=1"))]
        })
        cases.append(WorkCase(name: "64 KiB content type", clientStatus: 502, clientCode: "upstream_failed", kind: "bad_head") { _, _ in
            [RawFrame(NodeWorkMessage.head(status: 200, contentType: String(repeating: "a", count: 64 << 10)))]
        })
        cases.append(WorkCase(name: "chunk before head", clientStatus: 502, clientCode: "upstream_failed", kind: "out_of_order") { _, _ in
            [RawFrame(NodeWorkMessage.chunk(Array("x".utf8)))]
        })
        cases.append(WorkCase(name: "ready twice", clientStatus: 502, clientCode: "upstream_failed", kind: "out_of_order") { session, _ in
            [RawFrame(NodeWorkMessage.ready(sessionToken: session.snapshot.token ?? []))]
        })
        cases.append(WorkCase(name: "a message over the 4 MiB limit", clientStatus: 502, clientCode: "upstream_failed", kind: "undecodable_frame") { _, _ in
            [RawFrame(NodeWorkMessage.head(status: 200, contentType: String(repeating: "b", count: 5 << 20)))]
        })
        for (index, bytes) in garbage.enumerated() {
            // Bug caught: bytes that did not decode just ended the stream; the node was neither counted nor dropped.
            cases.append(WorkCase(name: "garbage frame \(index)", clientStatus: 502, clientCode: "upstream_failed", kind: "malformed_message") { _, _ in
                [RawFrame(bytes)]
            })
        }
        // Receipts: the answer reaches the client (it was relayed before the receipt), the receipt is refused.
        // Bug caught: Int64(UInt64) in the receipt store trapped, and the node re-sent it after every restart.
        let receiptCases: [(String, String, @Sendable (inout ReceiptBody) -> Void)] = [
            ("prompt tokens above Int64.max", "receipt_out_of_range", { $0.units.promptTokens = .max }),
            ("completion tokens above Int64.max", "receipt_out_of_range", { $0.units.completionTokens = UInt64(Int64.max) + 1 }),
            ("items above Int64.max", "receipt_out_of_range", { $0.units.items = .max }),
            ("start time above Int64.max", "receipt_out_of_range", { $0.startedAtMillis = .max; $0.endedAtMillis = .max }),
            ("end before start", "receipt_out_of_range", { $0.endedAtMillis = $0.startedAtMillis - 1 }),
            ("receipt status 1000", "receipt_out_of_range", { $0.status = 1000 }),
            ("1 MiB model name", "malformed_receipt", { $0.model = String(repeating: "r", count: 1 << 20) }),
            ("sequence above Int64.max", "receipt_out_of_range", { $0.sequence = .max }),
            ("receipt for another request", "foreign_receipt", { $0.sequence += 1 }),
            ("receipt for another attempt", "foreign_receipt", { $0.attempt += 1 }),
            // Bug caught: the router countersigned receipts billing another account, or at other prices, than assigned.
            ("receipt billing another account", "payer_mismatch", { $0.payer = Account(owner: SigningKey().publicKey) }),
            ("receipt at higher prices", "prices_mismatch", { $0.prices.perMillionCompletionTokens += 1_000_000 }),
            ("receipt for another model", "assignment_mismatch", { $0.model = "cheaper-model" }),
            ("receipt over other request bytes", "request_hash_mismatch", { $0.requestHash = Hash32.of([1, 2, 3]) }),
            ("receipt over other response bytes", "receipt_mismatch", { $0.responseHash = Hash32.of([4, 5, 6]) }),
            ("5000 completion tokens for a 42-byte answer", "units_above_relayed_bound", { $0.units.completionTokens = 5_000 }),
            ("a million prompt tokens for a short request", "units_above_relayed_bound", { $0.units.promptTokens = 1_000_000 }),
            ("receipt naming another node", "bad_receipt_signature", { $0.node = SigningKey().publicKey }),
            ("receipt for another router", "bad_receipt_signature", { $0.router = SigningKey().publicKey }),
        ]
        for (name, kind, edit) in receiptCases {
            cases.append(WorkCase(name: name, clientStatus: 200, clientCode: nil, kind: kind) { session, request in
                session.answer(request, editReceipt: edit)
            })
        }
        cases.append(WorkCase(name: "receipt with a broken signature", clientStatus: 200, clientCode: nil, kind: "bad_receipt_signature") { session, request in
            var frames = session.answer(request)
            let receipt = session.receipt(for: request, answer: Array(#"{"object":"chat.completion","choices":[]}"#.utf8))
            frames[2] = RawFrame(NodeWorkMessage.end(receiptBody: receipt.bodyBytes, nodeSignature: [UInt8](repeating: 0, count: 64)))
            return frames
        })
        cases.append(WorkCase(name: "garbage receipt body", clientStatus: 200, clientCode: nil, kind: "malformed_receipt") { _, _ in
            [head(200), RawFrame(NodeWorkMessage.chunk([1])), RawFrame(NodeWorkMessage.end(receiptBody: garbage[0], nodeSignature: []))]
        })
        return cases
    }

    @Test("a hostile compute node cannot crash the router, is disconnected for each violation, and honest nodes keep serving")
    func hostileWorkStreams() async throws {
        let network = try await TestNetwork(name: "hostile")
        defer { network.stopAll() }
        try await network.startRouter()
        try await network.startComputeNode(maxConcurrent: 2)
        try await network.waitForNodes(1)
        let router = try #require(network.router)

        let cases = Self.workCases()
        for (index, hostileCase) in cases.enumerated() {
            let model = "hostile-model-\(index)"
            try await HostileNode.session(network: network, model: model) { session in
                async let served = session.serve { request in hostileCase.frames(session, request) }
                try await network.waitForIdleSlot(model: model)
                // A router that crashed drops the client's connection: recorded below as the router dying.
                let answer = (try? await network.chat(model: model)) ?? Harness.HTTPResult(status: 0, headers: [], body: [])
                let outcome = await served
                #expect(answer.status == hostileCase.clientStatus, "\(hostileCase): \(answer.text)")
                if let code = hostileCase.clientCode {
                    #expect((answer.json?["error"] as? [String: Any])?["code"] as? String == code, "\(hostileCase): \(answer.text)")
                }
                #expect(outcome.request != nil, "\(hostileCase): never assigned")
                #expect(outcome.acks.isEmpty, "\(hostileCase): the router acknowledged a receipt it must refuse")
                if hostileCase.kind != nil {
                    // Disconnected: the router ends the node's control stream.
                    #expect(await session.wait { $0.closed != nil }, "\(hostileCase): hostile node still connected")
                }
            }
            #expect(router.isRunning, "router died on \(hostileCase)\n\(network.logs)")
            if !router.isRunning { return }
        }

        let counts = try await network.misbehaviourCounts()
        for kind in Set(cases.compactMap(\.kind)) {
            #expect((counts[kind] ?? 0) >= 1, "misbehaviour \(kind) not counted: \(counts)")
        }
        let stored = try await ReceiptFile(path: network.routerDirectory + "/router.sqlite").receipts()
        #expect(stored.allSatisfy { !$0.body.model.hasPrefix("hostile-model-") }, "a refused receipt was stored")
        try await expectHonestNodeServes(network)
        print("hostile compute node: \(cases.count) work-stream cases tried, router alive: \(router.isRunning)")
    }

    @Test("receipts on the control stream: unassigned, replayed with other counts, and floods are refused; an exact re-delivery is stored once")
    func hostileControlStream() async throws {
        let network = try await TestNetwork(name: "hostile-control")
        defer { network.stopAll() }
        try await network.startRouter()
        try await network.startComputeNode(maxConcurrent: 2)
        try await network.waitForNodes(1)
        let router = try #require(network.router)
        let database = network.routerDirectory + "/router.sqlite"

        // Bug caught: the router countersigned any well-signed receipt, for requests it never assigned.
        try await HostileNode.session(network: network, model: "hostile-unassigned") { session in
            let request = WorkRequest(requestID: "never-assigned", app: "hostile", model: "hostile-unassigned", method: "POST",
                                      path: "/v1/chat/completions", contentType: "application/json", body: [], stream: false,
                                      sequence: 1_000_000, attempt: 0, payer: Account(owner: network.routerKey.publicKey), prices: .free)
            let forged = session.receipt(for: request, answer: [1])
            session.sendControl(RawFrame(NodeControlMessage.receipt(bodyBytes: forged.bodyBytes, nodeSignature: forged.nodeSignature)))
            #expect(await session.wait { $0.closed != nil })
            #expect(session.snapshot.acks.isEmpty)
            #expect(session.snapshot.rejected == "receipt_refused")
        }

        // Bug caught: one request billed twice, by re-signing its receipt with other counts.
        let model = "hostile-replay"
        try await HostileNode.session(network: network, model: model) { session in
            async let served = session.serve { request in session.answer(request) }
            try await network.waitForIdleSlot(model: model)
            let answer = try await network.chat(model: model)
            #expect(answer.status == 200)
            let outcome = await served
            let request = try #require(outcome.request)
            #expect(outcome.acks.count == 1)
            // The same receipt again (as after a lost acknowledgement): acknowledged, still stored once.
            let original = try #require(try await ReceiptFile(path: database).receipts().first { $0.body.sequence == request.sequence })
            session.sendControl(RawFrame(NodeControlMessage.receipt(bodyBytes: original.bodyBytes, nodeSignature: original.nodeSignature)))
            #expect(await session.wait { $0.acks.contains(original.id) })
            // A second, different receipt for the same request: refused, and the node is dropped.
            let inflated = session.receipt(for: request, answer: Array(#"{"object":"chat.completion","choices":[]}"#.utf8)) {
                $0.units.completionTokens = 5_000
            }
            session.sendControl(RawFrame(NodeControlMessage.receipt(bodyBytes: inflated.bodyBytes, nodeSignature: inflated.nodeSignature)))
            #expect(await session.wait { $0.closed != nil })
            #expect(!session.snapshot.acks.contains(inflated.id))
            let stored = try await ReceiptFile(path: database).receipts().filter { $0.body.sequence == request.sequence }
            #expect(stored.count == 1)
            #expect(stored.first?.body.units.completionTokens == 5)
        }

        // Bug caught: a descriptor of megabytes was kept for the whole session, for each of a thousand nodes.
        let oversized = await #expect(throws: HarnessError.self) {
            try await HostileNode.session(network: network, model: String(repeating: "m", count: 100 << 10)) { _ in }
        }
        #expect(String(describing: oversized).contains("bad_descriptor"), "\(String(describing: oversized))")

        // A flood of heartbeats and of seeded garbage frames.
        try await HostileNode.session(network: network, model: "hostile-flood") { session in
            for _ in 0..<500 { session.sendControl(RawFrame(NodeControlMessage.status(inFlight: 0, healthyApps: ["hostile"]))) }
            #expect(await session.wait { $0.closed != nil }, "a heartbeat flood did not get the node disconnected")
        }
        var random = SeededRandom(seed: Self.seed)
        for round in 0..<8 {
            let frame = random.bytes(Int(random.next() % 200) + 1)
            try await HostileNode.session(network: network, model: "hostile-garbage-\(round)") { session in
                session.sendControl(RawFrame(frame))
                #expect(await session.wait { $0.closed != nil }, "garbage control frame \(round) did not end the session")
            }
        }
        // More Work streams than the declared capacity: the extra ones are closed, capacity is not inflated.
        try await HostileNode.session(network: network, model: "hostile-streams", maxConcurrent: 1) { session in
            let streams = (0..<4).map { _ in Task { await session.serve { _ in [] } } }
            try await Task.sleep(for: .seconds(1))
            let node = try await network.connectedNodes().first { node in
                (node["apps"] as? [[String: Any]])?.contains { ($0["models"] as? [String]) == ["hostile-streams"] } == true
            }
            #expect((node?["idle_slots"] as? Int ?? 0) <= 1)
            for stream in streams { stream.cancel() }
        }
        #expect(router.isRunning, "\(network.logs)")
        let counts = try await network.misbehaviourCounts()
        #expect((counts["unassigned_receipt"] ?? 0) >= 1, "\(counts)")
        #expect((counts["replayed_receipt"] ?? 0) >= 1, "\(counts)")
        #expect((counts["flood"] ?? 0) >= 1, "\(counts)")
        try await expectHonestNodeServes(network)
    }

    @Test("a node streaming 32 MiB in 16 KiB chunks is relayed in full through the bounded per-request buffer")
    func floodOfChunks() async throws {
        let network = try await TestNetwork(name: "hostile-chunks")
        defer { network.stopAll() }
        try await network.startRouter()
        let model = "hostile-chunks"
        let chunk = [UInt8](repeating: UInt8(ascii: "a"), count: 16 << 10)
        let count = 2048 // 32 MiB in all
        try await HostileNode.session(network: network, model: model) { session in
            async let served = session.serve { _ in
                [RawFrame(NodeWorkMessage.head(status: 200, contentType: "text/plain"))]
                    + Array(repeating: RawFrame(NodeWorkMessage.chunk(chunk)), count: count)
                    + [RawFrame(NodeWorkMessage.failed(code: "done", message: "no receipt"))]
            }
            try await network.waitForIdleSlot(model: model)
            let answer = try await network.chat(model: model)
            #expect(answer.status == 200)
            #expect(answer.body.count == chunk.count * count)
            _ = await served
        }
        #expect(network.router?.isRunning == true)
    }

    // Bug caught: a connection that opened a control stream and then said nothing held it for ever.
    @Test("a control stream that never registers is closed after the registration timeout")
    func silentNodeClosed() async throws {
        let network = try await TestNetwork(name: "hostile-silent")
        defer { network.stopAll() }
        try await network.startRouter()
        let transport = try HTTP2ClientTransport.Posix(
            target: .ipv4(address: "127.0.0.1", port: network.tunnelPort),
            transportSecurity: NodeTLS.clientSecurity(pinnedServer: network.routerKey.publicKey))
        let started = ContinuousClock.now
        try await withGRPCClient(transport: transport) { client in
            let silence = StreamingClientRequest<RawFrame> { _ in try await Task.sleep(for: .seconds(60)) }
            await #expect(throws: RPCError.self) {
                try await client.bidirectionalStreaming(
                    request: silence, descriptor: TunnelService.control, serializer: RawSerializer(),
                    deserializer: ProtobufWireDeserializer<RouterControlMessage>(), options: .defaults
                ) { response in
                    for try await _ in response.messages {}
                }
            }
        }
        #expect(ContinuousClock.now - started < .seconds(20))
        #expect(network.router?.isRunning == true)
    }

    // Bug caught: a registered node that froze (or whose network died without closing the connection) kept its
    // session for ever, and requests were queued to it.
    @Test("a registered node that falls silent is dropped after the heartbeat timeout, and only then")
    func silentRegisteredNodeDropped() async throws {
        let network = try await TestNetwork(name: "hostile-mute")
        defer { network.stopAll() }
        try await network.startRouter()
        try await HostileNode.session(network: network, model: "mute-model", heartbeat: false) { session in
            let registered = ContinuousClock.now
            // Not before the 15 s timeout: an honest node that misses a heartbeat or two must stay.
            try await Task.sleep(for: .seconds(8))
            #expect(session.snapshot.closed == nil, "dropped after 8 s of silence; the timeout is 15 s")
            #expect(try await network.connectedNodes().count == 1)
            #expect(await session.wait(timeout: .seconds(20)) { $0.closed != nil }, "a silent node is still connected")
            #expect(ContinuousClock.now - registered < .seconds(25))
        }
        #expect(try await network.connectedNodes().isEmpty)
        #expect(try await network.routerCounter("emc_router_nodes_silent_total") >= 1)
        // A node that keeps sending its status stays: same router, same wait.
        try await HostileNode.session(network: network, model: "chatty-model") { session in
            try await Task.sleep(for: .seconds(18))
            #expect(session.snapshot.closed == nil, "a node sending heartbeats was dropped: \(session.snapshot)")
        }
        #expect(network.router?.isRunning == true)
    }

    // Bug caught: anyone past the TLS handshake could open unauthenticated streams without bound (each holds a task
    // until its deadline), and a Work stream that never sent its session token was held for ever.
    @Test("unauthenticated tunnel streams are bounded per address and a Work stream must present its token in time")
    func unauthenticatedStreamsBounded() async throws {
        let network = try await TestNetwork(name: "hostile-pending")
        defer { network.stopAll() }
        try await network.startRouter()
        let transport = try HTTP2ClientTransport.Posix(
            target: .ipv4(address: "127.0.0.1", port: network.tunnelPort),
            transportSecurity: NodeTLS.clientSecurity(pinnedServer: network.routerKey.publicKey),
            config: .defaults { $0.http2.targetWindowSize = 1 << 20 })
        let limit = 64
        try await withGRPCClient(transport: transport) { client in
            // Work streams that never say `ready`: each is an RPC that ends in an error (refused or timed out).
            let started = ContinuousClock.now
            let codes = await withTaskGroup(of: String.self) { group in
                for _ in 0..<(limit + 8) {
                    group.addTask {
                        let silence = StreamingClientRequest<RawFrame> { _ in try await Task.sleep(for: .seconds(60)) }
                        do {
                            try await client.bidirectionalStreaming(
                                request: silence, descriptor: TunnelService.work, serializer: RawSerializer(),
                                deserializer: ProtobufWireDeserializer<RouterWorkMessage>(), options: .defaults
                            ) { response in for try await _ in response.messages {} }
                            return "ok"
                        } catch let error as RPCError {
                            return "\(error.code)"
                        } catch {
                            return "other: \(error)"
                        }
                    }
                }
                return await group.reduce(into: [String]()) { $0.append($1) }
            }
            let refused = codes.filter { $0 == "\(RPCError.Code.resourceExhausted)" }.count
            let timedOut = codes.filter { $0 == "\(RPCError.Code.deadlineExceeded)" }.count
            #expect(refused == 8, "streams beyond \(limit) per address must be refused at once: \(codes)")
            #expect(timedOut == limit, "streams within the limit must be closed at the token deadline: \(codes)")
            #expect(ContinuousClock.now - started < .seconds(30))
        }
        // The places are given back: a real node registers and serves from the same address.
        try await network.startComputeNode()
        try await network.waitForNodes(1)
        try await expectHonestNodeServes(network)
        #expect(try await network.routerCounter("emc_router_tunnel_streams_refused_total") >= 8)
    }

    func expectHonestNodeServes(_ network: TestNetwork) async throws {
        let honest = try await Harness.request(.POST, network.baseURL + "/embeddings", key: network.apiKey,
                                               body: Harness.json(["model": "all-minilm-l6-v2", "input": "still serving"]))
        #expect(honest.status == 200, "\(honest.text)\n\(network.logs)")
    }
}
}
