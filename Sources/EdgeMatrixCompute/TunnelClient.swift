import EdgeMatrixCore
import EdgeMatrixNetwork
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import Metrics

public enum TunnelError: Error, CustomStringConvertible, Sendable, Equatable {
    case routerIdentityMismatch(expected: NodeID, got: NodeID)
    case badRouterSignature
    case protocolViolation(String)
    case registrationRejected(code: String, message: String)
    case controlStreamClosed

    public var description: String {
        switch self {
        case .routerIdentityMismatch(let expected, let got): "router presented key of \(got), but the config pins \(expected)"
        case .badRouterSignature: "router's handshake signature does not verify; refusing to register"
        case .protocolViolation(let what): "tunnel protocol violation: \(what)"
        case .registrationRejected(let code, let message): "router refused registration (\(code)): \(message)"
        case .controlStreamClosed: "router closed the control stream"
        }
    }
}

/// Live state the node reports and serves with.
public protocol WorkServer: Sendable {
    func descriptor() async -> NodeDescriptor
    func healthyApps() async -> [String]
    func inFlight() -> UInt32
    func serve(_ request: WorkRequest, router: PublicKey, emit: @Sendable (NodeWorkMessage) async -> Void) async
}

/// One compute node's tunnel to one router: dials out, proves both keys, keeps Work streams open, reconnects.
struct TunnelClient: Sendable {
    let router: ComputeConfiguration.RouterEntry
    let nodeKey: SigningKey
    let maxConcurrent: Int
    let server: any WorkServer
    let outbox: ReceiptOutbox
    let heartbeat: Duration
    let logger: Logger

    /// Runs until cancelled, reconnecting with exponential backoff (0.25 s doubling to 10 s, with jitter).
    func run() async {
        var failures = 0
        while !Task.isCancelled {
            let started = ContinuousClock.now
            do {
                try await session()
            } catch is CancellationError {
                return
            } catch {
                if Task.isCancelled { return }
                logger.warning("tunnel to router lost", metadata: ["router": "\(router.address)", "error": "\(error)"])
            }
            if ContinuousClock.now - started > .seconds(30) { failures = 0 }
            failures += 1
            let base = min(250 * (1 << min(failures - 1, 6)), 10_000)
            let delay = base / 2 + Int.random(in: 0...(base / 2))
            try? await Task.sleep(for: .milliseconds(delay))
        }
    }

    private func session() async throws {
        guard let (host, port) = router.hostAndPort else { throw TunnelError.protocolViolation("bad router address") }
        let transport = try HTTP2ClientTransport.Posix(
            // An IP literal must not go into TLS SNI, so it is dialled as an address, not a name.
            target: host.split(separator: ".").count == 4 && host.allSatisfy({ $0.isNumber || $0 == "." })
                ? .ipv4(address: host, port: port) : .dns(host: host, port: port),
            transportSecurity: NodeTLS.clientSecurity(pinnedServer: router.key),
            config: .defaults {
                $0.backoff = .init(initial: .milliseconds(200), max: .seconds(2), multiplier: 2, jitter: 0.2)
                // A router that froze or whose path died without a FIN is noticed within 30 s, and the node reconnects.
                $0.connection.keepalive = .init(time: .seconds(20), timeout: .seconds(10), allowWithoutCalls: true)
            }
        )
        let client = GRPCClient(transport: transport)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.runConnections() }
            defer {
                client.beginGracefulShutdown()
                group.cancelAll()
            }
            try await control(client)
        }
    }

    private func control(_ client: GRPCClient<HTTP2ClientTransport.Posix>) async throws {
        let (outbound, sink) = AsyncStream<NodeControlMessage>.makeStream()
        let nodeNonce = TunnelHandshake.randomNonce()
        sink.yield(.hello(nodeNonce: nodeNonce))
        let request = StreamingClientRequest<NodeControlMessage> { writer in
            for await message in outbound { try await writer.write(message) }
        }
        defer { sink.finish() }
        try await client.bidirectionalStreaming(
            request: request, descriptor: TunnelService.control,
            serializer: ProtobufWireSerializer<NodeControlMessage>(), deserializer: ProtobufWireDeserializer<RouterControlMessage>(),
            options: .defaults
        ) { response in
            var inbound = response.messages.makeAsyncIterator()
            guard case .challenge(let routerKey, let routerNonce, let signature)? = try await inbound.next() else {
                throw TunnelError.protocolViolation("expected a challenge from the router")
            }
            guard routerKey == router.key else {
                throw TunnelError.routerIdentityMismatch(expected: router.key.nodeID, got: routerKey.nodeID)
            }
            guard routerKey.isValidSignature(signature, for: TunnelHandshake.challengePayload(nodeNonce: nodeNonce, routerNonce: routerNonce),
                                             domain: .routerHandshake) else { throw TunnelError.badRouterSignature }
            let descriptorBytes = await server.descriptor().canonicalBytes
            let payload = TunnelHandshake.registrationPayload(routerNonce: routerNonce, nodeNonce: nodeNonce,
                                                              routerID: routerKey.nodeID, descriptorBytes: descriptorBytes)
            sink.yield(.register(nodeKey: nodeKey.publicKey, descriptorBytes: descriptorBytes,
                                 signature: nodeKey.sign(payload, domain: .tunnelRegistration)))
            let token: [UInt8]
            switch try await inbound.next() {
            case .accepted(let sessionToken)?: token = sessionToken
            case .rejected(let code, let message)?: throw TunnelError.registrationRejected(code: code, message: message)
            default: throw TunnelError.protocolViolation("expected accepted or rejected after register")
            }
            logger.info("registered with router", metadata: ["router": "\(router.address)", "router_id": "\(routerKey.nodeID.short)"])
            let unacknowledged = await outbox.unacknowledged(for: routerKey.nodeID)
            if !unacknowledged.isEmpty {
                logger.info("re-delivering unacknowledged receipts", metadata: ["router": "\(router.address)", "count": "\(unacknowledged.count)"])
            }
            for receipt in unacknowledged {
                logger.debug("receipt re-delivered", metadata: ["request": "\(receipt.body.sequence)", "attempt": "\(receipt.body.attempt)",
                                                             "receipt": "\(receipt.id.hex)"])
                sink.yield(.receipt(bodyBytes: receipt.bodyBytes, nodeSignature: receipt.nodeSignature))
            }
            try await withThrowingTaskGroup(of: Void.self) { group in
                for _ in 0..<maxConcurrent {
                    group.addTask { try await workLoop(client, token: token, routerKey: routerKey, control: sink) }
                }
                group.addTask {
                    while true {
                        try await Task.sleep(for: heartbeat)
                        sink.yield(.status(inFlight: server.inFlight(), healthyApps: await server.healthyApps()))
                    }
                }
                while let message = try await inbound.next() {
                    switch message {
                    case .receiptAck(let id, let routerSignature):
                        await acknowledge(id, routerSignature: routerSignature)
                    case .rejected(RouterControlMessage.receiptRefusedCode, let idHex):
                        // The router will never countersign it (it lost its record, or the receipt is wrong):
                        // keeping it would only get this node dropped again after every reconnect.
                        if let id = Hash32(hex: idHex), let receipt = await outbox.acknowledge(id) {
                            Counter(label: "emc_compute_receipts_refused_total").increment()
                            logger.error("router refused a receipt; dropped it", metadata: [
                                "router": "\(router.address)", "request": "\(receipt.body.sequence)", "receipt": "\(idHex)",
                            ])
                        }
                    default:
                        break
                    }
                }
                group.cancelAll()
                throw TunnelError.controlStreamClosed
            }
        }
    }

    /// Removes an acknowledged receipt from the outbox. The log line is the node's own record of what the router
    /// acknowledged (tests and operators compare it with the router's store).
    private func acknowledge(_ id: Hash32, routerSignature: [UInt8]) async {
        guard let receipt = await outbox.acknowledge(id, routerSignature: routerSignature) else { return }
        logger.debug("receipt acknowledged", metadata: ["request": "\(receipt.body.sequence)", "attempt": "\(receipt.body.attempt)",
                                                         "receipt": "\(id.hex)"])
    }

    /// Keeps one Work stream open at a time: offer capacity, serve the assigned request, repeat.
    private func workLoop(_ client: GRPCClient<HTTP2ClientTransport.Posix>, token: [UInt8], routerKey: PublicKey,
                          control: AsyncStream<NodeControlMessage>.Continuation) async throws {
        while !Task.isCancelled {
            // Bounded: an app answering faster than the router reads waits here, instead of piling up in memory.
            let sink = BoundedChannel<NodeWorkMessage>(maxMessages: 64, maxBytes: 1 << 20, size: NodeWorkMessage.bufferedSize)
            await sink.send(.ready(sessionToken: token))
            let request = StreamingClientRequest<NodeWorkMessage> { writer in
                while let message = try await sink.next() { try await writer.write(message) }
            }
            var options = CallOptions.defaults
            // An assignment carries a request body of up to 16 MiB.
            options.maxResponseMessageBytes = 32 << 20
            let assigned = try await client.bidirectionalStreaming(
                request: request, descriptor: TunnelService.work,
                serializer: ProtobufWireSerializer<NodeWorkMessage>(), deserializer: ProtobufWireDeserializer<RouterWorkMessage>(),
                options: options
            ) { response in
                defer { sink.finish() }
                var inbound = response.messages.makeAsyncIterator()
                guard case .assign(let work)? = try await inbound.next() else { return false }
                logger.debug("request assigned", metadata: ["request": "\(work.sequence)", "attempt": "\(work.attempt)"])
                let receiptID = ReceiptIDBox()
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask {
                        await server.serve(work, router: routerKey) { message in
                            if case .end(let body, let signature) = message,
                               let receipt = try? Receipt(bodyBytes: body, nodeSignature: signature) {
                                await outbox.add(receipt)
                                receiptID.set(receipt.id)
                                logger.debug("receipt signed", metadata: ["request": "\(receipt.body.sequence)", "attempt": "\(receipt.body.attempt)"])
                            }
                            await sink.send(message)
                        }
                        // Without a receipt there is nothing to acknowledge: close our side so the RPC ends.
                        if receiptID.get() == nil { sink.finish() }
                    }
                    while let message = try await inbound.next() {
                        switch message {
                        case .cancel:
                            group.cancelAll()
                            sink.finish()
                        case .receiptAck(let id, let routerSignature):
                            await acknowledge(id, routerSignature: routerSignature)
                            sink.finish()
                        case .assign: throw TunnelError.protocolViolation("second assignment on one Work stream")
                        }
                    }
                    try await group.waitForAll()
                }
                // The stream ended without an acknowledgement: hand the receipt to the control stream.
                if let id = receiptID.get(), let receipt = await outbox.pending(id) {
                    control.yield(.receipt(bodyBytes: receipt.bodyBytes, nodeSignature: receipt.nodeSignature))
                }
                return true
            }
            if !assigned { try await Task.sleep(for: .milliseconds(50)) }
        }
    }
}

/// A write-once slot shared between the serving task and the stream handler.
final class ReceiptIDBox: Sendable {
    private let value = Mutex<Hash32?>(nil)
    func set(_ id: Hash32) { value.withLock { $0 = id } }
    func get() -> Hash32? { value.withLock { $0 } }
}

import Synchronization
