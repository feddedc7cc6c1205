import EdgeMatrixCore
import Synchronization

/// Which compute nodes a router lets serve. A router admits only nodes the chain has registered as compute nodes,
/// backed by a bonded stake of that role and not retired; the set follows the chain block by block.
public protocol NodeAdmission: Sendable {
    /// nil when `nodeKey` may serve now; otherwise the refusal a dialling node is told.
    func refusal(for nodeKey: PublicKey) -> AdmissionRefusal?
    /// Waits (at most `limit`) until the admitted set has been read once, so that nodes dialling a router that has
    /// just started are judged on the registry rather than refused and sent into backoff.
    func waitUntilKnown(within limit: Duration) async
}

public struct AdmissionRefusal: Error, Equatable, Sendable, CustomStringConvertible {
    public var code: String
    public var message: String
    public init(code: String, message: String) {
        self.code = code
        self.message = message
    }
    public var description: String { "\(code): \(message)" }
}

/// The admitted set as last read from the chain. Until the first read nothing is admitted: a router that cannot
/// tell who is registered serves nobody's unregistered node.
public final class RegisteredNodes: NodeAdmission {
    struct State {
        var keys: Set<PublicKey> = []
        var height: UInt64?
    }
    /// A chain has at most this many eligible compute nodes in one router's view; more are ignored (bounded memory).
    public static let maxNodes = 100_000
    private let state = Mutex(State())
    private let changes: AsyncStream<Set<PublicKey>>.Continuation
    /// Each new admitted set, newest only: the router drops sessions of nodes that left it.
    public let updates: AsyncStream<Set<PublicKey>>

    public init() {
        (updates, changes) = AsyncStream<Set<PublicKey>>.makeStream(bufferingPolicy: .bufferingNewest(1))
    }

    /// Replaces the admitted set with the eligible compute nodes the chain reported at `height`.
    public func update(_ keys: Set<PublicKey>, height: UInt64) {
        let bounded = keys.count <= Self.maxNodes ? keys : Set(keys.prefix(Self.maxNodes))
        let changed = state.withLock { s -> Bool in
            defer { s.keys = bounded; s.height = height }
            return s.keys != bounded || s.height == nil
        }
        if changed { changes.yield(bounded) }
    }

    public var height: UInt64? { state.withLock { $0.height } }
    public func contains(_ key: PublicKey) -> Bool { state.withLock { $0.keys.contains(key) } }

    public func refusal(for nodeKey: PublicKey) -> AdmissionRefusal? {
        let (admitted, known) = state.withLock { ($0.keys.contains(nodeKey), $0.height != nil) }
        if admitted { return nil }
        guard known else {
            return AdmissionRefusal(code: "registry_unavailable", message: "the router has not read the node registry from the chain yet; retry shortly")
        }
        return AdmissionRefusal(code: "not_registered",
                                message: "node \(nodeKey.nodeID) is not an active compute node with a bonded compute stake on chain; "
                                    + "register it with `emc tx node register` (or `emc join`)")
    }

    public func waitUntilKnown(within limit: Duration) async {
        let deadline = ContinuousClock.now + limit
        while height == nil, ContinuousClock.now < deadline, !Task.isCancelled {
            try? await Task.sleep(for: .milliseconds(50))
        }
    }

    public func finish() { changes.finish() }
}
