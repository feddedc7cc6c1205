import EdgeMatrixCore
import EdgeMatrixRouter
import Testing

@Suite("Node selection")
struct SelectionTests {
    func node(_ n: UInt8) -> NodeID { SigningKey(seedByte: n).nodeID }

    func candidate(_ n: UInt8, latency: Double = 50, success: Double = 1, inFlight: Int = 0, capacity: Int = 8, idle: Int = 8,
                   backoffUntil: UInt64 = 0) -> Candidate {
        Candidate(nodeID: node(n), quality: NodeQuality(latencyEWMAms: latency, successRate: success, consecutiveFailures: 0,
                                                        backoffUntil: backoffUntil),
                  inFlight: inFlight, capacity: capacity, idleSlots: idle)
    }

    @Test("nodes without a free slot are never chosen")
    func freeCapacityOnly() {
        var selector = NodeSelector(seed: 1)
        let candidates = [candidate(1, idle: 0), candidate(2, idle: 3), candidate(3, idle: 0)]
        for _ in 0..<100 { #expect(selector.choose(from: candidates, nowMs: 0) == node(2)) }
        #expect(selector.choose(from: [candidate(1, idle: 0)], nowMs: 0) == nil)
        #expect(selector.choose(from: [], nowMs: 0) == nil)
    }

    @Test("the same seed gives the same choices; another seed gives other choices")
    func reproducible() {
        let candidates = (1...6).map { candidate($0) }
        func run(_ seed: UInt64) -> [NodeID?] {
            var selector = NodeSelector(seed: seed)
            return (0..<200).map { _ in selector.choose(from: candidates, nowMs: 0) }
        }
        #expect(run(42) == run(42))
        #expect(run(42) != run(43))
        // Candidate order must not matter.
        var a = NodeSelector(seed: 9), b = NodeSelector(seed: 9)
        let shuffled = candidates.reversed().map { $0 }
        for _ in 0..<100 { #expect(a.choose(from: candidates, nowMs: 0) == b.choose(from: shuffled, nowMs: 0)) }
    }

    @Test("equal nodes share load evenly; a slow or busy node gets less")
    func loadSpreading() throws {
        var selector = NodeSelector(seed: 7)
        var counts = [NodeID: Int]()
        let equal = (1...4).map { candidate($0) }
        for _ in 0..<4000 {
            let pick = selector.choose(from: equal, nowMs: 0)
            let chosen = try #require(pick)
            counts[chosen, default: 0] += 1
        }
        for n in 1...4 { #expect((800...1200).contains(counts[node(UInt8(n))] ?? 0)) }

        counts = [:]
        let mixed = [candidate(1, latency: 400), candidate(2, latency: 40), candidate(3, latency: 40, inFlight: 7, idle: 1)]
        for _ in 0..<3000 {
            let pick = selector.choose(from: mixed, nowMs: 0)
            let chosen = try #require(pick)
            counts[chosen, default: 0] += 1
        }
        #expect(counts[node(2), default: 0] > counts[node(3), default: 0])
        #expect(counts[node(3), default: 0] > 0)
        // Power of two choices draws two distinct nodes, so the worst node never wins a draw.
        #expect(counts[node(1), default: 0] == 0)
    }

    @Test("a node in failure backoff is skipped while others are free, and used when it is the only one")
    func backoff() throws {
        var selector = NodeSelector(seed: 3)
        let candidates = [candidate(1, backoffUntil: 1_000), candidate(2)]
        for _ in 0..<100 { #expect(selector.choose(from: candidates, nowMs: 500) == node(2)) }
        #expect(selector.choose(from: [candidate(1, backoffUntil: 1_000)], nowMs: 500) == node(1))
        var seen = Set<NodeID>()
        for _ in 0..<100 {
            let pick = selector.choose(from: candidates, nowMs: 1_000)
            seen.insert(try #require(pick))
        }
        #expect(seen == [node(1), node(2)])
    }

    @Test("failures back a node off exponentially up to 30 s; one success restores it")
    func quality() {
        var quality = NodeQuality.fresh
        quality.recordFailure(nowMs: 10_000)
        #expect(quality.backoffUntil == 10_250)
        quality.recordFailure(nowMs: 10_000)
        #expect(quality.backoffUntil == 10_500)
        for _ in 0..<20 { quality.recordFailure(nowMs: 10_000) }
        #expect(quality.backoffUntil == 40_000)
        #expect(quality.successRate < 0.05)
        quality.recordSuccess(latencyMs: 20)
        #expect(quality.backoffUntil == 0)
        #expect(quality.consecutiveFailures == 0)
        #expect(quality.latencyEWMAms < NodeQuality.fresh.latencyEWMAms)
    }
}

@Suite("Failover decisions")
struct FailoverTests {
    let policy = FailoverPolicy(maxAttempts: 3, firstByteTimeoutMs: 1_000, deadlineMs: 5_000)

    @Test("a failure before the first byte is retried within the attempt and time budget")
    func retryBeforeFirstByte() {
        #expect(policy.shouldRetry(after: .failedBeforeFirstByte, attempt: 1, elapsedMs: 10))
        #expect(policy.shouldRetry(after: .failedBeforeFirstByte, attempt: 2, elapsedMs: 4_999))
        #expect(!policy.shouldRetry(after: .failedBeforeFirstByte, attempt: 3, elapsedMs: 10))
        #expect(!policy.shouldRetry(after: .failedBeforeFirstByte, attempt: 1, elapsedMs: 5_000))
    }

    @Test("an answer that has begun, or has been given, is never retried")
    func noRetryAfterFirstByte() {
        #expect(!policy.shouldRetry(after: .failedMidStream, attempt: 1, elapsedMs: 0))
        #expect(!policy.shouldRetry(after: .answered, attempt: 1, elapsedMs: 0))
    }
}

extension SigningKey {
    init(seedByte: UInt8) { try! self.init(seed: [UInt8](repeating: seedByte, count: 32)) }
}
