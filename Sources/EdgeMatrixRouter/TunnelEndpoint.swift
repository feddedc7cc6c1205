import EdgeMatrixCore
import EdgeMatrixNetwork
import EdgeMatrixStore
import GRPCCore
import Logging
import Metrics
import Synchronization

/// Why the router refused a node's receipt. Every refusal is node misbehaviour: an honest node only signs
/// receipts for requests it was assigned, once, on the assignment's terms, over what it really sent.
public enum ReceiptRefusal: Error, Equatable, Sendable, CustomStringConvertible {
    case malformed(String)
    case outOfRange(String)
    case signature(ReceiptError)
    /// An in-band receipt that names another (sequence, attempt) than the one on its Work stream.
    case foreignRequest(String)
    /// Unassigned, already receipted, on other terms than assigned, or disagreeing with what was relayed.
    case refusedByStore(ReceiptAppendOutcome)

    /// The `kind` label of `emc_router_node_misbehaviour_total`.
    public var kind: String {
        switch self {
        case .malformed: "malformed_receipt"
        case .outOfRange: "receipt_out_of_range"
        case .signature: "bad_receipt_signature"
        case .foreignRequest: "foreign_receipt"
        case .refusedByStore(let outcome): outcome.rawValue
        }
    }

    public var description: String {
        switch self {
        case .malformed(let why): "malformed receipt: \(why)"
        case .outOfRange(let why): "receipt field out of range: \(why)"
        case .signature(let error): error.description
        case .foreignRequest(let why): "receipt for another request: \(why)"
        case .refusedByStore(.unassigned): "receipt for a request this router never assigned to the node"
        case .refusedByStore(.alreadyReceipted): "a different receipt for this request and attempt was already countersigned"
        case .refusedByStore(.requestHashMismatch): "receipt's request hash is not the hash of the forwarded request"
        case .refusedByStore(.payerMismatch): "receipt names another payer than the request's API key is bound to"
        case .refusedByStore(.pricesMismatch): "receipt names other unit prices than those in force at the assignment"
        case .refusedByStore(.assignmentMismatch): "receipt names another app or model than assigned"
        case .refusedByStore(.responseMismatch): "receipt's response hash or status differs from the relayed answer"
        case .refusedByStore(.unitsAboveBound): "receipt bills more units than the relayed bytes can carry"
        case .refusedByStore(let outcome): "receipt refused (\(outcome.rawValue))"
        }
    }
}

/// Checks a node's receipt, countersigns it and makes it durable. Returns the id to acknowledge.
public struct ReceiptCollector: Sendable {
    let routerKey: SigningKey
    let store: ReceiptStore

    public init(routerKey: SigningKey, store: ReceiptStore) {
        self.routerKey = routerKey
        self.store = store
    }

    /// Every field the node controls that the store cannot hold or that no honest node signs, checked before
    /// anything is signed or stored.
    static func validate(_ body: ReceiptBody) throws(ReceiptRefusal) {
        for (name, value) in [("prompt_tokens", body.units.promptTokens), ("completion_tokens", body.units.completionTokens),
                              ("items", body.units.items), ("started_at", body.startedAtMillis), ("ended_at", body.endedAtMillis),
                              ("sequence", body.sequence)]
        where Int64(exactly: value) == nil {
            throw .outOfRange("\(name) = \(value) is above \(Int64.max)")
        }
        guard body.startedAtMillis <= body.endedAtMillis else { throw .outOfRange("ended before it started") }
        guard (100...599).contains(body.status) else { throw .outOfRange("status \(body.status)") }
    }

    /// `assigned` and `relayed` are the router's own record of the request and answer when the receipt arrives on
    /// the answer's Work stream; nil for a re-delivery on the control stream, which the store checks against its
    /// durable records of the assignment and of what was relayed.
    public func collect(bodyBytes: [UInt8], nodeSignature: [UInt8], nodeKey: PublicKey,
                        assigned: (sequence: UInt64, attempt: UInt32)?, relayed: RelayedAnswer?) async throws -> CollectedReceipt {
        var receipt: Receipt
        do { receipt = try Receipt(bodyBytes: bodyBytes, nodeSignature: nodeSignature) } catch {
            throw ReceiptRefusal.malformed(error.description)
        }
        try Self.validate(receipt.body)
        if let assigned, receipt.body.sequence != assigned.sequence || receipt.body.attempt != assigned.attempt {
            throw ReceiptRefusal.foreignRequest(
                "names \(receipt.body.sequence).\(receipt.body.attempt), streamed \(assigned.sequence).\(assigned.attempt)")
        }
        do { try receipt.countersign(nodeKey: nodeKey, routerKey: routerKey) } catch { throw ReceiptRefusal.signature(error) }
        switch try await store.append(receipt, relayed: relayed) {
        case .stored:
            Counter(label: "emc_router_receipts_total").increment()
        case .alreadyStored:
            break
        case let refused:
            throw ReceiptRefusal.refusedByStore(refused)
        }
        return CollectedReceipt(id: receipt.id, routerSignature: receipt.routerSignature ?? [])
    }
}

/// A receipt the router stored: its id and the router's countersignature, both sent back to the node.
public struct CollectedReceipt: Sendable {
    public let id: Hash32
    public let routerSignature: [UInt8]
}

/// A message from a compute node that breaks the tunnel protocol; the node is disconnected for it.
struct NodeViolation: Error, CustomStringConvertible {
    var kind: String
    var detail: String
    var description: String { "\(kind): \(detail)" }
}

/// The router's side of the tunnel: compute nodes dial in, prove their keys, and offer Work streams.
public struct TunnelEndpoint: RegistrableRPCService {
    let routerKey: SigningKey
    let pool: NodePool
    let receipts: ReceiptCollector
    let admission: any NodeAdmission
    let prices: any PriceBook
    let logger: Logger
    /// Holds each assigned request's number until its receipt is handled (see `InFlightSequences`).
    let inFlight: InFlightSequences?
    private let slotCounter = SlotCounter()
    /// Streams not yet authenticated, per remote address.
    private let pending: PendingStreams

    /// A node must finish registering within this time of opening its control stream.
    static let registrationTimeout = Duration.seconds(10)
    /// Status heartbeats come every 2 s from an honest node; far more than this in one second is a flood.
    static let maxStatusPerSecond = 20
    static let maxDescriptorBytes = 64 << 10
    /// Error codes and messages a node reports are cut to this length before they reach logs and clients.
    static let maxReportedText = 256

    public init(routerKey: SigningKey, pool: NodePool, receipts: ReceiptCollector, admission: any NodeAdmission,
                prices: any PriceBook = FreePriceBook(), inFlight: InFlightSequences? = nil, logger: Logger) {
        self.inFlight = inFlight
        self.prices = prices
        self.routerKey = routerKey
        self.pool = pool
        self.receipts = receipts
        self.admission = admission
        self.logger = logger
        self.pending = PendingStreams(maxPerAddress: pool.limits.maxPendingStreamsPerAddress)
    }

    public func registerMethods<Transport: ServerTransport>(with router: inout RPCRouter<Transport>) {
        router.registerHandler(
            forMethod: TunnelService.control,
            deserializer: ProtobufWireDeserializer<NodeControlMessage>(),
            serializer: ProtobufWireSerializer<RouterControlMessage>()
        ) { request, context in
            let ticket = try admitPending(context)
            return StreamingServerResponse { writer in
                defer { ticket.release() }
                try await control(messages: request.messages, writer: writer, pending: ticket)
                return [:]
            }
        }
        router.registerHandler(
            forMethod: TunnelService.work,
            deserializer: ProtobufWireDeserializer<NodeWorkMessage>(),
            serializer: ProtobufWireSerializer<RouterWorkMessage>()
        ) { request, context in
            let ticket = try admitPending(context)
            return StreamingServerResponse { writer in
                defer { ticket.release() }
                try await work(messages: request.messages, writer: writer, pending: ticket)
                return [:]
            }
        }
    }

    private func admitPending(_ context: ServerContext) throws -> PendingStreams.Ticket {
        guard let ticket = pending.admit(peer: context.remotePeer) else {
            logger.warning("tunnel stream refused: too many unauthenticated streams from one address",
                           metadata: ["peer": "\(context.remotePeer.prefix(64))"])
            throw RPCError(code: .resourceExhausted, message: """
                too many tunnel streams from this address that have not authenticated yet (at most \(pending.maxPerAddress)); \
                register on the control stream, then open Work streams with the session token
                """)
        }
        return ticket
    }

    /// The next message of a node's stream. Bytes that do not decode, or a message over the size limit, are the
    /// node's violation (it is counted and disconnected), not a connection that merely went away.
    static func next<Message>(_ inbound: inout RPCAsyncSequence<Message, any Error>.AsyncIterator) async throws -> Message? {
        do { return try await inbound.next() } catch {
            if let malformed = MalformedWireMessage.cause(of: error) {
                throw NodeViolation(kind: "malformed_message", detail: malformed.detail)
            }
            // The transport's deframer refused the frame (over the 4 MiB limit, a bad compression flag): it reports
            // that, and only that, as this internal error.
            if let rpc = error as? RPCError,
               rpc.code == .resourceExhausted || (rpc.code == .internalError && rpc.message == "Failed to decode message") {
                throw NodeViolation(kind: "undecodable_frame", detail: rpc.message)
            }
            throw error
        }
    }

    private func reject(_ writer: RPCWriter<RouterControlMessage>, code: String, _ message: String) async throws -> Never {
        logger.warning("compute node registration refused", metadata: ["code": "\(code)", "reason": "\(message)"])
        Counter(label: "emc_router_registrations_refused_total", dimensions: [("code", code)]).increment()
        try? await writer.write(.rejected(code: code, message: message))
        throw RPCError(code: .unauthenticated, message: message)
    }

    /// Counts and logs a node's protocol violation, and drops the node.
    private func punish(_ violation: NodeViolation, nodeID: NodeID, number: UInt64) async {
        Counter(label: "emc_router_node_misbehaviour_total", dimensions: [("kind", violation.kind)]).increment()
        logger.warning("compute node misbehaved; disconnecting it", metadata: [
            "node": "\(nodeID.short)", "kind": "\(violation.kind)", "detail": "\(violation.detail.prefix(Self.maxReportedText))",
        ])
        await pool.evict(nodeID: nodeID, number: number, reason: "\(violation.kind): \(violation.detail.prefix(Self.maxReportedText))")
    }

    /// Runs the control session beside a watcher that ends it when the pool evicts the node (or it never registers).
    func control(messages: RPCAsyncSequence<NodeControlMessage, any Error>,
                 writer: RPCWriter<RouterControlMessage>, pending: PendingStreams.Ticket) async throws {
        let (evictions, evict) = AsyncStream<String>.makeStream(bufferingPolicy: .bufferingNewest(1))
        let registered = Flag()
        let heard = LastHeard(pool.nowMs())
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                try await controlSession(messages: messages, writer: writer, evict: evict, registered: registered, heard: heard,
                                         pending: pending)
            }
            group.addTask {
                for await reason in evictions { throw RPCError(code: .permissionDenied, message: "disconnected: \(reason)") }
            }
            group.addTask { try await watchLiveness(registered: registered, heard: heard) }
            // Whichever ends first (the session, an eviction, or silence) ends the others.
            try await group.next()
            group.cancelAll()
        }
    }

    /// Ends a control stream that does not register in time, or that falls silent once registered.
    private func watchLiveness(registered: Flag, heard: LastHeard) async throws {
        try await Task.sleep(for: Self.registrationTimeout)
        guard registered.isSet else {
            throw RPCError(code: .deadlineExceeded, message: "registration not completed within \(Self.registrationTimeout)")
        }
        let timeout = pool.limits.heartbeatTimeoutMs
        while true {
            try await Task.sleep(for: .milliseconds(Int64(clamping: min(timeout, 1000))))
            let now = pool.nowMs(), last = heard.value
            let silent = now > last ? now - last : 0
            if silent > timeout {
                Counter(label: "emc_router_nodes_silent_total").increment()
                logger.warning("compute node silent; disconnecting it", metadata: ["silent_ms": "\(silent)"])
                throw RPCError(code: .unavailable, message: """
                    disconnected: nothing heard from the node for \(silent) ms (an honest node sends a status every 2 s)
                    """)
            }
        }
    }

    private func controlSession(messages: RPCAsyncSequence<NodeControlMessage, any Error>, writer: RPCWriter<RouterControlMessage>,
                                evict: AsyncStream<String>.Continuation, registered: Flag, heard: LastHeard,
                                pending: PendingStreams.Ticket) async throws {
        var inbound = messages.makeAsyncIterator()
        guard case .hello(let nodeNonce)? = try await inbound.next(), nodeNonce.count == TunnelHandshake.nonceLength else {
            try await reject(writer, code: "bad_hello", "the first control message must be hello with a 32-byte nonce")
        }
        let routerNonce = TunnelHandshake.randomNonce()
        let challenge = TunnelHandshake.challengePayload(nodeNonce: nodeNonce, routerNonce: routerNonce)
        try await writer.write(.challenge(routerKey: routerKey.publicKey, routerNonce: routerNonce,
                                          signature: routerKey.sign(challenge, domain: .routerHandshake)))

        guard case .register(let nodeKey, let descriptorBytes, let signature)? = try await inbound.next() else {
            try await reject(writer, code: "bad_registration", "expected a register message after the challenge")
        }
        let payload = TunnelHandshake.registrationPayload(routerNonce: routerNonce, nodeNonce: nodeNonce,
                                                          routerID: routerKey.nodeID, descriptorBytes: descriptorBytes)
        guard nodeKey.isValidSignature(signature, for: payload, domain: .tunnelRegistration) else {
            try await reject(writer, code: "bad_signature",
                             "registration signature does not verify for node key \(nodeKey.hex); the node must sign with the key it registers")
        }
        // Only a compute node the chain has registered, with a bonded compute stake, serves.
        await admission.waitUntilKnown(within: .seconds(5))
        if let refusal = admission.refusal(for: nodeKey) {
            Counter(label: "emc_router_registrations_unadmitted_total").increment()
            try await reject(writer, code: refusal.code, refusal.message)
        }
        // Kept for the whole session, for each of up to `maxSessions` nodes: a few apps and model names fit easily.
        guard descriptorBytes.count <= Self.maxDescriptorBytes else {
            try await reject(writer, code: "bad_descriptor", "node descriptor of \(descriptorBytes.count) bytes; at most \(Self.maxDescriptorBytes)")
        }
        let descriptor: NodeDescriptor
        do { descriptor = try NodeDescriptor(canonicalBytes: descriptorBytes) } catch {
            try await reject(writer, code: "bad_descriptor", "node descriptor: \(error.description)")
        }
        guard descriptor.maxConcurrent >= 1, descriptor.maxConcurrent <= 4096 else {
            try await reject(writer, code: "bad_descriptor", "max_concurrent must be between 1 and 4096")
        }

        let nodeID = nodeKey.nodeID
        let token: [UInt8], number: UInt64
        switch await pool.register(key: nodeKey, descriptor: descriptor, evict: evict) {
        case .accepted(let sessionToken, let sessionNumber): (token, number) = (sessionToken, sessionNumber)
        case .full: try await reject(writer, code: "router_full", "this router serves its maximum number of compute nodes")
        case .coolingDown:
            try await reject(writer, code: "misbehaviour_cooldown", "this node broke the tunnel protocol recently; retry later")
        }
        registered.set()
        heard.touch(pool.nowMs())
        pending.release()
        inFlight?.nodeRegistered(nodeID.description)
        var statusWindow = (start: ContinuousClock.now, count: 0)
        do {
            try await writer.write(.accepted(sessionToken: token))
            while let message = try await Self.next(&inbound) {
                heard.touch(pool.nowMs())
                switch message {
                case .status(_, let healthyApps):
                    let now = ContinuousClock.now
                    if now - statusWindow.start > .seconds(1) { statusWindow = (now, 0) }
                    statusWindow.count += 1
                    guard statusWindow.count <= Self.maxStatusPerSecond else {
                        throw NodeViolation(kind: "flood", detail: "more than \(Self.maxStatusPerSecond) status messages in a second")
                    }
                    await pool.updateStatus(nodeID: nodeID, healthyApps: healthyApps)
                case .receipt(let body, let nodeSignature):
                    let collected: CollectedReceipt
                    do {
                        collected = try await receipts.collect(bodyBytes: body, nodeSignature: nodeSignature, nodeKey: nodeKey, assigned: nil,
                                                        relayed: nil)
                    } catch ReceiptRefusal.refusedByStore(.alreadyBatched) {
                        // Late, not forged: its request's batch closed before it came. Refused by id (so the node
                        // drops it), without disconnecting an honest node.
                        Counter(label: "emc_router_receipts_after_batch_total").increment()
                        logger.warning("receipt refused: its sequence number is in a settlement batch already closed",
                                       metadata: ["node": "\(nodeID.short)"])
                        try await writer.write(.rejected(code: RouterControlMessage.receiptRefusedCode, message: Hash32.of(body + nodeSignature).hex))
                        continue
                    } catch let refusal as ReceiptRefusal {
                        // Named by id, so an honest node whose receipt can never pass (the router lost its records)
                        // drops it instead of re-sending it, and being dropped, after every reconnect.
                        try? await writer.write(.rejected(code: RouterControlMessage.receiptRefusedCode, message: Hash32.of(body + nodeSignature).hex))
                        throw NodeViolation(kind: refusal.kind, detail: refusal.description)
                    }
                    try await writer.write(.receiptAck(receiptID: collected.id, routerSignature: collected.routerSignature))
                case .hello, .register:
                    throw NodeViolation(kind: "out_of_order", detail: "hello or register on a registered session")
                }
            }
            await pool.unregister(nodeID: nodeID, number: number)
        } catch let violation as NodeViolation {
            await punish(violation, nodeID: nodeID, number: number)
            throw RPCError(code: .permissionDenied, message: "disconnected for \(violation.kind)")
        } catch {
            await pool.unregister(nodeID: nodeID, number: number)
            throw error
        }
    }

    /// A content type goes into the client's response headers: short, visible ASCII only.
    static func isValidContentType(_ value: String) -> Bool {
        !value.isEmpty && value.utf8.count <= 256 && value.utf8.allSatisfy { (0x20...0x7E).contains($0) || $0 == 0x09 }
    }

    /// A Work stream must present its session token within the registration timeout.
    func work(messages: RPCAsyncSequence<NodeWorkMessage, any Error>, writer: RPCWriter<RouterWorkMessage>,
              pending: PendingStreams.Ticket) async throws {
        let authenticated = Flag()
        try await withThrowingTaskGroup(of: Bool.self) { group in
            group.addTask {
                try await workSession(messages: messages, writer: writer, authenticated: authenticated, pending: pending)
                return true
            }
            group.addTask {
                try await Task.sleep(for: Self.registrationTimeout)
                guard authenticated.isSet else {
                    throw RPCError(code: .deadlineExceeded, message: "no session token within \(Self.registrationTimeout)")
                }
                return false
            }
            // The timer ends first (quietly, once authenticated) or is cancelled when the session ends.
            for try await sessionEnded in group where sessionEnded {
                group.cancelAll()
                return
            }
        }
    }

    private func workSession(messages: RPCAsyncSequence<NodeWorkMessage, any Error>, writer: RPCWriter<RouterWorkMessage>,
                             authenticated: Flag, pending: PendingStreams.Ticket) async throws {
        var inbound = messages.makeAsyncIterator()
        guard case .ready(let token)? = try await inbound.next(), let session = await pool.authenticate(token: token) else {
            throw RPCError(code: .unauthenticated, message: "unknown or expired session; register on the control stream first")
        }
        authenticated.set()
        pending.release()
        let slot = slotCounter.next()
        let job = await withTaskCancellationHandler {
            await pool.offerSlot(nodeID: session.nodeID, number: session.number, slot: slot)
        } onCancel: { [pool] in
            Task { await pool.withdrawSlot(nodeID: session.nodeID, slot: slot) }
        }
        guard let job else { return }
        defer { job.commandSink.finish() }
        // Once everything below is done (the receipt handled, the hold released): the gateway then ends the request's
        // escrow reservation.
        defer { job.handledSink.finish() }
        inFlight?.hold(job.request.sequence)
        defer { inFlight?.release(job.request.sequence) }
        var ended = false
        var headStatus: UInt16?
        var relayedHash = StreamingHasher()
        var relayedBytes: UInt64 = 0
        var receiptStored = false
        // The request as the node gets it: the job's, with this node's prices in force now.
        var request = job.request
        do {
            request.prices = await prices.prices(node: session.nodeID, app: request.app, model: request.model, path: request.path)
            // Durable before the node sees the request, so its receipt can be checked even after a router restart.
            do {
                try await receipts.store.recordAssignment(Assignment(
                    sequence: request.sequence, attempt: request.attempt, nodeID: session.nodeID, app: request.app, model: request.model,
                    requestHash: ReceiptBody.requestHash(method: request.method, path: request.path, contentType: request.contentType,
                                                         stream: request.stream, body: request.body),
                    requestBytes: UInt64(request.body.count), payer: request.payer, prices: request.prices,
                    requestBound: RequestBound.units(path: request.path, body: request.body)))
            } catch let refusal as AssignmentRefusal {
                // The node's prices rose since admission: not its fault, and the request goes elsewhere or fails.
                logger.warning("request not assigned: its reservation does not cover the node's prices now", metadata: [
                    "node": "\(session.nodeID.short)", "request": "\(request.sequence)", "reason": "\(refusal)",
                ])
                ended = true
                job.fail(.rejected(code: refusal.code, message: refusal.description))
                throw refusal
            }
            try await writer.write(.assign(request))
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    for await command in job.commands { try await writer.write(command) }
                }
                // The RPC ends once the answer is complete (and its receipt acknowledged) or failed.
                answer: while let message = try await Self.next(&inbound) {
                    switch message {
                    case .head(let status, let contentType):
                        guard headStatus == nil else { throw NodeViolation(kind: "out_of_order", detail: "a second head") }
                        guard (200...599).contains(status) else {
                            throw NodeViolation(kind: "bad_status", detail: "response status \(status)")
                        }
                        guard Self.isValidContentType(contentType) else {
                            throw NodeViolation(kind: "bad_head", detail: "content type of \(contentType.utf8.count) bytes or with control characters")
                        }
                        headStatus = status
                        _ = await job.responses.send(message)
                    case .chunk(let bytes):
                        guard headStatus != nil else { throw NodeViolation(kind: "out_of_order", detail: "a chunk before the head") }
                        relayedHash.update(bytes)
                        relayedBytes += UInt64(bytes.count)
                        _ = await job.responses.send(message)
                    case .end(let body, let signature):
                        guard let status = headStatus else { throw NodeViolation(kind: "out_of_order", detail: "an end before the head") }
                        ended = true
                        job.responses.finish()
                        let relayed = RelayedAnswer(status: status, responseHash: relayedHash.finalize(), responseBytes: relayedBytes)
                        do {
                            let collected = try await receipts.collect(bodyBytes: body, nodeSignature: signature, nodeKey: session.key,
                                                                       assigned: (request.sequence, request.attempt), relayed: relayed)
                            receiptStored = true
                            job.commandSink.yield(.receiptAck(receiptID: collected.id, routerSignature: collected.routerSignature))
                        } catch ReceiptRefusal.refusedByStore(.alreadyBatched) {
                            // Cannot happen while the number is held in flight, unless the hold expired: not the
                            // node's fault. Not acknowledged; the control stream refuses it by id on re-delivery.
                            Counter(label: "emc_router_receipts_after_batch_total").increment()
                            logger.error("receipt refused: its sequence number is in a settlement batch already closed",
                                         metadata: ["node": "\(session.nodeID.short)", "request": "\(request.sequence)"])
                        } catch let refusal as ReceiptRefusal {
                            throw NodeViolation(kind: refusal.kind, detail: refusal.description)
                        } catch {
                            // The store failed, not the node: no acknowledgement, so the node re-delivers it later.
                            logger.error("receipt not stored", metadata: ["node": "\(session.nodeID.short)", "error": "\(error)"])
                        }
                        break answer
                    case .failed(let code, let text):
                        ended = true
                        job.fail(.rejected(code: String(code.prefix(Self.maxReportedText)), message: String(text.prefix(Self.maxReportedText))))
                        break answer
                    case .ready:
                        throw NodeViolation(kind: "out_of_order", detail: "ready sent twice")
                    }
                }
                if !ended { job.fail(.disconnected) }
                job.commandSink.finish()
                try await group.waitForAll()
            }
        } catch let violation as NodeViolation {
            job.fail(.misbehaved(kind: violation.kind, detail: String(violation.detail.prefix(Self.maxReportedText))))
            await recordRelayed(request, status: headStatus, hash: relayedHash, bytes: relayedBytes, stored: receiptStored)
            await pool.finished(nodeID: session.nodeID, number: session.number)
            await punish(violation, nodeID: session.nodeID, number: session.number)
            throw RPCError(code: .permissionDenied, message: "disconnected for \(violation.kind)")
        } catch {
            if !ended { job.fail(.disconnected) }
            await recordRelayed(request, status: headStatus, hash: relayedHash, bytes: relayedBytes, stored: receiptStored)
            await pool.finished(nodeID: session.nodeID, number: session.number)
            throw error
        }
        await recordRelayed(request, status: headStatus, hash: relayedHash, bytes: relayedBytes, stored: receiptStored)
        await pool.finished(nodeID: session.nodeID, number: session.number)
    }

    /// An answer that began but left no stored receipt: what was relayed is recorded, so a receipt the node sends
    /// later on its control stream is held to it (a node cannot drop the stream and then bill more than it sent).
    private func recordRelayed(_ request: WorkRequest, status: UInt16?, hash: StreamingHasher, bytes: UInt64, stored: Bool) async {
        guard let status, !stored else { return }
        do {
            try await receipts.store.recordRelayed(sequence: request.sequence, attempt: request.attempt,
                                                   RelayedAnswer(status: status, responseHash: hash.finalize(), responseBytes: bytes))
        } catch {
            logger.error("cannot record a relayed answer", metadata: ["request": "\(request.sequence)", "error": "\(error)"])
        }
    }
}

/// Numbers idle Work-stream slots so one can be withdrawn.
final class SlotCounter: Sendable {
    private let value = Atomic<UInt64>(0)
    func next() -> UInt64 { value.add(1, ordering: .relaxed).newValue }
}

/// When a node was last heard from on its control stream (the pool's monotonic milliseconds).
final class LastHeard: Sendable {
    private let milliseconds: Atomic<UInt64>
    init(_ now: UInt64) { milliseconds = Atomic(now) }
    func touch(_ now: UInt64) { milliseconds.store(now, ordering: .relaxed) }
    var value: UInt64 { milliseconds.load(ordering: .relaxed) }
}

/// A flag set once, read from another task.
final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .releasing) }
    var isSet: Bool { value.load(ordering: .acquiring) }
}
