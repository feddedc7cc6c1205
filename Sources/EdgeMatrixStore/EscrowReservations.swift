import EdgeMatrixCore

/// The worst-case costs of accepted requests whose receipts are not stored yet, held against their payers' escrows
/// (docs/SETTLEMENT.md § 8). In memory only: one entry per request in flight, so bounded by the connection limits;
/// after a restart only stored receipts count.
public struct EscrowReservations: Sendable {
    public struct Entry: Sendable, Equatable {
        public var payer: Account
        /// The request's worst-case cost, in base units.
        public var amount: UInt64
        /// The latest attempt assigned to a node: only its receipt ends the reservation (an earlier attempt's receipt
        /// is a failed-over node's, while the request is still being served).
        public var attempt: UInt32
        /// After this the entry no longer counts (an answer whose end was never seen must not hold the escrow for ever).
        public var expires: ContinuousClock.Instant
    }

    /// A reservation older than this no longer counts: far beyond any answer (the node's app call times out in 600 s).
    public static let maxAge = Duration.seconds(3600)

    private(set) var entries: [UInt64: Entry] = [:]
    private var byPayer: [Account: UInt64] = [:]

    public init() {}

    /// The rule: serve a request only if what the payer owes, what its requests in flight may still cost and this
    /// request's worst case together fit in what its escrow has available. Sums saturate, so an overflow refuses.
    public static func admits(unsettled: UInt64, reserved: UInt64, worst: UInt64, available: UInt64) -> Bool {
        let (held, overflow1) = unsettled.addingReportingOverflow(reserved)
        let (total, overflow2) = held.addingReportingOverflow(worst)
        return !overflow1 && !overflow2 && total <= available
    }

    /// What the payer's requests in flight may still cost (saturating).
    public func reserved(payer: Account) -> UInt64 { byPayer[payer] ?? 0 }

    public func entry(_ sequence: UInt64) -> Entry? { entries[sequence] }

    public var count: Int { entries.count }

    public mutating func reserve(_ sequence: UInt64, payer: Account, amount: UInt64, now: ContinuousClock.Instant = .now) {
        release(sequence)
        entries[sequence] = Entry(payer: payer, amount: amount, attempt: 0, expires: now + Self.maxAge)
        let (sum, overflow) = reserved(payer: payer).addingReportingOverflow(amount)
        byPayer[payer] = overflow ? .max : sum
    }

    /// Ends a reservation; releasing one that is gone changes nothing.
    public mutating func release(_ sequence: UInt64) {
        guard let entry = entries.removeValue(forKey: sequence) else { return }
        // Recomputed when the sum saturated, so a release never leaves the payer holding less than its entries.
        let held = reserved(payer: entry.payer)
        if held == .max {
            let rest = entries.values.filter { $0.payer == entry.payer }.reduce(UInt64(0)) { sum, next in
                let (total, overflow) = sum.addingReportingOverflow(next.amount)
                return overflow ? .max : total
            }
            byPayer[entry.payer] = rest == 0 ? nil : rest
        } else {
            let rest = held - min(held, entry.amount)
            byPayer[entry.payer] = rest == 0 ? nil : rest
        }
    }

    /// Records that `attempt` of the request was assigned to a node.
    public mutating func assigned(_ sequence: UInt64, attempt: UInt32) {
        guard var entry = entries[sequence] else { return }
        entry.attempt = max(entry.attempt, attempt)
        entries[sequence] = entry
    }

    /// Drops reservations past their age.
    public mutating func expire(now: ContinuousClock.Instant = .now) {
        for (sequence, entry) in entries where entry.expires <= now { release(sequence) }
    }
}
