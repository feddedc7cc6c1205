import EdgeMatrixCore
import EdgeMatrixNetwork
import Logging
import Metrics

/// Which nodes may serve a request.
public enum WorkRoute: Sendable, Equatable {
    /// An OpenAI-compatible model, on any node with a healthy `openai` app serving it.
    case model(String)
    /// A named app (pass-through `/v1/apps/{app}/...`).
    case app(String)
}

public enum AssignmentError: Error, Equatable, Sendable {
    /// No connected node serves this model or app at all.
    case notServed
    /// Nodes serve it, but none has a free slot right now.
    case noCapacity
}

/// How a wait for a free slot ended.
public enum SlotWait: Sendable {
    case assigned(WorkJob)
    /// The deadline passed first.
    case timedOut
    /// Too many requests (or bytes) are already waiting: the caller should answer 429.
    case queueFull
    /// No connected node serves the route any more (or the waiting request was cancelled).
    case notServed
}

/// Limits that keep the router's memory bounded whatever nodes and clients do.
public struct PoolLimits: Sendable, Equatable {
    /// Connected compute nodes; registrations beyond this are refused.
    public var maxSessions: Int
    /// Requests waiting for a free slot, in arrival order.
    public var maxWaiters: Int
    /// Request-body bytes held by waiting requests.
    public var maxWaitingBytes: Int
    /// Nodes that get their own `node` label on per-node metrics (labels are never created without bound).
    public var maxLabelledNodes: Int
    /// How long a node that broke the protocol is refused before it may register again.
    public var misbehaviourCooldownMs: UInt64
    /// A registered node that sends nothing on its control stream for this long is dropped: an honest node sends a
    /// status every 2 s, so silence means it froze, hung or lost its network without closing the connection.
    public var heartbeatTimeoutMs: UInt64
    /// Tunnel streams one IP address may hold open before they authenticate (see `PendingStreams`).
    public var maxPendingStreamsPerAddress: Int

    public init(maxSessions: Int = 1024, maxWaiters: Int = 512, maxWaitingBytes: Int = 256 << 20, maxLabelledNodes: Int = 256,
                misbehaviourCooldownMs: UInt64 = 10_000, heartbeatTimeoutMs: UInt64 = 15_000, maxPendingStreamsPerAddress: Int = 64) {
        self.maxSessions = maxSessions
        self.maxWaiters = maxWaiters
        self.maxWaitingBytes = maxWaitingBytes
        self.maxLabelledNodes = maxLabelledNodes
        self.misbehaviourCooldownMs = misbehaviourCooldownMs
        self.heartbeatTimeoutMs = heartbeatTimeoutMs
        self.maxPendingStreamsPerAddress = maxPendingStreamsPerAddress
    }
}

/// The live compute nodes connected to this router: their registrations, idle Work streams and measured quality.
/// All mutable routing state lives here, behind one actor.
public actor NodePool {
    struct Session {
        var number: UInt64
        var key: PublicKey
        var descriptor: NodeDescriptor
        var token: [UInt8]
        var healthyApps: Set<String>
        /// Ends the node's control stream when the router drops the node.
        var evict: AsyncStream<String>.Continuation
        var idle: [(slot: UInt64, continuation: CheckedContinuation<WorkJob?, Never>)] = []
        var inFlight = 0
        var quality = NodeQuality.fresh
    }

    struct Waiter {
        var id: UInt64
        var route: WorkRoute
        var excluding: Set<NodeID>
        var eligible: Set<NodeID>?
        var bodyBytes: Int
        var makeRequest: @Sendable (_ appName: String) -> WorkRequest
        var continuation: CheckedContinuation<SlotWait, Never>
        var timer: Task<Void, Never>?
    }

    public struct NodeSummary: Sendable, Equatable {
        public var nodeID: NodeID
        public var apps: [AppDescriptor]
        public var capacity: Int
        public var inFlight: Int
        public var idleSlots: Int
        public var quality: NodeQuality
    }

    public enum Registration: Sendable, Equatable {
        case accepted(token: [UInt8], number: UInt64)
        case full
        case coolingDown
    }

    public let limits: PoolLimits
    private var sessions: [NodeID: Session] = [:]
    private var tokens: [[UInt8]: NodeID] = [:]
    private var waiters: [Waiter] = []
    private var waitingBytes = 0
    private var nextWaiterID: UInt64 = 0
    /// Nodes refused until the given time (ms) after misbehaving; bounded by `maxSessions`.
    private var penalised: [NodeID: UInt64] = [:]
    private var labelled: Set<NodeID> = []
    private var selector: NodeSelector
    private var nextNumber: UInt64 = 0
    private let clock = ContinuousClock()
    private let epoch: ContinuousClock.Instant
    private let logger: Logger

    public init(seed: UInt64, limits: PoolLimits = PoolLimits(), logger: Logger = Logger(label: "emc.router.pool")) {
        selector = NodeSelector(seed: seed)
        epoch = clock.now
        self.limits = limits
        self.logger = logger
    }

    /// Monotonic milliseconds since the pool started.
    public nonisolated func nowMs() -> UInt64 {
        let elapsed = ContinuousClock().now - epoch
        return UInt64(max(0, elapsed.components.seconds)) * 1000 + UInt64(max(0, elapsed.components.attoseconds) / 1_000_000_000_000_000)
    }

    /// Registers a node whose key proof has been checked; a node re-registering replaces its old session.
    func register(key: PublicKey, descriptor: NodeDescriptor, evict: AsyncStream<String>.Continuation) -> Registration {
        let nodeID = key.nodeID
        let now = nowMs()
        if let until = penalised[nodeID] {
            if until > now { return .coolingDown }
            penalised[nodeID] = nil
        }
        if let old = sessions[nodeID] {
            close(nodeID, old)
        } else if sessions.count >= limits.maxSessions {
            return .full
        }
        nextNumber += 1
        let token = TunnelHandshake.randomNonce()
        let healthy = Set(descriptor.apps.filter(\.healthy).map(\.name))
        sessions[nodeID] = Session(number: nextNumber, key: key, descriptor: descriptor, token: token, healthyApps: healthy,
                                   evict: evict)
        tokens[token] = nodeID
        if labelled.count < limits.maxLabelledNodes { labelled.insert(nodeID) }
        Gauge(label: "emc_router_nodes").record(sessions.count)
        logger.info("compute node registered", metadata: ["node": "\(nodeID.short)", "apps": "\(descriptor.apps.map(\.name))",
                                                           "capacity": "\(descriptor.maxConcurrent)"])
        serveWaiters()
        return .accepted(token: token, number: nextNumber)
    }

    /// Removes a session when its control stream ends; idle Work streams are released.
    func unregister(nodeID: NodeID, number: UInt64) {
        guard let session = sessions[nodeID], session.number == number else { return }
        close(nodeID, session)
        logger.info("compute node disconnected", metadata: ["node": "\(nodeID.short)"])
    }

    /// Drops a node that broke the protocol: its control stream is ended and it may not register again for a while.
    func evict(nodeID: NodeID, number: UInt64, reason: String) {
        if penalised.count >= limits.maxSessions {
            let now = nowMs()
            penalised = penalised.filter { $0.value > now }
            if penalised.count >= limits.maxSessions, let oldest = penalised.min(by: { $0.value < $1.value })?.key {
                penalised[oldest] = nil
            }
        }
        penalised[nodeID] = nowMs() + limits.misbehaviourCooldownMs
        guard let session = sessions[nodeID], session.number == number else { return }
        session.evict.yield(reason)
        close(nodeID, session)
        logger.warning("compute node evicted", metadata: ["node": "\(nodeID.short)", "reason": "\(reason)"])
    }

    /// Drops every node whose key is not in `admitted` (retired or slashed on chain, say): its control stream ends
    /// and its idle Work streams are released. Not misbehaviour, so no cooldown. Returns how many were dropped.
    @discardableResult
    public func retain(admitted: Set<PublicKey>, reason: String = "no longer admitted") -> Int {
        var dropped = 0
        for (nodeID, session) in sessions where !admitted.contains(session.key) {
            session.evict.yield(reason)
            close(nodeID, session)
            dropped += 1
            logger.info("compute node dropped", metadata: ["node": "\(nodeID.short)", "reason": "\(reason)"])
        }
        return dropped
    }

    private func close(_ nodeID: NodeID, _ session: Session) {
        sessions[nodeID] = nil
        tokens[session.token] = nil
        for entry in session.idle { entry.continuation.resume(returning: nil) }
        session.evict.finish()
        if labelled.remove(nodeID) != nil {
            // Destroyed, not zeroed: a departed node's label must not stay in the registry for ever.
            Gauge(label: "emc_router_node_inflight", dimensions: [("node", nodeID.short)]).destroy()
        }
        Gauge(label: "emc_router_nodes").record(sessions.count)
        serveWaiters()
    }

    private func recordInFlight(_ nodeID: NodeID) {
        guard labelled.contains(nodeID), let inFlight = sessions[nodeID]?.inFlight else { return }
        Gauge(label: "emc_router_node_inflight", dimensions: [("node", nodeID.short)]).record(inFlight)
    }

    func updateStatus(nodeID: NodeID, healthyApps: [String]) {
        guard var session = sessions[nodeID] else { return }
        // Only apps the node registered count (and are kept): a heartbeat cannot add names or memory.
        session.healthyApps = Set(session.descriptor.apps.map(\.name)).intersection(healthyApps)
        sessions[nodeID] = session
        serveWaiters()
    }

    /// The session a Work stream's token belongs to.
    func authenticate(token: [UInt8]) -> (nodeID: NodeID, key: PublicKey, number: UInt64)? {
        guard let nodeID = tokens[token], let session = sessions[nodeID] else { return nil }
        return (nodeID, session.key, session.number)
    }

    /// A Work stream offers one unit of capacity and waits for a job; nil when the session ends.
    func offerSlot(nodeID: NodeID, number: UInt64, slot: UInt64) async -> WorkJob? {
        await withCheckedContinuation { continuation in
            guard var session = sessions[nodeID], session.number == number,
                  session.idle.count < Int(session.descriptor.maxConcurrent) else {
                // An unknown session, or a node opening more Work streams than the capacity it declared.
                return continuation.resume(returning: nil)
            }
            session.idle.append((slot, continuation))
            sessions[nodeID] = session
            serveWaiters()
        }
    }

    /// Withdraws an idle slot whose stream went away.
    func withdrawSlot(nodeID: NodeID, slot: UInt64) {
        guard var session = sessions[nodeID], let index = session.idle.firstIndex(where: { $0.slot == slot }) else { return }
        let entry = session.idle.remove(at: index)
        sessions[nodeID] = session
        entry.continuation.resume(returning: nil)
    }

    /// A job finished on a node (whatever the outcome): its capacity is back once the node reopens a stream.
    func finished(nodeID: NodeID, number: UInt64) {
        guard var session = sessions[nodeID], session.number == number else { return }
        session.inFlight = max(0, session.inFlight - 1)
        sessions[nodeID] = session
        recordInFlight(nodeID)
    }

    private func appName(of session: Session, for route: WorkRoute) -> String? {
        switch route {
        case .model(let model):
            session.descriptor.apps.first { $0.kind == .openai && session.healthyApps.contains($0.name) && $0.models.contains(model) }?.name
        case .app(let name):
            session.descriptor.apps.first { $0.name == name && session.healthyApps.contains(name) }?.name
        }
    }

    /// Every connected node that serves the route now (whatever its free capacity), with the app that serves it.
    public func servers(of route: WorkRoute) -> [NodeID: String] {
        var servers = [NodeID: String]()
        for (nodeID, session) in sessions {
            if let app = appName(of: session, for: route) { servers[nodeID] = app }
        }
        return servers
    }

    /// Picks a node for the route (never one in `excluding`; only one in `eligible` when given: those whose prices
    /// the request's admission accepted) and hands it the request built for that node's app.
    public func assign(route: WorkRoute, excluding: Set<NodeID>, eligible: Set<NodeID>? = nil,
                       makeRequest: (_ appName: String) -> WorkRequest) -> Result<WorkJob, AssignmentError> {
        var candidates = [Candidate]()
        var apps = [NodeID: String]()
        for (nodeID, session) in sessions where !excluding.contains(nodeID) && eligible?.contains(nodeID) != false {
            guard let app = appName(of: session, for: route) else { continue }
            apps[nodeID] = app
            candidates.append(Candidate(nodeID: nodeID, quality: session.quality, inFlight: session.inFlight,
                                        capacity: Int(session.descriptor.maxConcurrent), idleSlots: session.idle.count))
        }
        guard !candidates.isEmpty else { return .failure(.notServed) }
        guard let chosen = selector.choose(from: candidates, nowMs: nowMs()), let app = apps[chosen],
              var session = sessions[chosen], !session.idle.isEmpty else {
            return .failure(.noCapacity)
        }
        let entry = session.idle.removeFirst()
        session.inFlight += 1
        sessions[chosen] = session
        recordInFlight(chosen)
        let job = WorkJob(request: makeRequest(app), nodeID: chosen)
        entry.continuation.resume(returning: job)
        return .success(job)
    }

    /// Waits, first come first served, for a slot on a node serving the route, up to `timeoutMs`. The queue is
    /// bounded in requests and in body bytes; a full queue answers at once.
    public func waitForSlot(route: WorkRoute, excluding: Set<NodeID>, eligible: Set<NodeID>? = nil, bodyBytes: Int, timeoutMs: UInt64,
                            makeRequest: @escaping @Sendable (_ appName: String) -> WorkRequest) async -> SlotWait {
        nextWaiterID += 1
        let id = nextWaiterID
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<SlotWait, Never>) in
                // The pool may have changed since the caller's own attempt.
                switch assign(route: route, excluding: excluding, eligible: eligible, makeRequest: makeRequest) {
                case .success(let job): return continuation.resume(returning: .assigned(job))
                case .failure(.notServed): return continuation.resume(returning: .notServed)
                case .failure(.noCapacity): break
                }
                guard waiters.count < limits.maxWaiters, waitingBytes + bodyBytes <= limits.maxWaitingBytes else {
                    Counter(label: "emc_router_queue_rejections_total").increment()
                    return continuation.resume(returning: .queueFull)
                }
                let timer = Task { [weak self] in
                    try? await Task.sleep(for: .milliseconds(timeoutMs))
                    await self?.endWait(id, with: .timedOut)
                }
                waiters.append(Waiter(id: id, route: route, excluding: excluding, eligible: eligible, bodyBytes: bodyBytes, makeRequest: makeRequest,
                                      continuation: continuation, timer: timer))
                waitingBytes += bodyBytes
                Gauge(label: "emc_router_queue_waiting").record(waiters.count)
            }
        } onCancel: {
            Task { await self.endWait(id, with: .notServed) }
        }
    }

    private func endWait(_ id: UInt64, with outcome: SlotWait) {
        guard let index = waiters.firstIndex(where: { $0.id == id }) else { return }
        let waiter = waiters.remove(at: index)
        waitingBytes -= waiter.bodyBytes
        Gauge(label: "emc_router_queue_waiting").record(waiters.count)
        waiter.timer?.cancel()
        waiter.continuation.resume(returning: outcome)
    }

    /// Hands free slots to waiting requests in arrival order; a waiter whose route nobody serves any more is released.
    private func serveWaiters() {
        guard !waiters.isEmpty else { return }
        var index = 0
        while index < waiters.count {
            let waiter = waiters[index]
            switch assign(route: waiter.route, excluding: waiter.excluding, eligible: waiter.eligible, makeRequest: waiter.makeRequest) {
            case .success(let job):
                endWait(waiter.id, with: .assigned(job))
            case .failure(.notServed):
                endWait(waiter.id, with: .notServed)
            case .failure(.noCapacity):
                index += 1
            }
        }
    }

    public func recordSuccess(nodeID: NodeID, latencyMs: Double) {
        sessions[nodeID]?.quality.recordSuccess(latencyMs: latencyMs)
    }

    public func recordFailure(nodeID: NodeID) {
        sessions[nodeID]?.quality.recordFailure(nowMs: nowMs())
    }

    /// Every model served by a healthy openai app on a connected node, sorted.
    public func liveModels() -> [String] {
        var models = Set<String>()
        for session in sessions.values {
            for app in session.descriptor.apps where app.kind == .openai && session.healthyApps.contains(app.name) {
                models.formUnion(app.models)
            }
        }
        return models.sorted()
    }

    public func summaries() -> [NodeSummary] {
        sessions.map { id, s in
            NodeSummary(nodeID: id, apps: s.descriptor.apps, capacity: Int(s.descriptor.maxConcurrent), inFlight: s.inFlight,
                        idleSlots: s.idle.count, quality: s.quality)
        }.sorted { $0.nodeID < $1.nodeID }
    }
}
