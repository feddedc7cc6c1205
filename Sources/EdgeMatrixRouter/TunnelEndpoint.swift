import EdgeMatrixCore
import EdgeMatrixNetwork
import EdgeMatrixStore
import GRPCCore
import Logging
import Metrics
import Synchronization

/// Checks a node's receipt, countersigns it and makes it durable. Returns the id to acknowledge.
public struct ReceiptCollector: Sendable {
    let routerKey: SigningKey
    let store: ReceiptStore

    public init(routerKey: SigningKey, store: ReceiptStore) {
        self.routerKey = routerKey
        self.store = store
    }

    public func collect(bodyBytes: [UInt8], nodeSignature: [UInt8], nodeKey: PublicKey) async throws -> Hash32 {
        var receipt = try Receipt(bodyBytes: bodyBytes, nodeSignature: nodeSignature)
        try receipt.countersign(nodeKey: nodeKey, routerKey: routerKey)
        try await store.append(receipt)
        Counter(label: "emc_router_receipts_total").increment()
        return receipt.id
    }
}

/// The router's side of the tunnel: compute nodes dial in, prove their keys, and offer Work streams.
public struct TunnelEndpoint: RegistrableRPCService {
    let routerKey: SigningKey
    let pool: NodePool
    let receipts: ReceiptCollector
    let logger: Logger
    private let slotCounter = SlotCounter()

    public init(routerKey: SigningKey, pool: NodePool, receipts: ReceiptCollector, logger: Logger) {
        self.routerKey = routerKey
        self.pool = pool
        self.receipts = receipts
        self.logger = logger
    }

    public func registerMethods<Transport: ServerTransport>(with router: inout RPCRouter<Transport>) {
        router.registerHandler(
            forMethod: TunnelService.control,
            deserializer: CanonicalDeserializer<NodeControlMessage>(),
            serializer: CanonicalSerializer<RouterControlMessage>()
        ) { request, _ in
            StreamingServerResponse { writer in
                try await control(messages: request.messages, writer: writer)
                return [:]
            }
        }
        router.registerHandler(
            forMethod: TunnelService.work,
            deserializer: CanonicalDeserializer<NodeWorkMessage>(),
            serializer: CanonicalSerializer<RouterWorkMessage>()
        ) { request, _ in
            StreamingServerResponse { writer in
                try await work(messages: request.messages, writer: writer)
                return [:]
            }
        }
    }

    private func reject(_ writer: RPCWriter<RouterControlMessage>, code: String, _ message: String) async throws -> Never {
        logger.warning("compute node registration refused", metadata: ["code": "\(code)", "reason": "\(message)"])
        Counter(label: "emc_router_registrations_refused_total", dimensions: [("code", code)]).increment()
        try? await writer.write(.rejected(code: code, message: message))
        throw RPCError(code: .unauthenticated, message: message)
    }

    func control(messages: RPCAsyncSequence<NodeControlMessage, any Error>,
                 writer: RPCWriter<RouterControlMessage>) async throws {
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
        guard nodeKey.isValidSignature(signature, for: payload, domain: .nodeRegistration) else {
            try await reject(writer, code: "bad_signature",
                             "registration signature does not verify for node key \(nodeKey.hex); the node must sign with the key it registers")
        }
        let descriptor: NodeDescriptor
        do { descriptor = try NodeDescriptor(canonicalBytes: descriptorBytes) } catch {
            try await reject(writer, code: "bad_descriptor", "node descriptor: \(error.description)")
        }
        guard descriptor.maxConcurrent >= 1, descriptor.maxConcurrent <= 4096 else {
            try await reject(writer, code: "bad_descriptor", "max_concurrent must be between 1 and 4096")
        }

        let nodeID = nodeKey.nodeID
        let (token, number) = await pool.register(key: nodeKey, descriptor: descriptor)
        do {
            try await writer.write(.accepted(sessionToken: token))
            while let message = try await inbound.next() {
                switch message {
                case .status(_, let healthyApps):
                    await pool.updateStatus(nodeID: nodeID, healthyApps: healthyApps)
                case .receipt(let body, let nodeSignature):
                    let id = try await receipts.collect(bodyBytes: body, nodeSignature: nodeSignature, nodeKey: nodeKey)
                    try await writer.write(.receiptAck(receiptID: id))
                case .hello, .register:
                    throw RPCError(code: .failedPrecondition, message: "already registered")
                }
            }
            await pool.unregister(nodeID: nodeID, number: number)
        } catch {
            await pool.unregister(nodeID: nodeID, number: number)
            throw error
        }
    }

    func work(messages: RPCAsyncSequence<NodeWorkMessage, any Error>, writer: RPCWriter<RouterWorkMessage>) async throws {
        var inbound = messages.makeAsyncIterator()
        guard case .ready(let token)? = try await inbound.next(), let session = await pool.authenticate(token: token) else {
            throw RPCError(code: .unauthenticated, message: "unknown or expired session; register on the control stream first")
        }
        let slot = slotCounter.next()
        let job = await withTaskCancellationHandler {
            await pool.offerSlot(nodeID: session.nodeID, number: session.number, slot: slot)
        } onCancel: { [pool] in
            Task { await pool.withdrawSlot(nodeID: session.nodeID, slot: slot) }
        }
        guard let job else { return }
        defer { job.commandSink.finish() }
        var ended = false
        do {
            try await writer.write(.assign(job.request))
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    for await command in job.commands { try await writer.write(command) }
                }
                // The RPC ends once the answer is complete (and its receipt acknowledged) or failed.
                answer: while let message = try await inbound.next() {
                    switch message {
                    case .end(let body, let signature):
                        ended = true
                        job.responseSink.yield(message)
                        job.responseSink.finish()
                        do {
                            let receiptID = try await receipts.collect(bodyBytes: body, nodeSignature: signature,
                                                                       nodeKey: session.key)
                            job.commandSink.yield(.receiptAck(receiptID: receiptID))
                        } catch {
                            logger.error("receipt refused", metadata: ["node": "\(session.nodeID.short)", "error": "\(error)"])
                        }
                        break answer
                    case .failed(let code, let text):
                        ended = true
                        job.fail(.rejected(code: code, message: text))
                        break answer
                    case .ready:
                        throw RPCError(code: .failedPrecondition, message: "ready sent twice")
                    case .head, .chunk:
                        job.responseSink.yield(message)
                    }
                }
                if !ended { job.fail(.disconnected) }
                job.commandSink.finish()
                try await group.waitForAll()
            }
        } catch {
            if !ended { job.fail(.disconnected) }
            await pool.finished(nodeID: session.nodeID, number: session.number)
            throw error
        }
        await pool.finished(nodeID: session.nodeID, number: session.number)
    }
}

/// Numbers idle Work-stream slots so one can be withdrawn.
final class SlotCounter: Sendable {
    private let value = Atomic<UInt64>(0)
    func next() -> UInt64 { value.add(1, ordering: .relaxed).newValue }
}
