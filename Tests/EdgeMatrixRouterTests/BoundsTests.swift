import EdgeMatrixCore
import EdgeMatrixNetwork
@testable import EdgeMatrixRouter
import Foundation
import Testing

/// The router's memory bounds: per-request answer buffers and the queue of requests waiting for a node.
@Suite("Router bounds")
struct BoundsTests {
    func request(_ id: String) -> WorkRequest { .test(id) }

    /// Finishes within the timeout, or returns nil.
    func within<T: Sendable>(_ timeout: Duration, _ operation: @escaping @Sendable () async -> T) async -> T? {
        await withTaskGroup(of: T?.self) { group in
            group.addTask { await operation() }
            group.addTask {
                try? await Task.sleep(for: timeout)
                return nil
            }
            defer { group.cancelAll() }
            return await group.next() ?? nil
        }
    }

    // Bug caught: an unbounded AsyncStream between the node's stream and the HTTP writer, so a fast node and a
    // slow client grew router memory without limit.
    @Test("a node's answer is buffered up to the bound, then the producer waits for the client")
    func answerBufferIsBounded() async throws {
        let channel = ResponseChannel()
        for _ in 0..<ResponseChannel.maxBufferedMessages { #expect(await channel.send(.chunk([1]))) }
        let blocked = Task { await channel.send(.chunk([2])) }
        try await Task.sleep(for: .milliseconds(100))
        let first = try await channel.next()
        #expect(first == .chunk([1]))
        #expect(await blocked.value)
        // Bytes bound too: one 1 MiB chunk fills it.
        let bytes = ResponseChannel()
        #expect(await bytes.send(.chunk([UInt8](repeating: 0, count: ResponseChannel.maxBufferedBytes))))
        let waiting = await within(.milliseconds(100)) { await bytes.send(.chunk([3])) }
        #expect(waiting == nil, "the producer did not wait although the buffer held 1 MiB")
    }

    @Test("messages buffered before a failure are delivered, then the failure; a producer after the end is told so")
    func bufferedThenFailure() async throws {
        let channel = ResponseChannel()
        #expect(await channel.send(.chunk([1])))
        channel.finish(throwing: NodeFailure.disconnected)
        #expect(try await channel.next() == .chunk([1]))
        await #expect(throws: NodeFailure.disconnected) { try await channel.next() }
        #expect(await channel.send(.chunk([2])) == false)
    }

    @Test("a producer waiting on a full buffer is released when the client goes away")
    func producerReleasedOnEnd() async throws {
        let channel = ResponseChannel()
        for _ in 0..<ResponseChannel.maxBufferedMessages { _ = await channel.send(.chunk([1])) }
        let blocked = Task { await channel.send(.chunk([2])) }
        try await Task.sleep(for: .milliseconds(50))
        channel.finish(throwing: CancellationError())
        #expect(await blocked.value == false)
    }

    func descriptor(capacity: UInt32) -> NodeDescriptor {
        NodeDescriptor(apps: [AppDescriptor(name: "llm", kind: .openai, models: ["m"])], maxConcurrent: capacity,
                       hardware: HardwareInfo(cpuCores: 1, memoryMiB: 1, gpus: []), version: "test")
    }

    /// A registered node with no idle slot yet.
    func registeredNode(_ pool: NodePool, capacity: UInt32 = 1) async throws -> (NodeID, UInt64) {
        let key = SigningKey()
        let (_, evict) = AsyncStream<String>.makeStream()
        guard case .accepted(_, let number) = await pool.register(key: key.publicKey, descriptor: descriptor(capacity: capacity),
                                                                  evict: evict) else {
            Issue.record("registration refused")
            throw CancellationError()
        }
        return (key.nodeID, number)
    }

    // Bug caught: waiters polled every 2 ms for up to 60 s, in no order, without any bound.
    @Test("requests waiting for a slot are served first come, first served, and the queue is bounded")
    func waitQueueIsFIFOAndBounded() async throws {
        let pool = NodePool(seed: 1, limits: PoolLimits(maxWaiters: 2))
        let (node, number) = try await registeredNode(pool)
        let first = Task { () -> String? in
            let wait = await pool.waitForSlot(route: .model("m"), excluding: [], bodyBytes: 10, timeoutMs: 10_000) { _ in
                WorkRequest.test("first")
            }
            if case .assigned(let job) = wait { return job.request.requestID }
            return nil
        }
        try await Task.sleep(for: .milliseconds(50))
        let second = Task { () -> String? in
            let wait = await pool.waitForSlot(route: .model("m"), excluding: [], bodyBytes: 10, timeoutMs: 10_000) { _ in
                WorkRequest.test("second")
            }
            if case .assigned(let job) = wait { return job.request.requestID }
            return nil
        }
        try await Task.sleep(for: .milliseconds(50))
        let third = await pool.waitForSlot(route: .model("m"), excluding: [], bodyBytes: 10, timeoutMs: 10_000) { _ in request("third") }
        guard case .queueFull = third else {
            Issue.record("a third waiter was queued beyond the bound: \(third)")
            return
        }
        // Each slot the node offers goes to the oldest waiter.
        let slot1 = Task { await pool.offerSlot(nodeID: node, number: number, slot: 1) }
        #expect(await slot1.value?.request.requestID == "first")
        #expect(await first.value == "first")
        await pool.finished(nodeID: node, number: number)
        let slot2 = Task { await pool.offerSlot(nodeID: node, number: number, slot: 2) }
        #expect(await slot2.value?.request.requestID == "second")
        #expect(await second.value == "second")
    }

    @Test("a waiter gives up at its deadline, and a full queue answers 429 no_capacity with Retry-After")
    func deadlineAndQueueFull() async throws {
        let pool = NodePool(seed: 1, limits: PoolLimits(maxWaiters: 1, maxWaitingBytes: 100))
        _ = try await registeredNode(pool)
        let started = ContinuousClock.now
        let timedOut = await pool.waitForSlot(route: .model("m"), excluding: [], bodyBytes: 0, timeoutMs: 100) { _ in request("a") }
        guard case .timedOut = timedOut else {
            Issue.record("expected a timeout, got \(timedOut)")
            return
        }
        // Returned rather than hung (a generous bound: the test machine may be busy with other suites).
        #expect(ContinuousClock.now - started < .seconds(120))
        // Too many bytes waiting is full too.
        let tooBig = await pool.waitForSlot(route: .model("m"), excluding: [], bodyBytes: 101, timeoutMs: 1_000) { _ in request("b") }
        guard case .queueFull = tooBig else {
            Issue.record("expected queueFull for a body over the waiting-bytes bound, got \(tooBig)")
            return
        }
        let forwarder = Forwarder(pool: NodePool(seed: 1, limits: PoolLimits(maxWaiters: 0)), policy: FailoverPolicy(),
                                  logger: .init(label: "test"))
        let crowded = forwarder.pool
        _ = try await registeredNode(crowded)
        let error = try #require(await #expect(throws: OpenAIError.self) {
            _ = try await forwarder.start(route: .model("m")) { _, _ in request("c") }
        })
        #expect(error.status == .tooManyRequests)
        #expect(error.code == "no_capacity")
        #expect(error.headers[.retryAfter] == "1")
    }

    @Test("retaining only admitted nodes ends the others' control streams, without a cooldown")
    func retainAdmitted() async throws {
        let pool = NodePool(seed: 1)
        let kept = SigningKey(), dropped = SigningKey()
        let (_, keptEvict) = AsyncStream<String>.makeStream()
        let (evictions, droppedEvict) = AsyncStream<String>.makeStream()
        _ = await pool.register(key: kept.publicKey, descriptor: descriptor(capacity: 1), evict: keptEvict)
        _ = await pool.register(key: dropped.publicKey, descriptor: descriptor(capacity: 1), evict: droppedEvict)
        #expect(await pool.retain(admitted: [kept.publicKey], reason: "retired") == 1)
        var reasons = evictions.makeAsyncIterator()
        #expect(await reasons.next() == "retired")
        #expect(await pool.summaries().map(\.nodeID) == [kept.nodeID])
        let (_, again) = AsyncStream<String>.makeStream()
        guard case .accepted = await pool.register(key: dropped.publicKey, descriptor: descriptor(capacity: 1), evict: again) else {
            Issue.record("a dropped (not misbehaving) node was put in cooldown")
            return
        }
    }

    @Test("the node table is bounded, and a node that misbehaved is refused for the cooldown")
    func nodeTableBounded() async throws {
        let pool = NodePool(seed: 1, limits: PoolLimits(maxSessions: 2, misbehaviourCooldownMs: 60_000))
        let (first, number) = try await registeredNode(pool)
        _ = try await registeredNode(pool)
        let (_, evict) = AsyncStream<String>.makeStream()
        #expect(await pool.register(key: SigningKey().publicKey, descriptor: descriptor(capacity: 1), evict: evict) == .full)
        let (evictions, evictSink) = AsyncStream<String>.makeStream()
        let key = SigningKey()
        await pool.evict(nodeID: first, number: number, reason: "test")
        let registration = await pool.register(key: key.publicKey, descriptor: descriptor(capacity: 1), evict: evictSink)
        guard case .accepted(_, let badNumber) = registration else {
            Issue.record("a free place was not reused")
            return
        }
        await pool.evict(nodeID: key.nodeID, number: badNumber, reason: "bad_status")
        var reasons = evictions.makeAsyncIterator()
        #expect(await reasons.next() == "bad_status")
        let (_, again) = AsyncStream<String>.makeStream()
        #expect(await pool.register(key: key.publicKey, descriptor: descriptor(capacity: 1), evict: again) == .coolingDown)
    }
}

extension WorkRequest {
    /// A request with placeholder billing fields, for tests of the pool's plumbing.
    static func test(_ id: String) -> WorkRequest {
        WorkRequest(requestID: id, app: "llm", model: "m", method: "POST", path: "/v1/chat/completions", contentType: "application/json",
                    body: [], stream: false, sequence: 1, attempt: 0, payer: Account(owner: SigningKey().publicKey), prices: .free)
    }
}
