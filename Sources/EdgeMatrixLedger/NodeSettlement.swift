import EdgeMatrixCore

// Node settlement (kind 14, `node_settle`): a compute node settles its own router-countersigned receipts when their
// router does not (docs/SETTLEMENT.md § 10). A node notices receipts its router has not settled; the notice charges
// the payer's escrow (moves it to pending) at once, so a payer cannot withdraw from under it. If the router's
// batches cover the noticed sequence numbers within `settlement_deadline_blocks`, the notice lapses and the charge
// goes back. If not, at the end of the deadline's block the router is **defaulted**: every open notice of the router
// settles, the ledger refuses the router's `settle` from then on, and later notices settle at once. Pure and
// deterministic like the rest of the ledger: integers, no clock, keys processed in sorted order.

/// A compute node's notice of receipts that one router countersigned (kind 14).
public struct NodeSettlement: Hashable, Sendable {
    /// At most this many receipts per transaction (bounds the work and size of one transaction).
    public static let maxReceipts = 64
    /// At most this many noticed receipts of one router may be open (waiting for the deadline) at a time.
    public static let maxOpenNoticesPerRouter = 65_536

    public let router: PublicKey
    public let node: PublicKey
    /// Each receipt as a settlement leaf carries it: body ‖ node signature (64) ‖ router countersignature (64).
    public let receipts: [[UInt8]]

    public init(router: PublicKey, node: PublicKey, receipts: [[UInt8]]) throws(DecodingError) {
        guard (1...Self.maxReceipts).contains(receipts.count) else {
            throw .invalidValue("a node_settle carries 1 to \(Self.maxReceipts) receipts, got \(receipts.count)")
        }
        for receipt in receipts {
            guard !receipt.isEmpty else { throw .invalidValue("a node_settle receipt is empty") }
            guard receipt.count <= SettlementBatch.maxReceiptBytes else { throw .lengthTooLarge(receipt.count, limit: SettlementBatch.maxReceiptBytes) }
        }
        self.router = router
        self.node = node
        self.receipts = receipts
    }
}

extension NodeSettlement: CanonicalCodable {
    /// router (32) ‖ node (32) ‖ u32 n ‖ n × (u32 length ‖ receipt bytes), 1 ≤ n ≤ 64, 1 ≤ length ≤ 65,536.
    public func encode(to writer: inout ByteWriter) {
        router.encode(to: &writer)
        node.encode(to: &writer)
        writer.write(UInt32(truncatingIfNeeded: receipts.count))
        for receipt in receipts { writer.write(bytes: receipt) }
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let router = try PublicKey(from: &reader)
        let node = try PublicKey(from: &reader)
        let count = Int(try reader.readUInt32())
        guard (1...Self.maxReceipts).contains(count) else { throw .lengthTooLarge(count, limit: Self.maxReceipts) }
        var receipts = [[UInt8]]()
        receipts.reserveCapacity(count)
        for _ in 0..<count { receipts.append(try reader.readBoundedBytes(max: SettlementBatch.maxReceiptBytes)) }
        try self.init(router: router, node: node, receipts: receipts)
    }
}

/// A noticed receipt is named by its router and its (sequence, attempt): the receipt's identity.
public struct ReceiptNoticeKey: Hashable, Comparable, Sendable {
    public let router: PublicKey
    public let sequence: UInt64
    public let attempt: UInt32

    public init(router: PublicKey, sequence: UInt64, attempt: UInt32) {
        self.router = router
        self.sequence = sequence
        self.attempt = attempt
    }

    /// router[32] ‖ u64 sequence ‖ u32 attempt (big-endian): byte order is router, then sequence, then attempt.
    public var keyBytes: [UInt8] {
        var writer = ByteWriter(capacity: 44)
        writer.writeRaw(router.rawRepresentation)
        writer.write(sequence)
        writer.write(attempt)
        return writer.bytes
    }

    public static func < (lhs: ReceiptNoticeKey, rhs: ReceiptNoticeKey) -> Bool { lhs.keyBytes.lexicographicallyPrecedes(rhs.keyBytes) }
}

/// What the ledger remembers of one noticed receipt. Open notices wait for their deadline; settled ones stay for
/// good (they are what stops a receipt being paid twice).
public struct ReceiptNotice: Hashable, Sendable {
    public enum Status: String, Hashable, Sendable {
        /// Charged to the escrow (pending); waiting for the router's batches or the deadline.
        case open
        /// Paid: the charge left the escrow, the protocol fee was burned, the node share is held for the audit window.
        case settled

        var tag: UInt8 { self == .open ? 0 : 1 }
    }

    public let key: ReceiptNoticeKey
    public let payer: Account
    public let node: PublicKey
    /// units × the node's registered prices, in base units.
    public let amount: UInt64
    /// What the escrow holds for it (pending): `min(amount, available)` when noticed.
    public let charged: UInt64
    public let noticedAtHeight: UInt64
    /// The end of this block is the deadline: by then the router's batches must cover the sequence number.
    public let dueAtHeight: UInt64
    public let tx: Hash32
    public internal(set) var status: Status
    /// The block at whose end (default) or in which (a notice after the default) the money moved; 0 while open.
    public internal(set) var settledAtHeight: UInt64 = 0

    public var router: PublicKey { key.router }
    public var sequence: UInt64 { key.sequence }
    public var attempt: UInt32 { key.attempt }
}

/// `(router, sequence)`: one request. Every noticed attempt of one request must have one payer.
struct NoticedRequest: Hashable, Sendable {
    let router: PublicKey
    let sequence: UInt64
}

extension SettlementKey {
    /// The batch number that held payouts of node-settled receipts carry (no router batch can have it: a router's
    /// batch numbers stay below its sequence numbers, which stay below 2^64 − 1).
    public static let nodeSettledBatch = UInt64.max
}

/// Why a receipt in a `node_settle` was refused. Stable codes; see docs/PROTOCOL.md § 12.6.
public enum NodeSettleRefusal {
    public static let wrongNode = "receipt_wrong_node"
    public static let belowCursor = "receipt_already_in_settled_range"
    public static let alreadyNoticed = "receipt_already_noticed"
    public static let otherPayer = "receipt_sequence_other_payer"
    public static let zeroAmount = "receipt_worth_nothing"
    public static let noEscrow = "receipt_payer_has_no_escrow"
}

// MARK: - Queries

extension LedgerState {
    /// The height at the end of which `router` defaulted (missed a deadline), or nil.
    public func routerDefaultHeight(_ router: PublicKey) -> UInt64? { routerDefaults[router] }

    /// Every router that has defaulted, with its height, in key order.
    public var defaultedRouters: [(router: PublicKey, height: UInt64)] {
        routerDefaults.map { ($0.key, $0.value) }.sorted { $0.router.rawRepresentation.lexicographicallyPrecedes($1.router.rawRepresentation) }
    }

    public func receiptNotice(_ key: ReceiptNoticeKey) -> ReceiptNotice? { receiptNotices[key] }

    /// Noticed receipts (of one router and/or node, when given), in key order: router, sequence, attempt.
    public func receiptNotices(router: PublicKey? = nil, node: PublicKey? = nil) -> [ReceiptNotice] {
        receiptNotices.values.filter { (router == nil || $0.router == router) && (node == nil || $0.node == node) }.sorted { $0.key < $1.key }
    }

    /// How many noticed receipts of `router` wait for their deadline.
    public func openNoticeCount(router: PublicKey) -> Int { openNotices[router]?.count ?? 0 }
}

// MARK: - Receipt check

extension RegistryLeafVerifier {
    /// The receipt check of settlement leaves (§ 9), for receipts of `router`: decoded, both signatures, registered
    /// prices, worth.
    static func verify(_ receiptBytes: [UInt8], router: PublicKey, nodes: [PublicKey: NodeRecord]) throws(SettlementLeafRejection) -> (ReceiptBody, UInt64) {
        let receipt: Receipt
        do { receipt = try Receipt(settlementBytes: receiptBytes) } catch {
            throw SettlementLeafRejection(code: "receipt_malformed", message: error.description)
        }
        let body = receipt.body
        guard body.router == router else {
            throw SettlementLeafRejection(code: "receipt_wrong_router", message: "the receipt names router \(body.routerID), not \(router.nodeID)")
        }
        guard let node = nodes[body.node], node.role == .compute else {
            throw SettlementLeafRejection(code: "receipt_unknown_node", message: "node \(body.nodeID) is not a registered compute node")
        }
        do { try receipt.verify(nodeKey: body.node, routerKey: router) } catch {
            throw SettlementLeafRejection(code: error == .badRouterSignature ? "receipt_bad_router_signature" : "receipt_bad_node_signature",
                                          message: error.description)
        }
        let registered = [node.prices, node.priorPrices].flatMap { list in
            PricedWorkKind.allCases.map { list.unitPrices(model: body.model, app: body.app, kind: $0) }
        }
        guard registered.contains(body.prices) else {
            throw SettlementLeafRejection(code: "receipt_unregistered_price", message: "the receipt's prices are not node \(body.nodeID)'s registered prices")
        }
        guard let amount = body.cost else {
            throw SettlementLeafRejection(code: "receipt_cost_overflow", message: "units × prices exceed 2^64 − 1 base units")
        }
        return (body, amount)
    }
}

// MARK: - Applying `node_settle`

extension LedgerState {
    /// A compute node notices (or, once its router has defaulted, settles) receipts of one router. Signed by the
    /// node key or its owner; the fee is the owner's. Every receipt is checked as a challenge checks a leaf, plus:
    /// it is this node's, its sequence number is at or after the router's settled cursor, it was not noticed before
    /// (nor the same request for another payer), it is worth more than 0, and its payer has an escrow with the router.
    /// All receipts are accepted, or none.
    mutating func applyNodeSettle(_ n: NodeSettlement, signer: PublicKey, height: UInt64, tx: Hash32, commit: Bool) -> Applied {
        guard let node = nodes[n.node] else { return .failure(.unknownNode(nodeKey: n.node)) }
        guard node.role == .compute else { return .failure(.wrongNodeRole(nodeKey: n.node, role: node.role, expected: .compute)) }
        // A retired node is still paid for what it served.
        guard signer == n.node || signer == node.owner else { return .failure(.notNodeOwner(nodeKey: n.node)) }
        guard let router = nodes[n.router] else { return .failure(.unknownNode(nodeKey: n.router)) }
        guard router.role == .router else { return .failure(.wrongNodeRole(nodeKey: n.router, role: router.role, expected: .router)) }
        let defaulted = routerDefaults[n.router] != nil
        if !defaulted, openNoticeCount(router: n.router) + n.receipts.count > NodeSettlement.maxOpenNoticesPerRouter {
            return .failure(.noticeLimitReached(router: n.router, limit: UInt64(NodeSettlement.maxOpenNoticesPerRouter)))
        }
        let cursor = settlementCursor(router: n.router).nextSequence
        // Check every receipt before anything changes; charges take what each escrow still has available, in order.
        var accepted = [(key: ReceiptNoticeKey, payer: Account, amount: UInt64, charged: UInt64)]()
        var seenKeys = Set<ReceiptNoticeKey>()
        var seenRequests = [NoticedRequest: Account]()
        var available = [Account: UInt64]()
        for (index, bytes) in n.receipts.enumerated() {
            func refuse(_ code: String, _ message: String) -> Applied {
                .failure(.receiptRefused(index: UInt32(index), code: code, message: message))
            }
            let verified: (ReceiptBody, UInt64)
            do throws(SettlementLeafRejection) {
                verified = try RegistryLeafVerifier.verify(bytes, router: n.router, nodes: nodes)
            } catch { return refuse(error.code, error.message) }
            let (body, amount) = verified
            guard body.node == n.node else { return refuse(NodeSettleRefusal.wrongNode, "the receipt is node \(body.nodeID)'s, not \(n.node.nodeID)'s") }
            guard body.sequence >= cursor else {
                return refuse(NodeSettleRefusal.belowCursor, "sequence \(body.sequence) is in a range the router already settled (its next is \(cursor)); if its batch left the receipt out, file an omission challenge")
            }
            let key = ReceiptNoticeKey(router: n.router, sequence: body.sequence, attempt: body.attempt)
            guard receiptNotices[key] == nil, seenKeys.insert(key).inserted else {
                return refuse(NodeSettleRefusal.alreadyNoticed, "request \(body.sequence) attempt \(body.attempt) of this router was already noticed")
            }
            let request = NoticedRequest(router: n.router, sequence: body.sequence)
            if let other = noticedRequests[request] ?? seenRequests[request], other != body.payer {
                return refuse(NodeSettleRefusal.otherPayer, "request \(body.sequence) of this router was already noticed for payer \(other)")
            }
            seenRequests[request] = body.payer
            guard amount > 0 else { return refuse(NodeSettleRefusal.zeroAmount, "the receipt is worth 0 base units") }
            if available[body.payer] == nil {
                guard let escrow = escrows[EscrowKey(payer: body.payer, router: n.router)] else {
                    return refuse(NodeSettleRefusal.noEscrow, "payer \(body.payer) has no escrow with router \(n.router.nodeID)")
                }
                available[body.payer] = escrow.available.baseUnits
            }
            let charged = min(amount, available[body.payer] ?? 0)
            available[body.payer] = (available[body.payer] ?? 0) - charged
            accepted.append((key, body.payer, amount, charged))
        }
        let fee = parameters.transferFee
        let owner = Account(owner: node.owner)
        if let error = checkAffordable(owner, 0, fee: fee.baseUnits) { return .failure(error) }
        let total = accepted.reduce(UInt64(0)) { $0.addingSaturating($1.amount) }
        let charged = accepted.reduce(UInt64(0)) { $0 + $1.charged }  // ≤ Σ available of distinct escrows ≤ supply
        let dueAt = height.addingSaturating(parameters.settlementDeadlineBlocks)
        let effect = TxEffect.receiptsNoticed(router: n.router, node: n.node, receipts: UInt32(accepted.count),
                                              amount: Amount(baseUnits: total), charged: Amount(baseUnits: charged),
                                              dueAtHeight: defaulted ? nil : dueAt)
        guard commit else { return .success((fee, effect)) }
        debit(owner, fee.baseUnits)
        for item in accepted {
            _ = escrowCharge(EscrowKey(payer: item.payer, router: n.router), Amount(baseUnits: item.charged))
            receiptNotices[item.key] = ReceiptNotice(key: item.key, payer: item.payer, node: n.node, amount: item.amount, charged: item.charged,
                                                     noticedAtHeight: height, dueAtHeight: dueAt, tx: tx, status: .open)
            noticedRequests[NoticedRequest(router: n.router, sequence: item.key.sequence)] = item.payer
            if defaulted {
                settleNotice(item.key, height: height)
            } else {
                openNotices[n.router, default: []].insert(item.key)
                noticesDue[dueAt, default: []].append(item.key)
            }
        }
        return .success((fee, effect))
    }

    /// Pays one open notice at `height`: its charge leaves the escrow, the protocol fee is burned, the rest is held
    /// for the node owner for the audit window. The router earns nothing (its fee goes to the node that settled).
    /// Returns (paid, burned).
    @discardableResult
    mutating func settleNotice(_ key: ReceiptNoticeKey, height: UInt64) -> (paid: UInt64, burned: UInt64) {
        guard var notice = receiptNotices[key], notice.status == .open else { return (0, 0) }
        openNotices[key.router]?.remove(key)
        if openNotices[key.router]?.isEmpty == true { openNotices[key.router] = nil }
        notice.status = .settled
        notice.settledAtHeight = height
        receiptNotices[key] = notice
        // Cannot fail: the charge is part of `pending`, which only its own settlement or lapse takes out again.
        guard notice.charged > 0, escrowSpend(EscrowKey(payer: notice.payer, router: key.router), Amount(baseUnits: notice.charged)) == nil else {
            return (0, 0)
        }
        let split = SettlementSplit(amount: notice.charged, routerFeeBps: 0, protocolFeeBps: parameters.protocolFeeBps)
        var burnedHere = split.protocolFee
        let epoch = height / parameters.epochLengthBlocks
        if split.node > 0, let owner = nodes[notice.node].map({ Account(owner: $0.owner) }) {
            let releaseAt = height.addingSaturating(parameters.auditWindowBlocks)
            heldPayouts[releaseAt, default: []].append(
                HeldPayout(node: notice.node, owner: owner, amount: Amount(baseUnits: split.node),
                           settlement: SettlementKey(router: key.router, batchNumber: SettlementKey.nodeSettledBatch)))
            var earning = nodeEarnings[notice.node, default: [:]][epoch] ?? NodeEarnings(epoch: epoch)
            earning.asNode += split.node
            earning.held += split.node
            earning.receipts += 1
            nodeEarnings[notice.node, default: [:]][epoch] = earning
        } else {
            burnedHere += split.node
        }
        burn(burnedHere)
        return (notice.charged, burnedHere)
    }

    /// The open notices of `router` that a `settle` over `sequences` covers, in key order: they lapse (`lapseNotice`)
    /// before the batch is charged, their charges going back to available.
    func lapsingNotices(router: PublicKey, sequences: ClosedRange<UInt64>) -> [ReceiptNoticeKey] {
        (openNotices[router] ?? []).filter { sequences.contains($0.sequence) }.sorted()
    }

    mutating func lapseNotice(_ key: ReceiptNoticeKey) {
        guard let notice = receiptNotices[key], notice.status == .open else { return }
        openNotices[key.router]?.remove(key)
        if openNotices[key.router]?.isEmpty == true { openNotices[key.router] = nil }
        receiptNotices[key] = nil
        noticedRequests[NoticedRequest(router: key.router, sequence: key.sequence)] = nil
        if notice.charged > 0 { _ = escrowUncharge(EscrowKey(payer: notice.payer, router: key.router), Amount(baseUnits: notice.charged)) }
        // The stale entry in `noticesDue` is skipped when it comes due.
    }

    // MARK: End of block

    /// Notices whose deadline ends at `height`: one still open means its router's batches did not cover it in time.
    /// Its router defaults (routers in key order), and every open notice of that router settles now, in key order.
    mutating func defaultLateRouters(height: UInt64) -> [BlockEvent] {
        guard let due = noticesDue.removeValue(forKey: height) else { return [] }
        var events = [BlockEvent]()
        for key in Set(due).sorted() {
            guard let notice = receiptNotices[key], notice.status == .open, routerDefaults[key.router] == nil else { continue }
            if settlementCursor(router: key.router).nextSequence > key.sequence {
                lapseNotice(key)  // covered (applySettle lapses these already; kept as a guard)
                continue
            }
            routerDefaults[key.router] = height
            var paid: UInt64 = 0, burnedHere: UInt64 = 0, count: UInt64 = 0
            for open in (openNotices[key.router] ?? []).sorted() {
                let result = settleNotice(open, height: height)
                paid += result.paid
                burnedHere += result.burned
                count += 1
            }
            events.append(.routerDefaulted(router: key.router, receipts: count, paid: Amount(baseUnits: paid), burned: Amount(baseUnits: burnedHere)))
        }
        return events
    }
}
