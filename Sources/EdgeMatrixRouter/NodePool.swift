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

/// The live compute nodes connected to this router: their registrations, idle Work streams and measured quality.
/// All mutable routing state lives here, behind one actor.
public actor NodePool {
    struct Session {
        var number: UInt64
        var key: PublicKey
        var descriptor: NodeDescriptor
        var token: [UInt8]
        var healthyApps: Set<String>
        var idle: [(slot: UInt64, continuation: CheckedContinuation<WorkJob?, Never>)] = []
        var inFlight = 0
        var quality = NodeQuality.fresh
    }

    public struct NodeSummary: Sendable, Equatable {
        public var nodeID: NodeID
        public var apps: [AppDescriptor]
        public var capacity: Int
        public var inFlight: Int
        public var idleSlots: Int
        public var quality: NodeQuality
    }

    private var sessions: [NodeID: Session] = [:]
    private var tokens: [[UInt8]: NodeID] = [:]
    private var selector: NodeSelector
    private var nextNumber: UInt64 = 0
    private let clock = ContinuousClock()
    private let epoch: ContinuousClock.Instant
    private let logger: Logger

    public init(seed: UInt64, logger: Logger = Logger(label: "emc.router.pool")) {
        selector = NodeSelector(seed: seed)
        epoch = clock.now
        self.logger = logger
    }

    /// Monotonic milliseconds since the pool started.
    public nonisolated func nowMs() -> UInt64 {
        let elapsed = ContinuousClock().now - epoch
        return UInt64(max(0, elapsed.components.seconds)) * 1000 + UInt64(elapsed.components.attoseconds / 1_000_000_000_000_000)
    }

    /// Registers a node whose key proof has been checked; a node re-registering replaces its old session.
    func register(key: PublicKey, descriptor: NodeDescriptor) -> (token: [UInt8], number: UInt64) {
        let nodeID = key.nodeID
        if let old = sessions[nodeID] { close(nodeID, old) }
        nextNumber += 1
        let token = TunnelHandshake.randomNonce()
        let healthy = Set(descriptor.apps.filter(\.healthy).map(\.name))
        sessions[nodeID] = Session(number: nextNumber, key: key, descriptor: descriptor, token: token, healthyApps: healthy)
        tokens[token] = nodeID
        logger.info("compute node registered", metadata: ["node": "\(nodeID.short)", "apps": "\(descriptor.apps.map(\.name))",
                                                           "capacity": "\(descriptor.maxConcurrent)"])
        return (token, nextNumber)
    }

    /// Removes a session when its control stream ends; idle Work streams are released.
    func unregister(nodeID: NodeID, number: UInt64) {
        guard let session = sessions[nodeID], session.number == number else { return }
        close(nodeID, session)
        logger.info("compute node disconnected", metadata: ["node": "\(nodeID.short)"])
    }

    private func close(_ nodeID: NodeID, _ session: Session) {
        sessions[nodeID] = nil
        tokens[session.token] = nil
        for entry in session.idle { entry.continuation.resume(returning: nil) }
        Gauge(label: "emc_router_node_inflight", dimensions: [("node", nodeID.short)]).record(0)
    }

    func updateStatus(nodeID: NodeID, healthyApps: [String]) {
        sessions[nodeID]?.healthyApps = Set(healthyApps)
    }

    /// The session a Work stream's token belongs to.
    func authenticate(token: [UInt8]) -> (nodeID: NodeID, key: PublicKey, number: UInt64)? {
        guard let nodeID = tokens[token], let session = sessions[nodeID] else { return nil }
        return (nodeID, session.key, session.number)
    }

    /// A Work stream offers one unit of capacity and waits for a job; nil when the session ends.
    func offerSlot(nodeID: NodeID, number: UInt64, slot: UInt64) async -> WorkJob? {
        await withCheckedContinuation { continuation in
            guard sessions[nodeID]?.number == number else { return continuation.resume(returning: nil) }
            sessions[nodeID]!.idle.append((slot, continuation))
        }
    }

    /// Withdraws an idle slot whose stream went away.
    func withdrawSlot(nodeID: NodeID, slot: UInt64) {
        guard let index = sessions[nodeID]?.idle.firstIndex(where: { $0.slot == slot }) else { return }
        let entry = sessions[nodeID]!.idle.remove(at: index)
        entry.continuation.resume(returning: nil)
    }

    /// A job finished on a node (whatever the outcome): its capacity is back once the node reopens a stream.
    func finished(nodeID: NodeID, number: UInt64) {
        guard sessions[nodeID]?.number == number else { return }
        sessions[nodeID]!.inFlight -= 1
        Gauge(label: "emc_router_node_inflight", dimensions: [("node", nodeID.short)]).record(sessions[nodeID]!.inFlight)
    }

    private func appName(of session: Session, for route: WorkRoute) -> String? {
        switch route {
        case .model(let model):
            session.descriptor.apps.first { $0.kind == .openai && session.healthyApps.contains($0.name) && $0.models.contains(model) }?.name
        case .app(let name):
            session.descriptor.apps.first { $0.name == name && session.healthyApps.contains(name) }?.name
        }
    }

    /// Picks a node for the route (never one in `excluding`) and hands it the request built for that node's app.
    public func assign(route: WorkRoute, excluding: Set<NodeID>,
                       makeRequest: (_ appName: String) -> WorkRequest) -> Result<WorkJob, AssignmentError> {
        var candidates = [Candidate]()
        var apps = [NodeID: String]()
        for (nodeID, session) in sessions where !excluding.contains(nodeID) {
            guard let app = appName(of: session, for: route) else { continue }
            apps[nodeID] = app
            candidates.append(Candidate(nodeID: nodeID, quality: session.quality, inFlight: session.inFlight,
                                        capacity: Int(session.descriptor.maxConcurrent), idleSlots: session.idle.count))
        }
        guard !candidates.isEmpty else { return .failure(.notServed) }
        guard let chosen = selector.choose(from: candidates, nowMs: nowMs()), let app = apps[chosen] else {
            return .failure(.noCapacity)
        }
        let entry = sessions[chosen]!.idle.removeFirst()
        sessions[chosen]!.inFlight += 1
        Gauge(label: "emc_router_node_inflight", dimensions: [("node", chosen.short)]).record(sessions[chosen]!.inFlight)
        let job = WorkJob(request: makeRequest(app), nodeID: chosen)
        entry.continuation.resume(returning: job)
        return .success(job)
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
