import EdgeMatrixCore
import EdgeMatrixNetwork
import Foundation
import Logging
import Metrics

/// An answer that has started: the node's status line and the rest of its stream.
public struct StartedAnswer: Sendable {
    public var status: UInt16
    public var contentType: String
    public var job: WorkJob
}

/// Sends a request to a compute node, retrying on another node when one fails before its first byte.
public struct Forwarder: Sendable {
    let pool: NodePool
    let policy: FailoverPolicy
    let logger: Logger

    public init(pool: NodePool, policy: FailoverPolicy, logger: Logger) {
        self.pool = pool
        self.policy = policy
        self.logger = logger
    }

    /// `bodyBytes` is what the request holds in memory while it waits for a free slot (the wait queue is bounded by it).
    /// `makeRequest` builds the request for the chosen node's app and the attempt index (0 for the first node, one
    /// more for each node it fails over to): each attempt gets a receipt of its own. With `eligible`, only those nodes
    /// may serve (the request's admission priced them).
    public func start(route: WorkRoute, bodyBytes: Int = 0, eligible: Set<NodeID>? = nil,
                      makeRequest: @escaping @Sendable (_ appName: String, _ attempt: UInt32) -> WorkRequest) async throws(OpenAIError) -> StartedAnswer {
        let started = pool.nowMs()
        var tried = Set<NodeID>()
        var attempt = 0
        var lastFailure = "no node tried"
        while true {
            let elapsed = pool.nowMs() - started
            // Each loop assigns at most one job, so the attempts made so far number this one.
            let attemptIndex = UInt32(clamping: attempt)
            let makeRequest: @Sendable (String) -> WorkRequest = { app in makeRequest(app, attemptIndex) }
            let assignment = await pool.assign(route: route, excluding: tried, eligible: eligible, makeRequest: makeRequest)
            let job: WorkJob
            switch assignment {
            case .success(let assigned):
                job = assigned
            case .failure(.notServed) where tried.isEmpty:
                switch route {
                case .model(let model): throw .modelNotFound(model)
                case .app(let app): throw .appNotFound(app)
                }
            case .failure(.notServed):
                throw .upstreamFailed(lastFailure)
            case .failure(.noCapacity):
                // Capacity returns as soon as a node reopens a Work stream: wait in the FIFO queue within the deadline.
                guard elapsed < policy.deadlineMs else { throw .noCapacity() }
                switch await pool.waitForSlot(route: route, excluding: tried, eligible: eligible, bodyBytes: bodyBytes,
                                              timeoutMs: policy.deadlineMs - elapsed, makeRequest: makeRequest) {
                case .assigned(let assigned): job = assigned
                case .timedOut: throw .noCapacity()
                case .queueFull: throw .queueFull()
                case .notServed:
                    if Task.isCancelled { throw .upstreamFailed("request cancelled") }
                    continue
                }
            }
            attempt += 1
            tried.insert(job.nodeID)
            let assignedAt = pool.nowMs()
            let outcome = await firstMessage(of: job)
            switch outcome {
            case .success(.head(let status, let contentType)) where (200...599).contains(status):
                await pool.recordSuccess(nodeID: job.nodeID, latencyMs: Double(pool.nowMs() - assignedAt))
                if attempt > 1 {
                    logger.info("request failed over", metadata: ["request": "\(job.request.requestID)", "attempts": "\(attempt)"])
                }
                return StartedAnswer(status: status, contentType: contentType, job: job)
            case .success(let other):
                lastFailure = "node \(job.nodeID.short) answered out of order (\(other))"
            case .failure(let failure):
                lastFailure = "node \(job.nodeID.short): \(failure)"
            }
            job.cancel()
            await pool.recordFailure(nodeID: job.nodeID)
            Counter(label: "emc_router_failovers_total").increment()
            logger.warning("compute node failed before answering", metadata: [
                "request": "\(job.request.requestID)", "node": "\(job.nodeID.short)", "reason": "\(lastFailure)",
            ])
            guard policy.shouldRetry(after: .failedBeforeFirstByte, attempt: attempt, elapsedMs: pool.nowMs() - started) else {
                throw .upstreamFailed(lastFailure)
            }
        }
    }

    /// Waits for the node's first message, up to the first-byte timeout.
    private func firstMessage(of job: WorkJob) async -> Result<NodeWorkMessage, NodeFailure> {
        let timeout = policy.firstByteTimeoutMs
        return await withTaskGroup(of: Void.self) { group in
            group.addTask {
                try? await Task.sleep(for: .milliseconds(timeout))
                if !Task.isCancelled { job.fail(.firstByteTimeout) }
            }
            defer { group.cancelAll() }
            do {
                if let first = try await job.responses.next() { return .success(first) }
                return .failure(.disconnected)
            } catch let failure as NodeFailure {
                return .failure(failure)
            } catch {
                return .failure(.disconnected)
            }
        }
    }
}
