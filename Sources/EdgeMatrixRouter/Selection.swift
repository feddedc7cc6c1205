import EdgeMatrixCore

/// Measured quality of one node, as the router sees it.
public struct NodeQuality: Sendable, Equatable {
    /// Exponentially weighted moving average of time to first byte, in milliseconds.
    public var latencyEWMAms: Double
    /// EWMA of success (1) / failure (0).
    public var successRate: Double
    public var consecutiveFailures: Int
    /// Monotonic milliseconds until which the node is backed off after failures.
    public var backoffUntil: UInt64

    public init(latencyEWMAms: Double, successRate: Double, consecutiveFailures: Int, backoffUntil: UInt64) {
        self.latencyEWMAms = latencyEWMAms
        self.successRate = successRate
        self.consecutiveFailures = consecutiveFailures
        self.backoffUntil = backoffUntil
    }

    public static let fresh = NodeQuality(latencyEWMAms: 50, successRate: 1, consecutiveFailures: 0, backoffUntil: 0)
    static let alpha = 0.2

    public mutating func recordSuccess(latencyMs: Double) {
        latencyEWMAms += Self.alpha * (latencyMs - latencyEWMAms)
        successRate += Self.alpha * (1 - successRate)
        consecutiveFailures = 0
        backoffUntil = 0
    }

    /// Backs the node off exponentially: 250 ms, 500 ms, ... up to 30 s.
    public mutating func recordFailure(nowMs: UInt64) {
        successRate += Self.alpha * (0 - successRate)
        consecutiveFailures += 1
        let delay = min(UInt64(250) << UInt64(min(consecutiveFailures - 1, 7)), 30_000)
        backoffUntil = nowMs + delay
    }
}

/// A node that could take a request, with what selection needs to know.
public struct Candidate: Sendable, Equatable {
    public var nodeID: NodeID
    public var quality: NodeQuality
    public var inFlight: Int
    public var capacity: Int
    public var idleSlots: Int

    public init(nodeID: NodeID, quality: NodeQuality, inFlight: Int, capacity: Int, idleSlots: Int) {
        self.nodeID = nodeID
        self.quality = quality
        self.inFlight = inFlight
        self.capacity = capacity
        self.idleSlots = idleSlots
    }

    /// Lower is better: slow, failing or busy nodes cost more.
    public var cost: Double {
        let load = Double(inFlight + 1) / Double(max(capacity, 1))
        return (quality.latencyEWMAms + 1) * (1 + 4 * load) / max(quality.successRate, 0.05)
    }
}

/// Power of two choices: sample two distinct candidates at random and take the cheaper. This spreads load
/// like least-loaded selection without herding every router onto the same "best" node, and the randomness
/// (from a seedable source) means no caller can steer traffic to a node.
public struct NodeSelector: Sendable {
    private var random: SeededRandom

    public init(seed: UInt64) { random = SeededRandom(seed: seed) }

    /// Chooses among nodes with free capacity; nodes in failure backoff are used only when nothing else is free.
    public mutating func choose(from candidates: [Candidate], nowMs: UInt64) -> NodeID? {
        let free = candidates.filter { $0.idleSlots > 0 }.sorted { $0.nodeID < $1.nodeID }
        let healthy = free.filter { $0.quality.backoffUntil <= nowMs }
        let pool = healthy.isEmpty ? free : healthy
        switch pool.count {
        case 0: return nil
        case 1: return pool[0].nodeID
        default:
            let first = Int(random.next() % UInt64(pool.count))
            var second = Int(random.next() % UInt64(pool.count - 1))
            if second >= first { second += 1 }
            let a = pool[first], b = pool[second]
            return a.cost <= b.cost ? a.nodeID : b.nodeID
        }
    }
}

/// Decides whether a failed attempt may be retried on another node.
public struct FailoverPolicy: Sendable, Equatable {
    public var maxAttempts: Int
    /// How long to wait for a node's first byte before trying another.
    public var firstByteTimeoutMs: UInt64
    /// Overall deadline for finding a node that starts answering.
    public var deadlineMs: UInt64

    public init(maxAttempts: Int = 3, firstByteTimeoutMs: UInt64 = 30_000, deadlineMs: UInt64 = 60_000) {
        self.maxAttempts = maxAttempts
        self.firstByteTimeoutMs = firstByteTimeoutMs
        self.deadlineMs = deadlineMs
    }

    public enum Outcome: Sendable, Equatable {
        /// The node answered (possibly with an HTTP error of the app's own): pass it on.
        case answered
        /// The node failed before its first byte: disconnect, timeout, or the app unreachable.
        case failedBeforeFirstByte
        /// The node failed after the answer began: the stream cannot be moved.
        case failedMidStream
    }

    /// Retry only what the client has not seen any byte of, within the attempt and time budget.
    public func shouldRetry(after outcome: Outcome, attempt: Int, elapsedMs: UInt64) -> Bool {
        outcome == .failedBeforeFirstByte && attempt < maxAttempts && elapsedMs < deadlineMs
    }
}
