import EdgeMatrixCore
import EdgeMatrixStore
import Logging
import Metrics

/// Receipts signed but not yet acknowledged by the router. They are re-delivered on the control stream
/// until acknowledged, so a router crash between answering and storing loses none.
///
/// Opened on a file (`init(path:)`), the outbox is durable: `add` returns once the receipt is on disk, before it
/// is sent, and `acknowledge` returns once it is gone from disk, so a node killed with kill -9 re-delivers every
/// receipt not yet acknowledged after it restarts, and none that was. Writes from concurrent requests share one
/// transaction and one fsync.
public actor ReceiptOutbox {
    /// Pending receipts, with the sequence number of their entry in `order`.
    private var pending: [Hash32: (sequence: UInt64, receipt: Receipt)] = [:]
    /// Signing order, oldest first from `head`. An entry is live only while `pending` holds its id with its
    /// sequence number; acknowledged entries are skipped, and compacted away once they are most of the array.
    private var order: [(sequence: UInt64, id: Hash32)] = []
    private var head = 0
    private var nextSequence: UInt64 = 0
    /// A router that never acknowledges must not grow the node's memory (or disk) for ever: past this, the oldest
    /// receipt is dropped (and counted) to make room.
    public let capacity: Int

    private let store: ReceiptOutboxStore?
    private let logger: Logger
    private var writes: [(change: ReceiptOutboxStore.Change, done: CheckedContinuation<Void, Never>?)] = []
    private var flushing = false

    /// An outbox kept in memory only: lost if the node dies.
    public init(capacity: Int = 100_000) {
        self.capacity = max(1, capacity)
        store = nil
        logger = Logger(label: "emc.compute.outbox")
    }

    /// A durable outbox in the SQLite file at `path` (created if missing), holding what a previous run left
    /// unacknowledged.
    public init(path: String, capacity: Int = 100_000, logger: Logger = Logger(label: "emc.compute.outbox")) throws {
        self.capacity = max(1, capacity)
        self.logger = logger
        let store = try ReceiptOutboxStore(path: path)
        let old = try store.dropOldVersions()
        if old > 0 {
            logger.warning("dropped receipts of an older receipt version from the outbox; no router accepts them any more",
                           metadata: ["dropped": "\(old)", "version": "\(ReceiptBody.version)"])
        }
        let trimmed = try store.trim(keepingNewest: max(1, capacity))
        try store.trimCountersigned(keepingNewest: ReceiptOutboxStore.keptCapacity)
        var loaded: [Hash32: (sequence: UInt64, receipt: Receipt)] = [:]
        var loadedOrder: [(sequence: UInt64, id: Hash32)] = []
        var sequence: UInt64 = 0
        for receipt in try store.load() where loaded[receipt.id] == nil {
            loaded[receipt.id] = (sequence, receipt)
            loadedOrder.append((sequence, receipt.id))
            sequence += 1
        }
        self.store = store
        pending = loaded
        order = loadedOrder
        nextSequence = sequence
        if trimmed > 0 {
            Counter(label: "emc_compute_receipts_dropped_total").increment(by: Int64(clamping: trimmed))
            logger.warning("outbox held more receipts than its capacity; dropped the oldest",
                           metadata: ["dropped": "\(trimmed)", "capacity": "\(max(1, capacity))"])
        }
        if !loaded.isEmpty {
            logger.info("outbox holds unacknowledged receipts from a previous run", metadata: ["count": "\(loaded.count)", "path": "\(path)"])
        }
    }

    /// Number of receipts awaiting acknowledgement.
    public var count: Int { pending.count }

    /// Keeps the receipt until acknowledged; with a file, returns once it is durable.
    public func add(_ receipt: Receipt) async {
        guard pending[receipt.id] == nil else { return }
        if pending.count >= capacity, let oldest = popOldest() {
            pending[oldest] = nil
            Counter(label: "emc_compute_receipts_dropped_total").increment()
            logger.warning("outbox full; dropped the oldest unacknowledged receipt", metadata: ["receipt": "\(oldest.hex)"])
            enqueue(.remove(oldest), done: nil)
        }
        compactIfMostlyDead()
        pending[receipt.id] = (nextSequence, receipt)
        order.append((nextSequence, receipt.id))
        nextSequence += 1
        await persist(.add(receipt))
    }

    /// Returns the acknowledged receipt, or nil if it was not pending (already acknowledged, or unknown). With a
    /// file, returns once its removal is durable: an acknowledged receipt is never re-sent after a restart.
    @discardableResult
    public func acknowledge(_ id: Hash32, routerSignature: [UInt8] = []) async -> Receipt? {
        guard let entry = pending.removeValue(forKey: id) else { return nil }
        compactIfMostlyDead()
        var countersigned = entry.receipt
        // Kept only with a countersignature that verifies: a receipt the node cannot prove is no evidence.
        if !routerSignature.isEmpty, countersigned.attachRouterSignature(routerSignature) {
            await persist(.keep(countersigned))
            return countersigned
        }
        if !routerSignature.isEmpty {
            Counter(label: "emc_compute_bad_countersignatures_total").increment()
            logger.warning("router acknowledged a receipt with a countersignature that does not verify; not kept",
                           metadata: ["receipt": "\(id.hex)", "router": "\(entry.receipt.body.routerID.short)"])
        }
        await persist(.remove(id))
        return entry.receipt
    }

    /// Countersigned receipts this node kept (with a file), of one router or all, in router sequence order.
    public func countersigned(router: NodeID? = nil, afterSequence: UInt64 = 0, limit: Int = 10_000) throws -> [Receipt] {
        try store?.countersigned(router: router, afterSequence: afterSequence, limit: limit) ?? []
    }

    /// The receipt with this id, if it still awaits acknowledgement.
    public func pending(_ id: Hash32) -> Receipt? { pending[id]?.receipt }

    /// Unacknowledged receipts, oldest first.
    public func unacknowledged() -> [Receipt] { live().map(\.receipt) }

    /// Unacknowledged receipts countersignable by one router, oldest first: a receipt is only ever sent to the
    /// router it names (another router refuses it, and counts the node as misbehaving).
    public func unacknowledged(for routerID: NodeID) -> [Receipt] {
        live().map(\.receipt).filter { $0.body.routerID == routerID }
    }

    private func live() -> [(id: Hash32, receipt: Receipt)] {
        order[head...].compactMap { entry in
            guard let current = pending[entry.id], current.sequence == entry.sequence else { return nil }
            return (entry.id, current.receipt)
        }
    }

    /// Removes and returns the oldest pending id from `order` (leaving it in `pending`).
    private func popOldest() -> Hash32? {
        while head < order.count {
            let entry = order[head]
            head += 1
            if pending[entry.id]?.sequence == entry.sequence { return entry.id }
        }
        return nil
    }

    /// Drops the dead entries of `order` (dropped or acknowledged) once they outnumber the live ones: amortised
    /// O(1) per receipt, and `order` stays within twice the capacity (plus a little).
    private func compactIfMostlyDead() {
        let dead = order.count - pending.count
        guard dead > 1024, dead > pending.count else { return }
        order = order[head...].filter { pending[$0.id]?.sequence == $0.sequence }
        head = 0
    }

    // MARK: - Group-committed writes

    private func persist(_ change: ReceiptOutboxStore.Change) async {
        guard store != nil else { return }
        await withCheckedContinuation { continuation in enqueue(change, done: continuation) }
    }

    private func enqueue(_ change: ReceiptOutboxStore.Change, done: CheckedContinuation<Void, Never>?) {
        guard store != nil else {
            done?.resume()
            return
        }
        writes.append((change, done))
        if !flushing {
            flushing = true
            Task { await self.flush() }
        }
    }

    /// Writes queued changes in order, a batch per transaction. A failed write is logged and counted: the receipt
    /// is still sent (the router may store it), but would not survive a crash of this node.
    private func flush() async {
        while !writes.isEmpty, let store {
            let batch = writes
            writes.removeAll()
            do {
                try await store.apply(batch.map(\.change))
            } catch {
                Counter(label: "emc_compute_outbox_write_errors_total").increment()
                logger.error("cannot write the receipt outbox", metadata: ["path": "\(store.path)", "error": "\(error)"])
            }
            for (_, done) in batch { done?.resume() }
        }
        flushing = false
    }
}
