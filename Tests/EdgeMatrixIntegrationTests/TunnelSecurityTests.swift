import EdgeMatrixCompute
import EdgeMatrixCore
import EdgeMatrixNetwork
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Testing

/// Registration must prove possession of the node key, and a node only talks to the router key it pinned.
extension Integration {
@Suite("Tunnel security", .serialized)
struct TunnelSecurityTests {
    /// Opens a raw control stream to the router and plays the node's side of the handshake by hand.
    func handshake(port: Int, routerKey: PublicKey, play: @escaping @Sendable (_ challenge: RouterControlMessage, _ nodeNonce: [UInt8]) -> NodeControlMessage)
        async throws -> RouterControlMessage? {
        let transport = try HTTP2ClientTransport.Posix(target: .ipv4(address: "127.0.0.1", port: port),
                                                       transportSecurity: NodeTLS.clientSecurity(pinnedServer: routerKey))
        return try await withGRPCClient(transport: transport) { client in
            let nodeNonce = TunnelHandshake.randomNonce()
            let (outbound, sink) = AsyncStream<NodeControlMessage>.makeStream()
            sink.yield(.hello(nodeNonce: nodeNonce))
            let request = StreamingClientRequest<NodeControlMessage> { writer in
                for await message in outbound { try await writer.write(message) }
            }
            return try await client.bidirectionalStreaming(
                request: request, descriptor: TunnelService.control,
                serializer: ProtobufWireSerializer<NodeControlMessage>(), deserializer: ProtobufWireDeserializer<RouterControlMessage>(),
                options: .defaults
            ) { response in
                var inbound = response.messages.makeAsyncIterator()
                guard let challenge = try await inbound.next() else { return nil }
                sink.yield(play(challenge, nodeNonce))
                defer { sink.finish() }
                do { return try await inbound.next() } catch { return nil }
            }
        }
    }

    func descriptorBytes() -> [UInt8] {
        NodeDescriptor(apps: [AppDescriptor(name: "llm", kind: .openai, models: ["smollm2-135m-instruct"])], maxConcurrent: 2,
                       hardware: HardwareProbe.probe(), version: "test").canonicalBytes
    }

    @Test("a registration signed by a key other than the registered node key is refused and registers nothing")
    func wrongKeyRefused() async throws {
        let network = try await TestNetwork(name: "wrong-key")
        defer { network.stopAll() }
        try await network.startRouter()
        let victim = SigningKey()
        let attacker = SigningKey()
        let descriptor = descriptorBytes()
        let routerID = network.routerKey.nodeID

        let answer = try await handshake(port: network.tunnelPort, routerKey: network.routerKey.publicKey) { challenge, nodeNonce in
            guard case .challenge(_, let routerNonce, _) = challenge else { return .hello(nodeNonce: []) }
            let payload = TunnelHandshake.registrationPayload(routerNonce: routerNonce, nodeNonce: nodeNonce, routerID: routerID,
                                                              descriptorBytes: descriptor)
            return .register(nodeKey: victim.publicKey, descriptorBytes: descriptor,
                             signature: attacker.sign(payload, domain: .tunnelRegistration))
        }
        guard case .rejected(let code, _)? = answer else {
            Issue.record("expected a rejection, got \(String(describing: answer))")
            return
        }
        #expect(code == "bad_signature")
        #expect(try await network.connectedNodes().isEmpty)
    }

    @Test("a correctly signed registration is accepted, and the router proves the key the node pinned")
    func rightKeyAccepted() async throws {
        let network = try await TestNetwork(name: "right-key")
        defer { network.stopAll() }
        try await network.startRouter()
        let node = SigningKey()
        try await network.enroll(node)
        let descriptor = descriptorBytes()
        let routerKey = network.routerKey.publicKey

        let answer = try await handshake(port: network.tunnelPort, routerKey: routerKey) { challenge, nodeNonce in
            guard case .challenge(let presented, let routerNonce, let signature) = challenge, presented == routerKey,
                  presented.isValidSignature(signature, for: TunnelHandshake.challengePayload(nodeNonce: nodeNonce, routerNonce: routerNonce),
                                             domain: .routerHandshake)
            else { return .hello(nodeNonce: []) }
            let payload = TunnelHandshake.registrationPayload(routerNonce: routerNonce, nodeNonce: nodeNonce,
                                                              routerID: presented.nodeID, descriptorBytes: descriptor)
            return .register(nodeKey: node.publicKey, descriptorBytes: descriptor, signature: node.sign(payload, domain: .tunnelRegistration))
        }
        guard case .accepted(let token)? = answer else {
            Issue.record("expected acceptance, got \(String(describing: answer))")
            return
        }
        #expect(token.count == 32)
    }

    @Test("a correctly signed node that is not registered on chain is refused with not_registered and serves nothing")
    func unregisteredNodeRefused() async throws {
        let network = try await TestNetwork(name: "unregistered")
        defer { network.stopAll() }
        try await network.startRouter()
        let stranger = SigningKey()
        let descriptor = descriptorBytes()
        let answer = try await handshake(port: network.tunnelPort, routerKey: network.routerKey.publicKey) { challenge, nodeNonce in
            guard case .challenge(let presented, let routerNonce, _) = challenge else { return .hello(nodeNonce: []) }
            let payload = TunnelHandshake.registrationPayload(routerNonce: routerNonce, nodeNonce: nodeNonce,
                                                              routerID: presented.nodeID, descriptorBytes: descriptor)
            return .register(nodeKey: stranger.publicKey, descriptorBytes: descriptor, signature: stranger.sign(payload, domain: .tunnelRegistration))
        }
        guard case .rejected(let code, _)? = answer else {
            Issue.record("an unregistered node must be refused, got \(String(describing: answer))")
            return
        }
        #expect(code == "not_registered")
        #expect(try await network.connectedNodes().isEmpty)
    }

    @Test("a compute node retired on chain is dropped by the router within a few blocks, and cannot come back")
    func retiredNodeDropped() async throws {
        let network = try await TestNetwork(name: "retired")
        defer { network.stopAll() }
        try await network.startRouter()
        let node = try await network.startComputeNode()
        try await network.waitForNodes(1)
        let key = try KeyFile.read(from: network.root + "/compute-1/node.key")
        try await RegistryChain.shared.retire(key.publicKey)
        try await Harness.eventually(timeout: .seconds(10), "the router drops the retired node") {
            try await network.connectedNodes().isEmpty
        }
        // It keeps redialling and keeps being refused.
        try await Task.sleep(for: .seconds(3))
        #expect(try await network.connectedNodes().isEmpty)
        #expect(node.log.contains("not_registered"), "\(node.log.suffix(2000))")
    }

    /// Dials the control stream as a node pinning `pinned`, sends hello, and returns the router's first message.
    func firstControlMessage(port: Int, pinned: PublicKey) async throws -> RouterControlMessage? {
        let transport = try HTTP2ClientTransport.Posix(target: .ipv4(address: "127.0.0.1", port: port),
                                                       transportSecurity: NodeTLS.clientSecurity(pinnedServer: pinned))
        return try await withGRPCClient(transport: transport) { client in
            var options = CallOptions.defaults
            options.timeout = .seconds(10)
            options.waitForReady = false
            let request = StreamingClientRequest<NodeControlMessage> { writer in
                try await writer.write(.hello(nodeNonce: TunnelHandshake.randomNonce()))
            }
            return try await client.bidirectionalStreaming(
                request: request, descriptor: TunnelService.control,
                serializer: ProtobufWireSerializer<NodeControlMessage>(), deserializer: ProtobufWireDeserializer<RouterControlMessage>(),
                options: options
            ) { response in
                var inbound = response.messages.makeAsyncIterator()
                return try await inbound.next()
            }
        }
    }

    @Test("a compute node refuses, at the TLS handshake, a router that does not hold the pinned key")
    func routerIdentityPinned() async throws {
        let network = try await TestNetwork(name: "pinning")
        defer { network.stopAll() }
        try await network.startRouter()
        // Control: pinning the real key, the handshake completes and the router's challenge arrives.
        let challenge = try await firstControlMessage(port: network.tunnelPort, pinned: network.routerKey.publicKey)
        guard case .challenge(let presented, _, _)? = challenge else {
            Issue.record("expected the router's challenge, got \(String(describing: challenge))")
            return
        }
        #expect(presented == network.routerKey.publicKey)
        // Pinning another key, the connection fails in TLS: no RPC is carried, so no application message (not even
        // the challenge, whose signature check would also refuse the router) is ever exchanged.
        let error = try #require(await #expect(throws: RPCError.self) {
            try await firstControlMessage(port: network.tunnelPort, pinned: SigningKey().publicKey)
        })
        #expect(error.code == .unavailable, "\(error)")
        // The cause is the node's own certificate check failing inside the TLS handshake.
        let cause = String(reflecting: try #require(error.cause, "no cause: \(error)"))
        #expect(cause.contains("handshakeFailed") && cause.contains("CERTIFICATE_VERIFY_FAILED"), "not a TLS verification failure: \(cause)")
        // The same check, in process: a certificate bound to the real router key verifies only under that key.
        let tls = try NodeTLS.make(key: network.routerKey)
        let der = try pemToDER(tls.certificatePEM)
        #expect(NodeTLS.boundKey(certificateDER: der) == network.routerKey.publicKey)
        var tampered = der
        tampered[tampered.count - 70] ^= 1  // inside the signature over the certificate or the binding
        #expect(NodeTLS.boundKey(certificateDER: tampered) != network.routerKey.publicKey)
    }

    @Test("the tunnel is encrypted: the router's tunnel port speaks TLS only, never plaintext gRPC")
    func tunnelIsTLS() async throws {
        let network = try await TestNetwork(name: "tls-only")
        defer { network.stopAll() }
        try await network.startRouter()
        let transport = try HTTP2ClientTransport.Posix(target: .ipv4(address: "127.0.0.1", port: network.tunnelPort),
                                                       transportSecurity: .plaintext)
        let answered = try await withGRPCClient(transport: transport) { client in
            let request = StreamingClientRequest<NodeControlMessage> { writer in
                try await writer.write(.hello(nodeNonce: TunnelHandshake.randomNonce()))
            }
            var options = CallOptions.defaults
            options.timeout = .seconds(5)
            return try? await client.bidirectionalStreaming(
                request: request, descriptor: TunnelService.control,
                serializer: ProtobufWireSerializer<NodeControlMessage>(), deserializer: ProtobufWireDeserializer<RouterControlMessage>(),
                options: options
            ) { response in
                var inbound = response.messages.makeAsyncIterator()
                return try await inbound.next()
            }
        }
        #expect(answered == nil)
    }

    func pemToDER(_ pem: String) throws -> [UInt8] {
        let base64 = pem.split(separator: "\n").filter { !$0.hasPrefix("-----") }.joined()
        return Array(try #require(Data(base64Encoded: base64)))
    }
}
}
