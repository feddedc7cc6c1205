import EdgeMatrixCore

/// Where a settlement stands. `challenged` and `reverted` arrive with challenge transactions.
public enum SettlementStatus: String, Hashable, Sendable, CaseIterable {
    /// Included: the escrow moved to pending; the challenge window is running.
    case pending
    /// The challenge window passed: the money moved (node payouts may still be held for the audit window).
    case final
    case challenged
    case reverted

    var tag: UInt8 {
        switch self {
        case .pending: 0
        case .final: 1
        case .challenged: 2
        case .reverted: 3
        }
    }
}

/// A settlement is named by its router and the router's batch number.
public struct SettlementKey: Hashable, Comparable, Sendable {
    public let router: PublicKey
    public let batchNumber: UInt64

    public init(router: PublicKey, batchNumber: UInt64) {
        self.router = router
        self.batchNumber = batchNumber
    }

    /// router raw[32] ‖ u64 batch number (big-endian), so byte order is router order, then batch order.
    public var keyBytes: [UInt8] {
        var writer = ByteWriter(capacity: 40)
        writer.writeRaw(router.rawRepresentation)
        writer.write(batchNumber)
        return writer.bytes
    }

    public static func < (lhs: SettlementKey, rhs: SettlementKey) -> Bool { lhs.keyBytes.lexicographicallyPrecedes(rhs.keyBytes) }
}

/// What the ledger remembers of one included batch. `entries` are kept while the money has not moved (they are
/// what it moves, and what challenges are checked against) and dropped once the settlement is final.
public struct SettlementRecord: Hashable, Sendable {
    public let key: SettlementKey
    public let firstSequence: UInt64
    public let lastSequence: UInt64
    /// The epoch of the height that included it.
    public let epoch: UInt64
    public let includedAtHeight: UInt64
    /// The end of this block is where the challenge window closes and the money moves.
    public let finalAtHeight: UInt64
    public let tx: Hash32
    public let commitment: Hash32
    public let receiptCount: UInt64
    public let pairCount: UInt64
    public let total: Amount
    /// The router fee and protocol fee in force at inclusion (the split uses these, whatever changes later).
    public let routerFeeBps: UInt32
    public let protocolFeeBps: UInt32
    public internal(set) var status: SettlementStatus
    public internal(set) var entries: [SettlementPairEntry]
    /// Per entry, what upheld challenges gave back to the payer (empty until the first one).
    public internal(set) var reverted: [UInt64] = []
    public internal(set) var upheldChallenges: UInt32 = 0

    /// What upheld challenges reverted, in total (while the entries are kept).
    public var revertedTotal: UInt64 { reverted.reduce(0) { $0.addingSaturating($1) } }

    public var router: PublicKey { key.router }
    public var batchNumber: UInt64 { key.batchNumber }
}

/// Where a router's next batch must start: its number and its first sequence number.
public struct SettlementCursor: Hashable, Sendable {
    public static let initial = SettlementCursor(nextBatch: 0, nextSequence: 1)
    public var nextBatch: UInt64
    public var nextSequence: UInt64

    public init(nextBatch: UInt64, nextSequence: UInt64) {
        self.nextBatch = nextBatch
        self.nextSequence = nextSequence
    }
}

/// A compute node's share of a final settlement, held for the audit window (proof of computing may forfeit it)
/// before it is credited to the node owner's default account.
public struct HeldPayout: Hashable, Sendable {
    public let node: PublicKey
    public let owner: Account
    public let amount: Amount
    public let settlement: SettlementKey
}

/// Income of one node in one epoch (the epoch of the settlements that paid it), in base units.
public struct NodeEarnings: Hashable, Sendable {
    public let epoch: UInt64
    /// Node shares of final settlements (released or still held).
    public internal(set) var asNode: UInt64 = 0
    /// Router fees of final settlements this node routed.
    public internal(set) var asRouter: UInt64 = 0
    /// Node shares still held for the audit window.
    public internal(set) var held: UInt64 = 0
    /// Receipts behind `asNode`.
    public internal(set) var receipts: UInt64 = 0
}

/// The split of one entry's amount (docs/SETTLEMENT.md § 4): both fees rounded down, the remainder to the node.
public struct SettlementSplit: Hashable, Sendable {
    public let protocolFee: UInt64
    public let routerFee: UInt64
    public let node: UInt64

    public init(amount: UInt64, routerFeeBps: UInt32, protocolFeeBps: UInt32) {
        func share(_ bps: UInt32) -> UInt64 {
            let product = amount.multipliedFullWidth(by: UInt64(min(bps, 10_000)))
            return UInt64(10_000).dividingFullWidth(product).quotient  // ≤ amount, so it fits
        }
        protocolFee = share(protocolFeeBps)
        routerFee = min(share(routerFeeBps), amount - protocolFee)
        node = amount - protocolFee - routerFee
    }
}

extension BlockEvent {
    /// Convenience for tests and logs: the settlement a finality or release event concerns, if any.
    public var settlement: SettlementKey? {
        switch self {
        case .escrowReturned: nil
        case .settlementFinal(let key, _, _, _): key
        case .payoutReleased(let payout): payout.settlement
        case .routerDefaulted: nil
        case .dataWithheld(let key, _, _, _, _): key.settlement
        case .omissionUpheld(let key, _, _, _): key.settlement
        }
    }
}

// MARK: - Queries

extension LedgerState {
    /// Where `router`'s next batch must start.
    public func settlementCursor(router: PublicKey) -> SettlementCursor { settlementCursors[router] ?? .initial }

    public func settlement(_ key: SettlementKey) -> SettlementRecord? { settlements[key] }

    /// Every settlement (of one router, when given), in key order: router, then batch number.
    public func settlements(router: PublicKey? = nil) -> [SettlementRecord] {
        settlements.values.filter { router == nil || $0.router == router }.sorted { $0.key < $1.key }
    }

    /// Node payouts still held, in release order (height, then the order they were made).
    public var heldPayoutList: [(releaseHeight: UInt64, payout: HeldPayout)] {
        heldPayouts.keys.sorted().flatMap { height in (heldPayouts[height] ?? []).map { (height, $0) } }
    }

    /// Income of `node` per epoch, oldest first.
    public func earnings(node: PublicKey) -> [NodeEarnings] {
        (nodeEarnings[node] ?? [:]).values.sorted { $0.epoch < $1.epoch }
    }
}

// MARK: - Applying `settle`

extension LedgerState {
    /// A router settles a batch. Signed by the router node itself or its owner; the fee is the owner's. The batch
    /// must be the router's next (number and sequence range contiguous with the last one), every entry's node a
    /// compute node, and every payer's escrow with this router must cover its entries: the whole batch moves to
    /// pending, or nothing does.
    mutating func applySettle(_ batch: SettlementBatch, signer: PublicKey, height: UInt64, tx: Hash32, commit: Bool) -> Applied {
        guard let router = nodes[batch.router] else { return .failure(.unknownNode(nodeKey: batch.router)) }
        guard router.role == .router else { return .failure(.wrongNodeRole(nodeKey: batch.router, role: router.role, expected: .router)) }
        // A retired router still settles what it served.
        guard signer == batch.router || signer == router.owner else { return .failure(.notNodeOwner(nodeKey: batch.router)) }
        // A router that missed a deadline has been replaced by its nodes' own settlements (§ 10).
        if let height = routerDefaults[batch.router] { return .failure(.routerDefaulted(router: batch.router, atHeight: height)) }
        let cursor = settlementCursor(router: batch.router)
        guard batch.batchNumber == cursor.nextBatch, batch.firstSequence == cursor.nextSequence else {
            return .failure(.settlementOutOfOrder(router: batch.router, expected: cursor, gotBatch: batch.batchNumber,
                                                  gotFirstSequence: batch.firstSequence))
        }
        guard batch.lastSequence < .max else {
            return .failure(.genericError(code: LedgerError.GenericCode.amountOverflow, message: "the last sequence number would leave no next batch"))
        }
        // Charges per payer (one payer may appear with several nodes), checked before anything changes.
        var charges = [Account: UInt64]()
        for entry in batch.entries {
            guard let node = nodes[entry.node] else { return .failure(.unknownNode(nodeKey: entry.node)) }
            guard node.role == .compute else { return .failure(.wrongNodeRole(nodeKey: entry.node, role: node.role, expected: .compute)) }
            charges[entry.payer, default: 0] += entry.amount  // Σ amount ≤ batch total, which fits in u64
        }
        let payers = charges.keys.sorted()
        // Nodes' open notices in the batch's range lapse (the batch covers them); their charges come back first.
        let lapsing = lapsingNotices(router: batch.router, sequences: batch.sequenceRange)
        var released = [Account: UInt64]()
        for key in lapsing { if let notice = receiptNotices[key] { released[notice.payer, default: 0] += notice.charged } }
        for payer in payers {
            let key = EscrowKey(payer: payer, router: batch.router)
            let charge = charges[payer] ?? 0, back = released[payer] ?? 0
            guard let escrow = escrows[key] else { return .failure(.unknownEscrow(payer: payer, router: batch.router)) }
            let available = escrow.available.baseUnits + back  // back ≤ pending ≤ balance
            guard charge <= available else {
                return .failure(.escrowInsufficient(payer: payer, router: batch.router, available: Amount(baseUnits: available),
                                                    needed: Amount(baseUnits: charge)))
            }
        }
        let fee = parameters.transferFee
        let owner = Account(owner: router.owner)
        if let error = checkAffordable(owner, 0, fee: fee.baseUnits) { return .failure(error) }
        let finalAt = height.addingSaturating(parameters.challengeWindowBlocks)
        let key = SettlementKey(router: batch.router, batchNumber: batch.batchNumber)
        let effect = TxEffect.settled(router: batch.router, batch: batch.batchNumber, total: Amount(baseUnits: batch.total),
                                      finalAtHeight: finalAt)
        guard commit else { return .success((fee, effect)) }
        debit(owner, fee.baseUnits)
        for key in lapsing { lapseNotice(key) }
        for payer in payers { _ = escrowCharge(EscrowKey(payer: payer, router: batch.router), Amount(baseUnits: charges[payer] ?? 0)) }
        settlements[key] = SettlementRecord(
            key: key, firstSequence: batch.firstSequence, lastSequence: batch.lastSequence,
            epoch: height / parameters.epochLengthBlocks, includedAtHeight: height, finalAtHeight: finalAt, tx: tx,
            commitment: batch.commitment, receiptCount: batch.receiptCount, pairCount: UInt64(batch.entries.count),
            total: Amount(baseUnits: batch.total), routerFeeBps: router.routerFeeBps, protocolFeeBps: parameters.protocolFeeBps,
            status: .pending, entries: batch.entries)
        settlementCursors[batch.router] = SettlementCursor(nextBatch: batch.batchNumber + 1, nextSequence: batch.lastSequence + 1)
        settlementsDue[finalAt, default: []].append(key)
        return .success((fee, effect))
    }

    // MARK: End of block

    /// Settlements whose challenge window ends at `height`: per entry, in entry order, the escrow pays `amount`;
    /// the protocol fee is burned, the router fee credited to the router owner, the node share held for the audit
    /// window. Settlements are taken in key order.
    mutating func finaliseDueSettlements(height: UInt64) -> [BlockEvent] {
        guard let due = settlementsDue.removeValue(forKey: height) else { return [] }
        var events = [BlockEvent]()
        let releaseAt = height.addingSaturating(parameters.auditWindowBlocks)
        for key in Set(due).sorted() {
            guard var record = settlements[key], record.status == .pending || record.status == .challenged else { continue }
            let routerOwner = nodes[key.router].map { Account(owner: $0.owner) }
            var burnedHere: UInt64 = 0, routerFees: UInt64 = 0, paid: UInt64 = 0
            for (index, entry) in record.entries.enumerated() {
                // What upheld challenges left of the entry. The spend cannot fail: the charge moved `amount` to
                // pending at inclusion, and only this step or a revert (which lowers `amount`) takes it out again.
                let amount = entry.amount - (record.reverted.isEmpty ? 0 : record.reverted[index])
                guard amount > 0, escrowSpend(EscrowKey(payer: entry.payer, router: key.router), Amount(baseUnits: amount)) == nil else { continue }
                paid += amount
                let split = SettlementSplit(amount: amount, routerFeeBps: record.routerFeeBps, protocolFeeBps: record.protocolFeeBps)
                burnedHere += split.protocolFee
                routerFees += split.routerFee
                if let routerOwner { credit(routerOwner, split.routerFee) } else { burnedHere += split.routerFee }
                if split.node > 0, let owner = nodes[entry.node].map({ Account(owner: $0.owner) }) {
                    heldPayouts[releaseAt, default: []].append(
                        HeldPayout(node: entry.node, owner: owner, amount: Amount(baseUnits: split.node), settlement: key))
                    var earning = nodeEarnings[entry.node, default: [:]][record.epoch] ?? NodeEarnings(epoch: record.epoch)
                    earning.asNode += split.node
                    earning.held += split.node
                    earning.receipts += entry.count
                    nodeEarnings[entry.node, default: [:]][record.epoch] = earning
                } else {
                    burnedHere += split.node  // a node share of 0, or a node that no longer exists
                }
            }
            if routerFees > 0 {
                var earning = nodeEarnings[key.router, default: [:]][record.epoch] ?? NodeEarnings(epoch: record.epoch)
                earning.asRouter += routerFees
                nodeEarnings[key.router, default: [:]][record.epoch] = earning
            }
            burn(burnedHere)
            record.status = paid == 0 && record.upheldChallenges > 0 ? .reverted : .final
            record.entries = []
            settlements[key] = record
            dropDataRequests(of: key)
            dropOmissionQueries(of: key)
            events.append(.settlementFinal(key, total: Amount(baseUnits: paid), routerFees: Amount(baseUnits: routerFees), burned: Amount(baseUnits: burnedHere)))
        }
        return events
    }

    /// Node payouts whose audit window ends at `height` are credited to the node owners, in the order they were held.
    mutating func releaseDuePayouts(height: UInt64) -> [BlockEvent] {
        guard let due = heldPayouts.removeValue(forKey: height) else { return [] }
        var events = [BlockEvent]()
        for payout in due {
            credit(payout.owner, payout.amount.baseUnits)
            // A node-settled share (§ 10) was held at its settlement height plus the audit window.
            let epoch: UInt64? = payout.settlement.batchNumber == SettlementKey.nodeSettledBatch
                ? (height - min(height, parameters.auditWindowBlocks)) / parameters.epochLengthBlocks
                : settlements[payout.settlement]?.epoch
            if let epoch, var earning = nodeEarnings[payout.node]?[epoch] {
                earning.held = earning.held.subtractingSaturating(payout.amount.baseUnits)
                nodeEarnings[payout.node]?[epoch] = earning
            }
            events.append(.payoutReleased(payout))
        }
        return events
    }
}
