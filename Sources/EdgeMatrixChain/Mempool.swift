import EdgeMatrixConsensus
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixStore
import Metrics
import Synchronization

/// Why a transaction was not admitted.
public struct MempoolRejection: Error, Sendable, CustomStringConvertible {
    public var code: String
    public var message: String
    public var description: String { "\(code): \(message)" }

    /// A full node admits no transactions: it has no mempool that anyone proposes from.
    public static let readOnlyNode = MempoolRejection(
        code: "read_only_node", message: "this is a full node: it serves reads only; submit transactions to a validator's POST /txs")
}

/// Pending transactions in arrival order, deduplicated by id, checked against the latest committed state.
public final class Mempool: Sendable {
    public static let defaultCapacity = 50_000
    public static let maxTransactionBytes = TransactionLimits.maxSettleTransactionBytes + 128

    struct State {
        var nextSeq: UInt64 = 0
        var bySeq: [UInt64: (id: Hash32, bytes: [UInt8])] = [:]
        var seqByID: [Hash32: UInt64] = [:]
    }

    private let state = Mutex(State())
    let capacity: Int
    private let gauge = Gauge(label: "emc_chain_mempool_size")

    public init(capacity: Int = Mempool.defaultCapacity) { self.capacity = capacity }

    public var count: Int { state.withLock { $0.seqByID.count } }

    public func contains(_ id: Hash32) -> Bool { state.withLock { $0.seqByID[id] != nil } }

    /// Decodes, verifies and checks `bytes`; adds it when valid. Returns the transaction id.
    public func admit(_ bytes: [UInt8], ledger: LedgerState, store: BlockStore?) throws(MempoolRejection) -> Hash32 {
        guard bytes.count <= Self.maxTransactionBytes else {
            throw MempoolRejection(code: "too_large", message: "transaction is \(bytes.count) bytes; the limit is \(Self.maxTransactionBytes)")
        }
        let tx: Transaction
        do { tx = try Transaction(decoding: bytes) } catch {
            throw MempoolRejection(code: "malformed", message: error.description)
        }
        let id = tx.id
        if contains(id) { throw MempoolRejection(code: "already_pending", message: "transaction \(id.hex) is already in the mempool") }
        // Only an applied transaction blocks its id: a failed copy of the same body (a proposer can include one with a
        // broken signature, since the id leaves the signature out) must never stop the valid one.
        if let stored = try? store?.tx(hash: id), stored.ok {
            throw MempoolRejection(code: "duplicate", message: "transaction \(id.hex) was already committed in block \(stored.height)")
        }
        // The ledger's dry run checks the chain id, the signature, time, deduplication and funds.
        let context = BlockContext(height: ledger.height + 1, timeMillis: max(wallClockMillis(), ledger.lastBlockTimeMillis))
        if let error = ledger.check(tx, context: context) {
            throw MempoolRejection(code: errorCode(error), message: error.description)
        }
        let added: Bool = state.withLock { s in
            guard s.seqByID.count < capacity, s.seqByID[id] == nil else { return false }
            s.seqByID[id] = s.nextSeq
            s.bySeq[s.nextSeq] = (id, bytes)
            s.nextSeq += 1
            return true
        }
        guard added else {
            if contains(id) { throw MempoolRejection(code: "already_pending", message: "transaction \(id.hex) is already in the mempool") }
            throw MempoolRejection(code: "mempool_full", message: "the mempool holds \(capacity) transactions; retry shortly")
        }
        gauge.record(count)
        return id
    }

    /// Up to `max` transactions in arrival order.
    public func take(max: Int) -> [(id: Hash32, bytes: [UInt8])] {
        state.withLock { s in
            s.bySeq.keys.sorted().prefix(max).map { s.bySeq[$0]! }
        }
    }

    public func remove<S: Sequence>(_ ids: S) where S.Element == Hash32 {
        state.withLock { s in
            for id in ids { if let seq = s.seqByID.removeValue(forKey: id) { s.bySeq[seq] = nil } }
        }
        gauge.record(count)
    }

    /// Drops what a committed block settled: every id that was applied, and a failed id only when the pending copy is
    /// the very bytes that failed. A different copy (another signature over the same body) stays and can still apply.
    public func removeCommitted(applied: [Hash32], failed: [(id: Hash32, bytes: [UInt8])]) {
        state.withLock { s in
            for id in applied { if let seq = s.seqByID.removeValue(forKey: id) { s.bySeq[seq] = nil } }
            for (id, bytes) in failed {
                guard let seq = s.seqByID[id], s.bySeq[seq]?.bytes == bytes else { continue }
                s.seqByID[id] = nil
                s.bySeq[seq] = nil
            }
        }
        gauge.record(count)
    }
}

/// What the HTTP API and peers read: the latest committed state, published after each commit.
public struct ChainSnapshot: Sendable {
    public var ledger: LedgerState
    public var height: UInt64
    public var blockHash: Hash32
    public var stateRoot: Hash32
    public var timeMillis: UInt64
    public var validators: ValidatorSet
}

/// A new committed block, for the SSE stream.
public struct BlockEvent: Sendable {
    public var height: UInt64
    public var hash: Hash32
    public var timeMillis: UInt64
    public var txCount: Int
    public var stateRoot: Hash32
}

public final class ChainView: Sendable {
    private let snapshot: Mutex<ChainSnapshot>
    private let subscribers = Mutex<[Int: AsyncStream<BlockEvent>.Continuation]>([:])
    private let nextSubscriber = Mutex(0)

    init(_ initial: ChainSnapshot) { snapshot = Mutex(initial) }

    public var current: ChainSnapshot { snapshot.withLock { $0 } }

    func publish(_ new: ChainSnapshot, event: BlockEvent?) {
        snapshot.withLock { $0 = new }
        if let event { for sink in subscribers.withLock({ Array($0.values) }) { sink.yield(event) } }
    }

    /// Ends every subscription (shutdown: open SSE responses must finish for the HTTP server to stop).
    func finishSubscribers() {
        for sink in subscribers.withLock({ map in defer { map.removeAll() }; return Array(map.values) }) { sink.finish() }
    }

    /// New blocks from now on; the stream ends when the consumer stops iterating.
    public func subscribe() -> AsyncStream<BlockEvent> {
        let id = nextSubscriber.withLock { n in n += 1; return n }
        let (stream, sink) = AsyncStream<BlockEvent>.makeStream(bufferingPolicy: .bufferingNewest(256))
        subscribers.withLock { $0[id] = sink }
        sink.onTermination = { [weak self] _ in _ = self?.subscribers.withLock { $0.removeValue(forKey: id) } }
        return stream
    }
}
