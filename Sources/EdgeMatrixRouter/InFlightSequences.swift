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
    public let maxHoldAge: Duration

    public init(maxHoldAge: Duration = .seconds(3600)) {
        self.maxHoldAge = maxHoldAge
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
