import EdgeMatrixStore
import Synchronization

/// The router sequence numbers of requests still being served, so a settlement batch never closes over one whose
/// receipt may still come. The receipt store holds a number from before it is durable (`AcceptedSequenceHolds`) and
/// the gateway releases that hold once the answer is relayed (or failed); the tunnel holds it while a node works on
/// it, until the node's receipt is handled. A number leaves the set when every holder has released it.
///
/// A hold older than `maxHoldAge` no longer holds batches back (a response body that never ran would otherwise
/// stop settlement for good); its receipt, if one still comes after its batch closed, is refused.
public final class InFlightSequences: AcceptedSequenceHolds, Sendable {
    struct Entry {
        var count: Int
        /// After this instant the number no longer holds batches back.
        var expires: ContinuousClock.Instant
    }

    private let holders = Mutex<[UInt64: Entry]>([:])
    /// Numbers held since a restart (`holdUntilReceipt`), with the nodes they were assigned to: their first stored
    /// receipt releases them, and so does the end of the grace after each such node has reconnected.
    private let restored = Mutex<[UInt64: Set<String>]>([:])
    /// How long after a node reconnects its restored numbers still hold: it re-delivers its receipts right after
    /// registering, so what has not come by then is not coming (the answer was cancelled before any byte).
    public let reconnectGrace: Duration
    public let maxHoldAge: Duration

    public init(maxHoldAge: Duration = .seconds(3600), reconnectGrace: Duration = .seconds(30)) {
        self.maxHoldAge = maxHoldAge
        self.reconnectGrace = reconnectGrace
    }

    public func hold(_ sequence: UInt64) {
        hold(sequence, for: maxHoldAge)
    }

    /// Holds `sequence` for at most `duration` (a restarted router re-holds the requests its store shows assigned
    /// and unreceipted for a shorter grace: their nodes re-deliver receipts on reconnecting).
    public func hold(_ sequence: UInt64, for duration: Duration) {
        let expires = ContinuousClock.now + duration
        holders.withLock { holders in
            if var entry = holders[sequence] {
                entry.count += 1
                entry.expires = max(entry.expires, expires)
                holders[sequence] = entry
            } else {
                holders[sequence] = Entry(count: 1, expires: expires)
            }
        }
    }

    /// Holds a number assigned before a restart until a receipt of it is stored, or `duration` passes: the
    /// process that held it is gone, and its node re-delivers the receipt when it reconnects.
    public func holdUntilReceipt(_ sequence: UInt64, node: String, for duration: Duration) {
        let first = restored.withLock { restored in
            defer { restored[sequence, default: []].insert(node) }
            return restored[sequence] == nil
        }
        if first { hold(sequence, for: duration) }
    }

    public func receiptStored(_ sequence: UInt64) {
        if restored.withLock({ $0.removeValue(forKey: sequence) }) != nil { release(sequence) }
    }

    /// Node `node` registered again: numbers restored for it (and only for nodes that are all back) hold for at most
    /// `reconnectGrace` more.
    public func nodeRegistered(_ node: String) {
        let deadline = ContinuousClock.now + reconnectGrace
        let due: [UInt64] = restored.withLock { restored in
            var due: [UInt64] = []
            for (sequence, nodes) in restored where nodes.contains(node) {
                let waiting = nodes.subtracting([node])
                restored[sequence] = waiting.isEmpty ? [] : waiting
                if waiting.isEmpty { due.append(sequence) }
            }
            return due
        }
        holders.withLock { holders in
            for sequence in due {
                guard var entry = holders[sequence] else { continue }
                entry.expires = min(entry.expires, deadline)
                holders[sequence] = entry
            }
        }
    }

    public func release(_ sequence: UInt64) {
        holders.withLock { holders in
            guard var entry = holders[sequence] else { return }
            entry.count -= 1
            holders[sequence] = entry.count > 0 ? entry : nil
        }
    }

    /// Whether `sequence` is held now.
    public func isHeld(_ sequence: UInt64) -> Bool { holders.withLock { $0[sequence] != nil } }

    /// How many sequence numbers are held now.
    public var count: Int { holders.withLock { $0.count } }

    /// The lowest sequence number whose hold has not expired, if any.
    public var lowest: UInt64? {
        let now = ContinuousClock.now
        return holders.withLock { holders in
            holders.lazy.filter { now < $0.value.expires }.map(\.key).min()
        }
    }

    /// The highest sequence number a batch may close over now: one below the lowest in flight, or `lastAccepted`
    /// when none is. Read `lastAccepted` from the store before calling this: a number the store gave out is held
    /// from before it became readable, so none can be missed.
    public func batchUpperBound(lastAccepted: UInt64) -> UInt64 {
        guard let lowest else { return lastAccepted }
        return min(lastAccepted, lowest == 0 ? 0 : lowest - 1)
    }
}
