import EdgeMatrixCore
import Metrics

/// Receipts signed but not yet acknowledged by the router. They are re-delivered on the control stream
/// until acknowledged, so a router crash between answering and storing loses none.
public actor ReceiptOutbox {
    private var pending: [Hash32: Receipt] = [:]
    private var order: [Hash32] = []
    /// A router that never acknowledges must not grow the node's memory for ever: past this, the oldest receipt
    /// is dropped (and counted) to make room.
    public let capacity: Int

    public init(capacity: Int = 100_000) { self.capacity = max(1, capacity) }

    public func add(_ receipt: Receipt) {
        guard pending[receipt.id] == nil else { return }
        if order.count >= capacity {
            let oldest = order.removeFirst()
            pending[oldest] = nil
            Counter(label: "emc_compute_receipts_dropped_total").increment()
        }
        pending[receipt.id] = receipt
        order.append(receipt.id)
    }

    /// Returns the acknowledged receipt, or nil if it was not pending (already acknowledged, or unknown).
    @discardableResult
    public func acknowledge(_ id: Hash32) -> Receipt? {
        guard let receipt = pending.removeValue(forKey: id) else { return nil }
        order.removeAll { $0 == id }
        return receipt
    }

    /// The receipt with this id, if it still awaits acknowledgement.
    public func pending(_ id: Hash32) -> Receipt? { pending[id] }

    /// Unacknowledged receipts, oldest first.
    public func unacknowledged() -> [Receipt] { order.compactMap { pending[$0] } }

    /// Unacknowledged receipts countersignable by one router, oldest first: a receipt is only ever sent to the
    /// router it names (another router refuses it, and counts the node as misbehaving).
    public func unacknowledged(for routerID: NodeID) -> [Receipt] {
        order.compactMap { pending[$0] }.filter { $0.body.routerID == routerID }
    }
}
