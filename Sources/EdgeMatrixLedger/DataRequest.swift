import EdgeMatrixCore

// Withheld data (docs/SETTLEMENT.md § 11, PROTOCOL.md § 6.16 and § 6.17): while a settlement is pending, a payer or
// compute node of one of its pairs asks on chain for that pair's leaves (kind 15 `data_request`, with a bond). The
// router answers with the leaves themselves (kind 16 `data_response`, in ordered chunks); the ledger rebuilds the
// pair's Merkle-sum root from them and closes the request when they are all there and hash to the committed root,
// sum and count. A request still open at its deadline (end of block) reverts the pair's charge and slashes the
// router. The deadline always falls before the settlement's window closes, so a settlement never finalises with a
// request open, and the posted leaves leave time for a challenge (kind 13) that uses them.

/// Asks `router` for the leaves of pair (payer, node) of its batch `batchNumber` (kind 15).
public struct DataRequest: Hashable, Sendable {
    public var router: PublicKey
    public var batchNumber: UInt64
    public var payer: Account
    public var node: PublicKey

    public init(router: PublicKey, batchNumber: UInt64, payer: Account, node: PublicKey) {
        self.router = router
        self.batchNumber = batchNumber
        self.payer = payer
        self.node = node
    }

    public var key: DataRequestKey {
        DataRequestKey(settlement: SettlementKey(router: router, batchNumber: batchNumber), pair: SettlementPair(payer: payer, node: node))
    }
}

extension DataRequest: CanonicalCodable {
    /// router (32) ‖ batch u64 ‖ payer (Account) ‖ node (32).
    public func encode(to writer: inout ByteWriter) {
        router.encode(to: &writer)
        writer.write(batchNumber)
        payer.encode(to: &writer)
        node.encode(to: &writer)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        router = try PublicKey(from: &reader)
        batchNumber = try reader.readUInt64()
        payer = try Account(from: &reader)
        node = try PublicKey(from: &reader)
    }
}

/// One leaf as a data response carries it: the receipt bytes the leaf hash covers, and the amount the leaf carries.
public struct DataLeaf: Hashable, Sendable {
    public var receiptBytes: [UInt8]
    public var amount: UInt64

    public init(receiptBytes: [UInt8], amount: UInt64) {
        self.receiptBytes = receiptBytes
        self.amount = amount
    }

    public init(_ leaf: SettlementLeaf) { self.init(receiptBytes: leaf.receiptBytes, amount: leaf.amount) }
}

/// The router's answer to a data request (kind 16): leaves `firstIndex ..< firstIndex + leaves.count` of the pair's
/// tree, in tree order. A pair with more leaves than one transaction holds is answered in several, in order.
public struct DataResponse: Hashable, Sendable {
    /// At most this many leaves per transaction (and at most `TransactionLimits.maxSettleTransactionBytes` in all).
    public static let maxLeaves = 4_096

    public var router: PublicKey
    public var batchNumber: UInt64
    public var payer: Account
    public var node: PublicKey
    public var firstIndex: UInt64
    public var leaves: [DataLeaf]

    public init(router: PublicKey, batchNumber: UInt64, payer: Account, node: PublicKey, firstIndex: UInt64, leaves: [DataLeaf]) {
        self.router = router
        self.batchNumber = batchNumber
        self.payer = payer
        self.node = node
        self.firstIndex = firstIndex
        self.leaves = leaves
    }

    public var key: DataRequestKey {
        DataRequestKey(settlement: SettlementKey(router: router, batchNumber: batchNumber), pair: SettlementPair(payer: payer, node: node))
    }

    /// Splits a pair's leaves (in tree order) into responses that each fit one transaction.
    public static func chunks(router: PublicKey, batchNumber: UInt64, pair: SettlementPair, leaves: [DataLeaf],
                              maxBytes: Int = TransactionLimits.maxSettleTransactionBytes - 4_096) -> [DataResponse] {
        var responses = [DataResponse]()
        var current = [DataLeaf](), size = 0, first: UInt64 = 0
        for leaf in leaves {
            let leafSize = 4 + leaf.receiptBytes.count + 8
            if !current.isEmpty, current.count == maxLeaves || size + leafSize > maxBytes {
                responses.append(DataResponse(router: router, batchNumber: batchNumber, payer: pair.payer, node: pair.node,
                                              firstIndex: first, leaves: current))
                first += UInt64(current.count)
                current = []
                size = 0
            }
            current.append(leaf)
            size += leafSize
        }
        if !current.isEmpty {
            responses.append(DataResponse(router: router, batchNumber: batchNumber, payer: pair.payer, node: pair.node,
                                          firstIndex: first, leaves: current))
        }
        return responses
    }
}

extension DataResponse: CanonicalCodable {
    /// router (32) ‖ batch u64 ‖ payer (Account) ‖ node (32) ‖ first index u64 ‖ u32 n (1…4,096) ‖ n × (u32 length
    /// (1…65,536) ‖ receipt bytes ‖ amount u64).
    public func encode(to writer: inout ByteWriter) {
        router.encode(to: &writer)
        writer.write(batchNumber)
        payer.encode(to: &writer)
        node.encode(to: &writer)
        writer.write(firstIndex)
        writer.write(UInt32(truncatingIfNeeded: leaves.count))
        for leaf in leaves {
            writer.write(bytes: leaf.receiptBytes)
            writer.write(leaf.amount)
        }
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        router = try PublicKey(from: &reader)
        batchNumber = try reader.readUInt64()
        payer = try Account(from: &reader)
        node = try PublicKey(from: &reader)
        firstIndex = try reader.readUInt64()
        let count = Int(try reader.readUInt32())
        guard count >= 1, count <= Self.maxLeaves else { throw .invalidValue("a data response carries 1 to \(Self.maxLeaves) leaves, got \(count)") }
        // Each leaf takes at least 13 bytes: refuse a count the remaining bytes cannot hold before reserving room.
        guard count <= reader.remaining / 13 else { throw .truncated(needed: count * 13, available: reader.remaining) }
        var leaves = [DataLeaf]()
        leaves.reserveCapacity(count)
        for _ in 0..<count {
            let bytes = try reader.readBoundedBytes(max: SettlementBatch.maxReceiptBytes)
            guard !bytes.isEmpty else { throw .invalidValue("a leaf has no receipt bytes") }
            leaves.append(DataLeaf(receiptBytes: bytes, amount: try reader.readUInt64()))
        }
        self.leaves = leaves
    }
}

/// Names a data request: the settlement and the pair.
public struct DataRequestKey: Hashable, Comparable, Sendable {
    public let settlement: SettlementKey
    public let pair: SettlementPair

    public init(settlement: SettlementKey, pair: SettlementPair) {
        self.settlement = settlement
        self.pair = pair
    }

    /// settlement key (40) ‖ payer (Account) ‖ node (32).
    public var keyBytes: [UInt8] {
        var writer = ByteWriter(capacity: 140)
        writer.writeRaw(settlement.keyBytes)
        pair.payer.encode(to: &writer)
        pair.node.encode(to: &writer)
        return writer.bytes
    }

    public static func < (lhs: DataRequestKey, rhs: DataRequestKey) -> Bool { lhs.keyBytes.lexicographicallyPrecedes(rhs.keyBytes) }
}

public enum DataRequestStatus: String, Hashable, Sendable {
    /// Waiting for the router's leaves.
    case open
    /// The router posted every leaf of the pair, and they hash to the committed root: the bond went back.
    case answered
    /// The deadline passed first: the pair's charge was reverted and the router slashed.
    case withheld

    var tag: UInt8 {
        switch self {
        case .open: 0
        case .answered: 1
        case .withheld: 2
        }
    }
}

/// A data request as the ledger keeps it until its settlement is final.
public struct DataRequestRecord: Sendable {
    public let key: DataRequestKey
    /// Who posted the bond (the signer's default account), and gets it back.
    public let requester: Account
    public let bond: Amount
    public let requestedAtHeight: UInt64
    /// The end of this block is the router's deadline.
    public let dueAtHeight: UInt64
    public let tx: Hash32
    public internal(set) var status: DataRequestStatus
    /// The height whose block completed the answer, or resolved the request as withheld (0 while open).
    public internal(set) var resolvedAtHeight: UInt64 = 0
    /// The root over the leaves posted so far.
    var received = MerkleSumAccumulator()

    /// Leaves posted so far.
    public var receivedLeaves: UInt64 { received.leafCount }
    /// Σ amount of the leaves posted so far.
    public var receivedAmount: UInt64 { received.total }
}

// MARK: - Queries

extension LedgerState {
    public func dataRequest(_ key: DataRequestKey) -> DataRequestRecord? { dataRequests[key] }

    /// Every data request of one router's settlements (all, without a router), in key order.
    public func dataRequests(router: PublicKey?) -> [DataRequestRecord] {
        dataRequests.values.filter { router == nil || $0.key.settlement.router == router }.sorted { $0.key < $1.key }
    }

    /// Every data request (of one settlement, when given), in key order.
    public func dataRequests(settlement: SettlementKey? = nil) -> [DataRequestRecord] {
        dataRequests.values.filter { settlement == nil || $0.key.settlement == settlement }.sorted { $0.key < $1.key }
    }

    /// Blocks a router has to answer a data request on a settlement: half its challenge window (at least 1). A
    /// request must be filed early enough that this deadline ends before the window does.
    static func dataRequestDeadlineBlocks(_ record: SettlementRecord) -> UInt64 {
        max(1, (record.finalAtHeight - min(record.finalAtHeight, record.includedAtHeight)) / 2)
    }
}

// MARK: - Applying kinds 15 and 16

extension LedgerState {
    /// The index of `pair`'s entry in a stored settlement (entries are in strictly increasing pair order).
    private func entryIndex(_ record: SettlementRecord, _ pair: SettlementPair) -> Int? {
        var low = 0, high = record.entries.count
        while low < high {
            let mid = low + (high - low) / 2
            let candidate = record.entries[mid].pair
            if candidate == pair { return mid }
            if candidate < pair { low = mid + 1 } else { high = mid }
        }
        return nil
    }

    /// Kind 15. Signed by the pair's payer account owner, its compute node key or that node's owner; the signer's
    /// default account posts `challenge_bond` (returned when the request resolves, answered or not).
    mutating func applyDataRequest(_ r: DataRequest, signer: PublicKey, height: UInt64, tx: Hash32, commit: Bool) -> Applied {
        let key = r.key
        guard let record = settlements[key.settlement] else { return .failure(.unknownSettlement(router: r.router, batch: r.batchNumber)) }
        guard record.status == .pending || record.status == .challenged, !record.entries.isEmpty else {
            return .failure(.challengeWindowClosed(router: r.router, batch: r.batchNumber, finalAtHeight: record.finalAtHeight))
        }
        guard entryIndex(record, key.pair) != nil else { return .failure(.unknownPair(router: r.router, batch: r.batchNumber, pair: key.pair)) }
        guard signer == r.payer.owner || signer == r.node || signer == nodes[r.node]?.owner else {
            return .failure(.notPairParty(pair: key.pair))
        }
        if let existing = dataRequests[key] {
            return .failure(.dataAlreadyRequested(router: r.router, batch: r.batchNumber, pair: key.pair, status: existing.status.rawValue))
        }
        let blocks = Self.dataRequestDeadlineBlocks(record)
        let (due, overflow) = height.addingReportingOverflow(blocks)
        guard !overflow, due < record.finalAtHeight else {
            return .failure(.dataRequestTooLate(router: r.router, batch: r.batchNumber,
                                                lastHeight: record.finalAtHeight.subtractingSaturating(blocks).subtractingSaturating(1)))
        }
        let requester = Account(owner: signer)
        let bond = parameters.challengeBond, fee = parameters.transferFee
        if let error = checkAffordable(requester, bond.baseUnits, fee: fee.baseUnits) { return .failure(error) }
        let effect = TxEffect.dataRequested(router: r.router, batch: r.batchNumber, pair: key.pair, dueAtHeight: due, bond: bond)
        guard commit else { return .success((fee, effect)) }
        debit(requester, bond.baseUnits + fee.baseUnits)
        dataRequests[key] = DataRequestRecord(key: key, requester: requester, bond: bond, requestedAtHeight: height,
                                              dueAtHeight: due, tx: tx, status: .open)
        dataRequestsDue[due, default: []].append(key)
        return .success((fee, effect))
    }

    /// Kind 16. Signed by the router key or its owner; the fee is the owner's. The leaves must continue the answer
    /// where it stands (`firstIndex` = leaves received so far), stay within the entry's count and amount, and, with
    /// the last leaf, hash to the entry's pair root and amount. Anything else is refused and changes nothing.
    mutating func applyDataResponse(_ r: DataResponse, signer: PublicKey, height: UInt64, commit: Bool) -> Applied {
        let key = r.key
        guard let router = nodes[r.router] else { return .failure(.unknownNode(nodeKey: r.router)) }
        guard signer == r.router || signer == router.owner else { return .failure(.notNodeOwner(nodeKey: r.router)) }
        guard var request = dataRequests[key], request.status == .open, let record = settlements[key.settlement],
              let index = entryIndex(record, key.pair) else {
            return .failure(.noOpenDataRequest(router: r.router, batch: r.batchNumber, pair: key.pair))
        }
        let entry = record.entries[index]
        func refuse(_ code: String, _ message: String) -> Applied { .failure(.dataResponseRefused(code: code, message: message)) }
        guard r.firstIndex == request.received.leafCount else {
            return refuse("data_response_out_of_order", "the answer stands at leaf \(request.received.leafCount); this one starts at \(r.firstIndex)")
        }
        guard UInt64(r.leaves.count) <= entry.count - request.received.leafCount else {
            return refuse("data_response_too_many_leaves", "the pair has \(entry.count) leaves; \(request.received.leafCount) are posted and this adds \(r.leaves.count)")
        }
        var accumulator = request.received
        for leaf in r.leaves {
            do { try accumulator.append(leafBytes: leaf.receiptBytes, amount: leaf.amount) } catch {
                return refuse("data_response_amount_exceeded", "the leaves add up to more than u64")
            }
            guard accumulator.total <= entry.amount else {
                return refuse("data_response_amount_exceeded", "the leaves add up to more than the pair's \(entry.amount) base units")
            }
        }
        let complete = accumulator.leafCount == entry.count
        if complete {
            guard let root = try? accumulator.root, root.hash == entry.pairRoot, root.sum == entry.amount else {
                return refuse("data_response_root_mismatch", "the pair's leaves do not hash to its committed root and amount")
            }
        }
        let owner = Account(owner: router.owner)
        let fee = parameters.transferFee
        if let error = checkAffordable(owner, 0, fee: fee.baseUnits) { return .failure(error) }
        let effect = TxEffect.dataAnswered(router: r.router, batch: r.batchNumber, pair: key.pair, leaves: accumulator.leafCount, complete: complete)
        guard commit else { return .success((fee, effect)) }
        debit(owner, fee.baseUnits)
        request.received = accumulator
        if complete {
            request.status = .answered
            request.resolvedAtHeight = height
            credit(request.requester, request.bond.baseUnits)
        }
        dataRequests[key] = request
        return .success((fee, effect))
    }

    // MARK: End of block

    /// Requests whose deadline ends at `height` and are still open: the pair's charge (what challenges left of it)
    /// goes back to the payer's escrow, the router is slashed as for an upheld challenge of that amount, the node's
    /// share of it is made good from the slash, and the requester's bond comes back. In key order.
    mutating func resolveDueDataRequests(height: UInt64) -> [BlockEvent] {
        guard let due = dataRequestsDue.removeValue(forKey: height) else { return [] }
        var events = [BlockEvent]()
        for key in Set(due).sorted() {
            guard var request = dataRequests[key], request.status == .open else { continue }
            request.status = .withheld
            request.resolvedAtHeight = height
            credit(request.requester, request.bond.baseUnits)
            dataRequests[key] = request
            guard var record = settlements[key.settlement], record.status == .pending || record.status == .challenged,
                  let index = entryIndex(record, key.pair) else { continue }
            let entry = record.entries[index]
            let revert = entry.amount - (record.reverted.isEmpty ? 0 : record.reverted[index])
            let nodeShare = SettlementSplit(amount: revert, routerFeeBps: record.routerFeeBps, protocolFeeBps: record.protocolFeeBps).node
            let slash = slashRouter(key.settlement.router, bond: request.bond.baseUnits, claimed: revert, owed: nodeShare,
                                    owedNode: entry.node, claimant: request.requester.owner)
            if revert > 0 {
                if record.reverted.isEmpty { record.reverted = Array(repeating: 0, count: record.entries.count) }
                record.reverted[index] += revert
                _ = escrowUncharge(EscrowKey(payer: entry.payer, router: key.settlement.router), Amount(baseUnits: revert))
            }
            record.status = .challenged
            record.upheldChallenges += 1
            settlements[key.settlement] = record
            events.append(.dataWithheld(key, reverted: Amount(baseUnits: revert), slashed: Amount(baseUnits: slash.slashed),
                                        reward: Amount(baseUnits: slash.reward), compensation: Amount(baseUnits: slash.compensation)))
        }
        return events
    }

    /// A final settlement's data requests are dropped (all resolved: every deadline ends before the window does).
    mutating func dropDataRequests(of settlement: SettlementKey) {
        for key in dataRequests.keys.filter({ $0.settlement == settlement }) { dataRequests.removeValue(forKey: key) }
    }
}
