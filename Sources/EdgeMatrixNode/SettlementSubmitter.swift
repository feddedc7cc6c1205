import EdgeMatrixChain
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixRouter
import EdgeMatrixStore
import Foundation
import Logging
import Metrics
import ServiceLifecycle

/// The router's side of settlement: once per chain epoch it closes a batch over the receipts of the requests it
/// accepted since the last batch (behind any still in flight), stores it, then sends it as a `settle` transaction
/// signed by the router key and, once included, takes its amounts off the payers' unsettled totals.
///
/// Crash-safe: a batch is stored (built) before it is sent; at start-up and on every tick the batches not yet
/// included are reconciled with the chain's settlement cursor (already on chain → marked included; else sent
/// again, the cursor preventing a double settlement). While the chain is unreachable a batch still closes every
/// epoch's worth of wall time (`epoch_length_blocks` × 1 s, from the last values read) and the batches go out in
/// order when it is back.
public struct SettlementSubmitter: Service {
    let client: ChainClient
    let routerKey: SigningKey
    let store: SettlementStore
    let inFlight: InFlightSequences
    let logger: Logger
    let interval: Duration
    let maxEntries: Int
    /// Assumed block time when the chain cannot be read (to close batches by wall time).
    static let assumedBlockTime = Duration.seconds(1)
    /// The epoch length is read again after this many ticks (governance may change it).
    static let parameterRefreshTicks = 300

    private let closed = Counter(label: "emc_router_batches_closed_total")
    private let settled = Counter(label: "emc_router_batches_settled_total")
    private let failures = Counter(label: "emc_router_settle_failures_total")

    public init(client: ChainClient, routerKey: SigningKey, store: SettlementStore, inFlight: InFlightSequences, logger: Logger,
                interval: Duration = .seconds(1), maxEntries: Int = SettlementBatch.maxEntries) {
        self.client = client
        self.routerKey = routerKey
        self.store = store
        self.inFlight = inFlight
        self.logger = logger
        self.interval = interval
        self.maxEntries = maxEntries
    }

    /// What the submitter knows of the chain between ticks.
    public struct ChainView: Sendable {
        public var chainID: String?
        public var epochLength: UInt64?
        public var height: UInt64?
        /// Whether the last read of the chain succeeded.
        public var reachable = false
        /// When the last batch was closed by this process (to close by wall time while the chain is away).
        var lastCloseAt: ContinuousClock.Instant?
        /// When the chain was last read.
        var lastReachableAt: ContinuousClock.Instant?
        /// The chain's settlement cursor for this router, as last read while the store held no batch: where the
        /// first batch starts, should the chain go away before it closes.
        var cursor: (nextBatch: UInt64, nextSequence: UInt64)?
        var ticks = 0
        var failuresInARow = 0
        var closeFailuresInARow = 0
        /// After a failed send, the next one waits until then (a refused transaction may still cost its fee).
        var retryAt: ContinuousClock.Instant?

        public init() {}

        public var epoch: UInt64? {
            guard let height, let epochLength, epochLength > 0 else { return nil }
            return height / epochLength
        }
    }

    public func run() async throws {
        logger.info("settlement submitter started", metadata: ["router": "\(routerKey.nodeID.short)", "chain": "\(client.baseURL)"])
        await cancelWhenGracefulShutdown {
            var view = ChainView()
            while !Task.isCancelled {
                await tick(&view)
                try? await Task.sleep(for: interval)
            }
        }
    }

    /// One round: read the chain, close a batch if one is due, send what is not yet included.
    public func tick(_ view: inout ChainView) async {
        await readChain(&view)
        do {
            try await closeIfDue(&view)
            view.closeFailuresInARow = 0
        } catch is CancellationError {
        } catch {
            failures.increment()
            view.closeFailuresInARow += 1
            if view.closeFailuresInARow == 1 || view.closeFailuresInARow % 60 == 0 {
                logger.error("cannot close a settlement batch", metadata: ["error": "\(error)", "failures": "\(view.closeFailuresInARow)"])
            }
        }
        guard view.reachable else { return }
        // Before anything else that may be backing off: an open question left unanswered past its deadline costs
        // the router a slash.
        do { try await answerQueries(view) } catch is CancellationError {} catch {
            failures.increment()
            logger.error("cannot answer the chain's data requests or omission queries", metadata: ["error": "\(error)"])
        }
        if let retryAt = view.retryAt, ContinuousClock.now < retryAt { return }
        do {
            try await submitPending(view)
            view.failuresInARow = 0
            view.retryAt = nil
        } catch is CancellationError {
        } catch {
            failures.increment()
            view.failuresInARow += 1
            // 2, 4, 8, … seconds, at most 5 minutes, between attempts.
            let backoff = Duration.seconds(min(300, 1 << min(view.failuresInARow, 9)))
            view.retryAt = .now + backoff
            logger.error("cannot settle a batch; retrying later", metadata: [
                "error": "\(error)", "failures": "\(view.failuresInARow)", "retry_in": "\(backoff)",
            ])
        }
    }

    /// Reads the height (every tick), and the chain id and epoch length (once, and again now and then).
    func readChain(_ view: inout ChainView) async {
        view.ticks += 1
        do {
            let status = try await client.status()
            guard let height = Self.u64(status["height"]) else { throw SettlementSubmitterError.malformed("GET /status: height") }
            if let id = status["chain_id"] as? String, !id.isEmpty { view.chainID = id }
            if view.epochLength == nil || view.ticks % Self.parameterRefreshTicks == 0 {
                let parameters = try await client.parameters()
                guard let length = Self.u64(parameters["epoch_length_blocks"]), length > 0 else {
                    throw SettlementSubmitterError.malformed("GET /params: epoch_length_blocks")
                }
                view.epochLength = length
            }
            view.height = height
            view.reachable = view.chainID != nil
            view.lastReachableAt = .now
        } catch is CancellationError {
            view.reachable = false
        } catch {
            if view.reachable || view.ticks == 1 {
                logger.warning("cannot read the chain; closing settlement batches by wall time until it is back",
                               metadata: ["chain": "\(client.baseURL)", "error": "\(error)"])
            }
            view.reachable = false
        }
    }

    /// Closes the next batch when the chain's epoch is past the last batch's (or, with the chain away, when an
    /// epoch's worth of wall time has passed since the last close). A batch cut short by the entry cap is followed
    /// at once by the next.
    func closeIfDue(_ view: inout ChainView) async throws {
        let last = try await store.lastBatch()
        var next: (batch: UInt64, first: UInt64)
        let epoch: UInt64
        if view.reachable, let current = view.epoch {
            if let last {
                guard current > last.closedEpoch else { return }
                next = (last.batch + 1, last.lastSequence + 1)
            } else {
                // Nothing stored: start where the chain says this router's next batch starts.
                let cursor = try await client.settlementCursor(router: routerKey.publicKey)
                view.cursor = cursor
                next = (cursor.nextBatch, cursor.nextSequence)
            }
            epoch = current
        } else {
            // The chain is away: close by wall time, an epoch's worth after the last close (or after the chain was
            // last read), from the last values read.
            guard let epochLength = view.epochLength else { return }
            let epochTime = Self.assumedBlockTime * Int(clamping: epochLength)
            if let reference = view.lastCloseAt ?? view.lastReachableAt {
                guard ContinuousClock.now - reference >= epochTime else { return }
            } else if let last {
                guard Self.millisecondsSince(last.createdAtMillis) >= UInt64(clamping: epochLength) * 1000 else { return }
            } else {
                return
            }
            if let last {
                next = (last.batch + 1, last.lastSequence + 1)
                epoch = last.closedEpoch + 1
            } else if let cursor = view.cursor {
                next = (cursor.nextBatch, cursor.nextSequence)
                epoch = (view.epoch ?? 0) + 1
            } else {
                return  // never read where this router's batches start
            }
        }
        let lastAccepted = try await store.lastAcceptedSequence()
        let upper = inFlight.batchUpperBound(lastAccepted: lastAccepted)
        while upper >= next.first {
            guard let batch = try await SettlementBatcher.close(store: store, router: routerKey.publicKey, batchNumber: next.batch,
                                                                firstSequence: next.first, upperBound: upper, epoch: epoch,
                                                                maxEntries: maxEntries, logger: logger) else { break }
            closed.increment()
            view.lastCloseAt = .now
            logger.info("settlement batch closed", metadata: [
                "batch": "\(batch.stored.batch)", "first_sequence": "\(batch.stored.firstSequence)",
                "last_sequence": "\(batch.stored.lastSequence)", "pairs": "\(batch.batch.entries.count)",
                "receipts": "\(batch.batch.receiptCount)", "total": "\(batch.batch.total)", "epoch": "\(epoch)",
                "in_flight": "\(inFlight.count)",
            ])
            next = (batch.stored.batch + 1, batch.stored.lastSequence + 1)
            // Cut short by the entry cap: the rest goes into the next batch at once.
        }
    }

    /// Sends, in order, every stored batch the chain has not included yet; stops at the first that fails.
    func submitPending(_ view: ChainView) async throws {
        guard let chainID = view.chainID else { return }
        let pending = try await store.batches().filter { $0.status != .included }
        guard !pending.isEmpty else { return }
        for stored in pending {
            let cursor = try await client.settlementCursor(router: routerKey.publicKey)
            if cursor.nextBatch > stored.batch {
                // Already on chain (sent before a crash, or a previous attempt that timed out).
                try await included(stored, how: "found on chain")
                continue
            }
            guard cursor.nextBatch == stored.batch, cursor.nextSequence == stored.firstSequence else {
                throw SettlementSubmitterError.cursorMismatch(batch: stored.batch, first: stored.firstSequence,
                                                              chainBatch: cursor.nextBatch, chainSequence: cursor.nextSequence)
            }
            let batch = try SettlementBatch(canonicalBytes: stored.encoded)
            let tx = Transaction(signing: TransactionBody(chainID: chainID, createdAtMillis: wallClockMillis(), kind: .settle(batch)),
                                 with: routerKey)
            let hash = try await client.submit(tx)
            try await store.markSubmitted(batch: stored.batch, txID: hash)
            logger.info("settlement batch sent", metadata: ["batch": "\(stored.batch)", "tx": "\(hash)", "total": "\(batch.total)"])
            let result = try await client.waitForCommit(hash: hash)
            guard result["status"] as? String == "committed" else {
                let error = result["error"] as? [String: Any]
                throw SettlementSubmitterError.refused(batch: stored.batch, code: error?["code"] as? String ?? "failed",
                                                       message: error?["message"] as? String ?? "")
            }
            let after = try await client.settlementCursor(router: routerKey.publicKey)
            guard after.nextBatch > stored.batch else {
                throw SettlementSubmitterError.cursorMismatch(batch: stored.batch, first: stored.firstSequence,
                                                              chainBatch: after.nextBatch, chainSequence: after.nextSequence)
            }
            try await included(stored, how: "committed")
        }
    }

    /// Answers what the chain asks of this router's pending settlements (docs/SETTLEMENT.md §§ 11–12): the leaves
    /// of a pair (data request, kind 15 → `data_response` chunks in order, from where the posted ones end) and the
    /// proof of a receipt's leaf (omission query, kind 17 → `omission_answer`). A query about a receipt the batch
    /// does not hold cannot be answered: it is logged, and the ledger upholds it at its deadline.
    func answerQueries(_ view: ChainView) async throws {
        guard let chainID = view.chainID else { return }
        let router = routerKey.publicKey
        let (requests, queries) = try await client.dataRequests(router: router)
        for request in requests where request["status"] as? String == DataRequestStatus.open.rawValue {
            guard let batchNumber = Self.u64(request["batch"]), let posted = Self.u64(request["leaves_posted"]),
                  let payer = (request["payer"] as? String).flatMap({ try? Account(text: $0) }),
                  let node = (request["node"] as? String).flatMap({ try? PublicKey(hex: $0) }) else {
                throw SettlementSubmitterError.malformed("GET /data-requests: a data request")
            }
            guard let stored = try await store.batch(batchNumber) else {
                logger.error("data request for a batch this router does not hold", metadata: ["batch": "\(batchNumber)"])
                continue
            }
            let chunks = try await SettlementBatcher.dataResponses(store: store, batch: stored, router: router, payer: payer, node: node)
            for chunk in chunks where chunk.firstIndex >= posted {
                try await send(.dataResponse(chunk), chainID: chainID, what: "data response", metadata: [
                    "batch": "\(batchNumber)", "node": "\(node.nodeID.short)", "first_leaf": "\(chunk.firstIndex)", "leaves": "\(chunk.leaves.count)",
                ])
            }
        }
        for query in queries where query["status"] as? String == OmissionQueryStatus.open.rawValue {
            guard let batchNumber = Self.u64(query["batch"]), let sequence = Self.u64(query["sequence"]),
                  let attempt = Self.u64(query["attempt"]).flatMap({ UInt32(exactly: $0) }),
                  let payer = (query["payer"] as? String).flatMap({ try? Account(text: $0) }),
                  let node = (query["node"] as? String).flatMap({ try? PublicKey(hex: $0) }) else {
                throw SettlementSubmitterError.malformed("GET /data-requests: an omission query")
            }
            let key = SettlementLeafKey(payer: payer, node: node, sequence: sequence, attempt: attempt)
            guard let stored = try await store.batch(batchNumber),
                  let answer = try await SettlementBatcher.omissionAnswer(store: store, batch: stored, router: router, key: key) else {
                logger.error("omission query about a receipt this router's batch does not hold; it will be upheld", metadata: [
                    "batch": "\(batchNumber)", "sequence": "\(sequence)", "attempt": "\(attempt)",
                ])
                continue
            }
            try await send(.omissionAnswer(answer), chainID: chainID, what: "omission answer", metadata: [
                "batch": "\(batchNumber)", "sequence": "\(sequence)", "attempt": "\(attempt)",
            ])
        }
    }

    /// Signs, submits and waits for one transaction of this router's; a refusal is an error.
    private func send(_ kind: TransactionKind, chainID: String, what: String, metadata: Logger.Metadata) async throws {
        let tx = Transaction(signing: TransactionBody(chainID: chainID, createdAtMillis: wallClockMillis(), kind: kind), with: routerKey)
        let hash = try await client.submit(tx)
        let result = try await client.waitForCommit(hash: hash)
        guard result["status"] as? String == "committed" else {
            let error = result["error"] as? [String: Any]
            throw SettlementSubmitterError.answerRefused(what: what, code: error?["code"] as? String ?? "failed",
                                                         message: error?["message"] as? String ?? "")
        }
        logger.info("\(what) committed", metadata: metadata.merging(["tx": "\(hash)"]) { $1 })
    }

    private func included(_ stored: StoredSettlementBatch, how: String) async throws {
        if try await store.markIncluded(batch: stored.batch) {
            settled.increment()
            logger.info("settlement batch included", metadata: ["batch": "\(stored.batch)", "how": "\(how)"])
        }
    }

    /// A u64 from a JSON number or decimal string, or nil (never a trap on what a node answers).
    static func u64(_ value: Any?) -> UInt64? {
        if let text = value as? String { return UInt64(text) }
        guard let number = value as? NSNumber else { return nil }
        return UInt64(number.stringValue)
    }

    static func millisecondsSince(_ millis: UInt64) -> UInt64 {
        let now = wallClockMillis()
        return now >= millis ? now - millis : 0
    }
}

public enum SettlementSubmitterError: Error, CustomStringConvertible {
    case malformed(String)
    case refused(batch: UInt64, code: String, message: String)
    case cursorMismatch(batch: UInt64, first: UInt64, chainBatch: UInt64, chainSequence: UInt64)
    case answerRefused(what: String, code: String, message: String)

    public var description: String {
        switch self {
        case .malformed(let what): "the chain answered without a valid \(what)"
        case .refused(let batch, let code, let message): "the chain refused batch \(batch): \(code): \(message.prefix(300))"
        case .cursorMismatch(let batch, let first, let chainBatch, let chainSequence):
            "batch \(batch) from sequence \(first) does not follow the chain's cursor (next batch \(chainBatch) from sequence \(chainSequence))"
        case .answerRefused(let what, let code, let message): "the chain refused this router's \(what): \(code): \(message.prefix(300))"
        }
    }
}
