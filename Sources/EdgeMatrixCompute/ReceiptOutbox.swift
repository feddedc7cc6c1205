import EdgeMatrixCore

/// Receipts signed but not yet acknowledged by the router. They are re-delivered on the control stream
/// until acknowledged, so a router crash between answering and storing loses none.
public actor ReceiptOutbox {
    private var pending: [Hash32: Receipt] = [:]
    private var order: [Hash32] = []

    public init() {}

    public func add(_ receipt: Receipt) {
        guard pending[receipt.id] == nil else { return }
        pending[receipt.id] = receipt
        order.append(receipt.id)
    }

    public func acknowledge(_ id: Hash32) {
        guard pending.removeValue(forKey: id) != nil else { return }
        order.removeAll { $0 == id }
    }

    /// The receipt with this id, if it still awaits acknowledgement.
    public func pending(_ id: Hash32) -> Receipt? { pending[id] }

    /// Unacknowledged receipts, oldest first.
    public func unacknowledged() -> [Receipt] { order.compactMap { pending[$0] } }
}
