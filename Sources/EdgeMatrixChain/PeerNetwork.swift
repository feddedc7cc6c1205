import EdgeMatrixConsensus
import EdgeMatrixCore
import EdgeMatrixNetwork
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import Metrics
import Synchronization

/// A validator this node dials: its pinned key and address from the genesis file.
public struct PeerAddress: Sendable, Hashable {
    public var key: PublicKey
    public var host: String
    public var port: Int

    public init?(key: PublicKey, endpoint: String) {
        let parts = endpoint.split(separator: ":")
        guard parts.count >= 2, let port = Int(parts.last!), (1...65535).contains(port) else { return nil }
        self.key = key
        host = parts.dropLast().joined(separator: ":")
        self.port = port
    }
}

public enum PeerError: Error, CustomStringConvertible {
    case identityMismatch(expected: NodeID, got: NodeID)
    case badSignature
    case rejected(code: String, message: String)
    case protocolViolation(String)

    public var description: String {
        switch self {
        case .identityMismatch(let expected, let got): "peer presented key of \(got), but the genesis pins \(expected)"
        case .badSignature: "peer's handshake signature does not verify"
        case .rejected(let code, let message): "peer refused us (\(code)): \(message)"
        case .protocolViolation(let what): "peer protocol violation: \(what)"
        }
    }
}

/// The outbound half of the validator mesh: one client per peer, a Gossip stream kept open with reconnects,
/// and per-peer heights learned from inbound status frames.
final class PeerNetwork: Sendable {
    let key: SigningKey
    let chainID: String
    let logger: Logger
    /// Every peer this node dials, by node id: the genesis file's and `--peers` at start, then validators the ledger
    /// registers (so a validator that joins by staking is dialled too). Bounded like the validator set.
    private let known = Mutex<[NodeID: PeerAddress]>([:])
    private let added: AsyncStream<PeerAddress>.Continuation
    private let additions: AsyncStream<PeerAddress>
    static let maxPeers = 1_000
    private let outboxes = Mutex<[NodeID: AsyncStream<PeerFrame>.Continuation]>([:])
    private let clients = Mutex<[NodeID: GRPCClient<HTTP2ClientTransport.Posix>]>([:])
    private let heights = Mutex<[NodeID: UInt64]>([:])
    /// Peers that claimed a height and did not deliver it: skipped by block sync until the time given, for a
    /// period that doubles with each failure (a Byzantine peer claiming 2^40 cannot hold a lagging node back).
    private let penalties = Mutex<[NodeID: (failures: Int, until: ContinuousClock.Instant)]>([:])

    private let syncPenalties = Counter(label: "emc_chain_sync_peer_penalties_total")

    /// This node's certificate, bound to its key; every link is mutual TLS pinned to the peer's key.
    let tls: NodeTLS

    /// A full node's network: it sends status frames only, never a consensus or transaction frame.
    let readOnly: Bool

    init(key: SigningKey, tls: NodeTLS, chainID: String, peers: [PeerAddress], readOnly: Bool = false, logger: Logger) {
        self.key = key
        self.readOnly = readOnly
        self.tls = tls
        self.chainID = chainID
        self.logger = logger
        (additions, added) = AsyncStream<PeerAddress>.makeStream()
        add(peers)
    }

    var peers: [PeerAddress] { known.withLock { Array($0.values) } }

    /// Starts dialling peers not known yet (ourselves and repeats are ignored; an address change is not followed).
    func add(_ addresses: [PeerAddress]) {
        for address in addresses where address.key != key.publicKey {
            let isNew = known.withLock { map in
                guard map[address.key.nodeID] == nil, map.count < Self.maxPeers else { return false }
                map[address.key.nodeID] = address
                return true
            }
            if isNew { added.yield(address) }
        }
    }

    var connectedCount: Int { outboxes.withLock { $0.count } }

    func broadcast(_ frame: PeerFrame) {
        if readOnly { guard case .status = frame else { return } }
        for sink in outboxes.withLock({ Array($0.values) }) { sink.yield(frame) }
    }

    func noteHeight(_ height: UInt64, of peer: NodeID) {
        heights.withLock { $0[peer] = max($0[peer] ?? 0, height) }
    }

    /// The committed height a peer last reported, if it has reported one.
    func reportedHeight(of peer: NodeID) -> UInt64? { heights.withLock { $0[peer] } }

    /// The peer with the highest reported committed height, if any is above `height`.
    func peerAhead(of height: UInt64) -> (NodeID, UInt64)? {
        heights.withLock { map in map.filter { $0.value > height }.max { $0.value < $1.value }.map { ($0.key, $0.value) } }
    }

    /// Peers to sync from, above `height` and not serving a penalty: fewest failures first, then in random order, so
    /// that sync rotates among peers instead of trusting the one that claims the most.
    func syncCandidates(above height: UInt64, now: ContinuousClock.Instant = .now) -> [(peer: NodeID, height: UInt64)] {
        let claimed = heights.withLock { map in map.filter { $0.value > height } }
        let penalties = penalties.withLock { $0 }
        return claimed.filter { (penalties[$0.key]?.until ?? now) <= now }
            .map { (peer: $0.key, height: $0.value, failures: penalties[$0.key]?.failures ?? 0, tieBreak: UInt64.random(in: 0...UInt64.max)) }
            .sorted { ($0.failures, $0.tieBreak) < ($1.failures, $1.tieBreak) }
            .map { (peer: $0.peer, height: $0.height) }
    }

    /// A peer claimed blocks it did not deliver (or delivered blocks that do not verify): forget its claim and skip
    /// it for 1 s × 2^failures, at most 5 minutes.
    func penalize(_ peer: NodeID, now: ContinuousClock.Instant = .now) {
        forgetHeight(of: peer)
        penalties.withLock { map in
            let failures = min((map[peer]?.failures ?? 0) + 1, 16)
            map[peer] = (failures, now + .seconds(min(1 << (failures - 1), 300)))
        }
        syncPenalties.increment()
        logger.warning("block sync: peer penalised", metadata: ["peer": "\(peer.short)"])
    }

    /// A peer delivered: its record is cleared.
    func credit(_ peer: NodeID) { _ = penalties.withLock { $0.removeValue(forKey: peer) } }

    func forgetHeight(of peer: NodeID) { heights.withLock { $0[peer] = nil } }

    /// Runs every peer's client, including peers added later, until cancelled. The additions stream holds every
    /// peer ever added (those from init first), so one loop starts them all.
    func run() async {
        await withDiscardingTaskGroup { group in
            for await peer in additions {  // ends when the task is cancelled
                group.addTask { await self.runPeer(peer) }
            }
        }
    }

    private func runPeer(_ peer: PeerAddress) async {
        let transport: HTTP2ClientTransport.Posix
        do {
            transport = try HTTP2ClientTransport.Posix(
                target: peerTarget(host: peer.host, port: peer.port),
                transportSecurity: tls.clientSecurity(pinned: peer.key),
                config: .defaults { $0.backoff = .init(initial: .milliseconds(100), max: .seconds(1), multiplier: 2, jitter: 0.2) }
            )
        } catch {
            logger.error("cannot create peer transport", metadata: ["peer": "\(peer.host):\(peer.port)", "error": "\(error)"])
            return
        }
        let client = GRPCClient(transport: transport)
        let id = peer.key.nodeID
        clients.withLock { $0[id] = client }
        await withDiscardingTaskGroup { group in
            group.addTask { try? await client.runConnections() }
            var failures = 0
            while !Task.isCancelled {
                let started = ContinuousClock.now
                do {
                    try await session(client, peer: peer)
                } catch is CancellationError {
                    break
                } catch {
                    if Task.isCancelled { break }
                    if failures == 0 || failures % 20 == 0 {
                        logger.info("peer link down", metadata: ["peer": "\(id.short)", "address": "\(peer.host):\(peer.port)", "error": "\(error)"])
                    }
                }
                if ContinuousClock.now - started > .seconds(10) { failures = 0 }
                failures += 1
                let base = min(100 * (1 << min(failures - 1, 4)), 1_000)
                try? await Task.sleep(for: .milliseconds(base / 2 + Int.random(in: 0...(base / 2))))
            }
            client.beginGracefulShutdown()
        }
        clients.withLock { $0[id] = nil }
    }

    private func session(_ client: GRPCClient<HTTP2ClientTransport.Posix>, peer: PeerAddress) async throws {
        let (outbound, sink) = AsyncStream<PeerFrame>.makeStream(bufferingPolicy: .bufferingNewest(50_000))
        let nonce = PeerHandshake.randomNonce()
        sink.yield(.hello(nodeKey: key.publicKey, nonce: nonce, chainID: chainID))
        let request = StreamingClientRequest<PeerFrame> { writer in
            for await frame in outbound { try await writer.write(frame) }
        }
        let id = peer.key.nodeID
        defer {
            sink.finish()
            outboxes.withLock { if $0[id] != nil { $0[id] = nil } }
            forgetHeight(of: id)
        }
        try await client.bidirectionalStreaming(
            request: request, descriptor: PeerService.gossip,
            serializer: ProtobufWireSerializer<PeerFrame>(), deserializer: ProtobufWireDeserializer<PeerFrame>(),
            options: .defaults
        ) { [self] response in
            var inbound = response.messages.makeAsyncIterator()
            guard case .challenge(let serverKey, let serverNonce, let signature)? = try await inbound.next() else {
                throw PeerError.protocolViolation("expected a challenge")
            }
            guard serverKey == peer.key else { throw PeerError.identityMismatch(expected: id, got: serverKey.nodeID) }
            let serverTranscript = PeerHandshake.transcript(role: "server", chainID: chainID, clientKey: key.publicKey,
                                                            clientNonce: nonce, serverKey: serverKey, serverNonce: serverNonce)
            guard serverKey.isValidSignature(signature, for: serverTranscript, domain: .peerHandshake) else {
                throw PeerError.badSignature
            }
            let clientTranscript = PeerHandshake.transcript(role: "client", chainID: chainID, clientKey: key.publicKey,
                                                            clientNonce: nonce, serverKey: serverKey, serverNonce: serverNonce)
            sink.yield(.auth(signature: key.sign(clientTranscript, domain: .peerHandshake)))
            switch try await inbound.next() {
            case .accepted?: break
            case .rejected(let code, let message)?: throw PeerError.rejected(code: code, message: message)
            default: throw PeerError.protocolViolation("expected accepted or rejected")
            }
            outboxes.withLock { $0[id] = sink }
            logger.info("peer link up", metadata: ["peer": "\(id.short)", "address": "\(peer.host):\(peer.port)"])
            while let frame = try await inbound.next() {
                if case .status(let height) = frame { noteHeight(height, of: id) }
            }
            throw PeerError.protocolViolation("peer closed the stream")
        }
    }

    /// Committed blocks from a peer (block sync).
    func fetchBlocks(from peer: NodeID, start: UInt64, limit: UInt32) async throws -> BlockRangeResponse? {
        guard let client = clients.withLock({ $0[peer] }) else { return nil }
        var options = CallOptions.defaults
        options.maxResponseMessageBytes = PeerService.maxMessageBytes
        options.timeout = .seconds(10)
        return try await client.unary(
            request: ClientRequest(message: BlockRangeRequest(from: start, limit: limit)), descriptor: PeerService.getBlocks,
            serializer: ProtobufWireSerializer<BlockRangeRequest>(), deserializer: ProtobufWireDeserializer<BlockRangeResponse>(),
            options: options
        ) { try $0.message }
    }
}

/// The inbound half: authenticates dialing peers and hands validators' frames to the node. A TLS-bound key that the
/// chain does not admit as a validator is served read-only (`ReadOnlyPeers`): status frames and rate-limited
/// `GetBlocks`; its consensus and transaction frames end its stream and reach nothing.
struct PeerEndpoint: RegistrableRPCService {
    let key: SigningKey
    let chainID: String
    /// Whether the chain admits a key as a validator peer now (full service).
    let isValidatorPeer: @Sendable (PublicKey) -> Bool
    let readOnly: ReadOnlyPeers
    let onFrame: @Sendable (NodeID, PeerFrame) -> Void
    let blocks: @Sendable (BlockRangeRequest, _ maxBlocks: Int) throws -> BlockRangeResponse
    let statusFrame: @Sendable () -> PeerFrame
    let logger: Logger
    /// A peer sending more frames than this in one second is cut off: the consensus loop's input must not grow
    /// without bound because one validator floods it (honest gossip at full load stays far below).
    var maxFramesPerSecond: Int

    func registerMethods<Transport: ServerTransport>(with router: inout RPCRouter<Transport>) {
        router.registerHandler(
            forMethod: PeerService.gossip,
            deserializer: ProtobufWireDeserializer<PeerFrame>(),
            serializer: ProtobufWireSerializer<PeerFrame>()
        ) { request, context in
            StreamingServerResponse { writer in
                try await gossip(request.messages, writer: writer, tlsKey: NodeTLS.boundKey(of: context))
                return [:]
            }
        }
        router.registerHandler(
            forMethod: PeerService.getBlocks,
            deserializer: ProtobufWireDeserializer<BlockRangeRequest>(),
            serializer: ProtobufWireSerializer<BlockRangeResponse>()
        ) { request, context in
            let message = try await ServerRequest(stream: request).message
            return StreamingServerResponse(single: ServerResponse(message: try getBlocks(message, tlsKey: NodeTLS.boundKey(of: context))))
        }
    }

    /// A validator gets up to 200 blocks; a read-only key gets `maxBlocksPerCall`, within its bucket and the bound on
    /// read-only calls in flight, or `RESOURCE_EXHAUSTED` with the refusal's code.
    func getBlocks(_ request: BlockRangeRequest, tlsKey: PublicKey?) throws -> BlockRangeResponse {
        guard let tlsKey else { throw RPCError(code: .unauthenticated, message: "no client certificate bound to a node key") }
        if isValidatorPeer(tlsKey) { return try blocks(request, 200) }
        let peer = tlsKey.nodeID
        do { try readOnly.beginCall(peer) } catch {
            logger.debug("read-only GetBlocks refused", metadata: ["peer": "\(peer.short)", "code": "\(error.code)"])
            throw RPCError(code: .resourceExhausted, message: error.description)
        }
        defer { readOnly.endCall(peer) }
        return try blocks(request, readOnly.limits.maxBlocksPerCall)
    }

    private func gossip(_ messages: RPCAsyncSequence<PeerFrame, any Error>, writer: RPCWriter<PeerFrame>, tlsKey: PublicKey?) async throws {
        var inbound = messages.makeAsyncIterator()
        guard case .hello(let clientKey, let clientNonce, let theirChain)? = try await inbound.next(),
              clientNonce.count == PeerHandshake.nonceLength else {
            throw RPCError(code: .invalidArgument, message: "the first frame must be hello with a 32-byte nonce")
        }
        func reject(_ code: String, _ message: String, status: RPCError.Code = .permissionDenied) async throws -> Never {
            logger.warning("peer refused", metadata: ["peer": "\(clientKey.nodeID.short)", "code": "\(code)", "reason": "\(message)"])
            try? await writer.write(.rejected(code: code, message: message))
            throw RPCError(code: status, message: "\(code): \(message)")
        }
        guard theirChain == chainID else { try await reject("wrong_chain", "this is chain '\(chainID)', not '\(theirChain)'") }
        let serverNonce = PeerHandshake.randomNonce()
        let serverTranscript = PeerHandshake.transcript(role: "server", chainID: chainID, clientKey: clientKey,
                                                        clientNonce: clientNonce, serverKey: key.publicKey, serverNonce: serverNonce)
        try await writer.write(.challenge(nodeKey: key.publicKey, nonce: serverNonce,
                                          signature: key.sign(serverTranscript, domain: .peerHandshake)))
        guard case .auth(let signature)? = try await inbound.next() else {
            try await reject("bad_auth", "expected auth after the challenge")
        }
        let clientTranscript = PeerHandshake.transcript(role: "client", chainID: chainID, clientKey: clientKey,
                                                        clientNonce: clientNonce, serverKey: key.publicKey, serverNonce: serverNonce)
        guard clientKey.isValidSignature(signature, for: clientTranscript, domain: .peerHandshake) else {
            try await reject("bad_signature", "handshake signature does not verify for key \(clientKey.hex)")
        }
        // The key of the handshake is the key of the TLS certificate: one identity per link.
        guard tlsKey == clientKey else {
            try await reject("key_mismatch", "the hello's key \(clientKey.nodeID) is not the key the TLS certificate is bound to")
        }
        let peer = clientKey.nodeID
        let isValidator = isValidatorPeer(clientKey)
        if !isValidator {
            do { try readOnly.openStream(peer) } catch { try await reject(error.code, error.message, status: .resourceExhausted) }
        }
        defer { if !isValidator { readOnly.closeStream(peer) } }
        try await writer.write(.accepted)
        if !isValidator { logger.debug("read-only peer connected", metadata: ["peer": "\(peer.short)"]) }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                while true {
                    try await writer.write(statusFrame())
                    try await Task.sleep(for: .milliseconds(500))
                }
            }
            var windowStart = ContinuousClock.now
            var framesInWindow = 0
            while let frame = try await inbound.next() {
                framesInWindow += 1
                if framesInWindow > maxFramesPerSecond {
                    let now = ContinuousClock.now
                    if now - windowStart < .seconds(1) {
                        logger.warning("peer cut off: frame flood", metadata: ["peer": "\(peer.short)", "limit": "\(maxFramesPerSecond)/s"])
                        Counter(label: "emc_chain_peer_disconnects_total", dimensions: [("reason", "flood")]).increment()
                        throw RPCError(code: .resourceExhausted, message: "more than \(maxFramesPerSecond) frames in one second")
                    }
                    windowStart = now
                    framesInWindow = 1
                }
                switch frame {
                case .consensus, .tx, .status:
                    if isValidator { onFrame(peer, frame); continue }
                    // Read-only: its status is not a sync source for validators (it serves no GetBlocks), and
                    // nothing else it sends may reach the consensus loop or the mempool.
                    let refusal: ReadOnlyRefusal
                    switch frame {
                    case .consensus: refusal = .consensusFrame
                    case .tx: refusal = .transactionFrame
                    default: continue
                    }
                    readOnly.record(refusal)
                    logger.warning("read-only peer cut off", metadata: ["peer": "\(peer.short)", "code": "\(refusal.code)"])
                    throw RPCError(code: .permissionDenied, message: refusal.description)
                default: throw RPCError(code: .failedPrecondition, message: "handshake frame after the handshake")
                }
            }
            group.cancelAll()
        }
    }
}
