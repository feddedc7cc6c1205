import EdgeMatrixCore

// Interactive omission (docs/SETTLEMENT.md § 12, PROTOCOL.md § 6.18 and § 6.19): a compute node that holds a
// router-countersigned receipt in a pending batch's range, but cannot get the leaves to prove it left out, files
// the receipt (kind 17 `omission_query`, with a bond). The router must show the receipt's leaf in the pair's tree
// (kind 18 `omission_answer`: an inclusion proof of a leaf with the receipt's key, committed for at least its worth)
// by the deadline; if it does not, the claim is upheld at the end of the deadline block as an omission claim (§ 9):
// the node is made whole for the receipt's worth from the slash. An answered query burns the bond.

/// Kind 17: a compute node asks the router to prove that its receipt is in the batch.
public struct OmissionQuery: Hashable, Sendable {
    public var router: PublicKey
    public var batchNumber: UInt64
    /// The countersigned receipt as a settlement leaf carries it.
    public var receipt: [UInt8]

    public init(router: PublicKey, batchNumber: UInt64, receipt: [UInt8]) {
        self.router = router
        self.batchNumber = batchNumber
        self.receipt = receipt
    }
}

extension OmissionQuery: CanonicalCodable {
    /// router (32) ‖ batch u64 ‖ u32 length (1…65,536) ‖ receipt.
    public func encode(to writer: inout ByteWriter) {
        router.encode(to: &writer)
        writer.write(batchNumber)
        writer.write(bytes: receipt)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        router = try PublicKey(from: &reader)
        batchNumber = try reader.readUInt64()
        receipt = try reader.readBoundedBytes(max: SettlementBatch.maxReceiptBytes)
        guard !receipt.isEmpty else { throw .invalidValue("an omission query carries a receipt") }
    }
}

/// Kind 18: the router's answer: a leaf of the pair's tree with the queried key, and its proof.
public struct OmissionAnswer: Hashable, Sendable {
    public var router: PublicKey
    public var batchNumber: UInt64
    public var key: SettlementLeafKey
    public var witness: SettlementLeafWitness

    public init(router: PublicKey, batchNumber: UInt64, key: SettlementLeafKey, witness: SettlementLeafWitness) {
        self.router = router
        self.batchNumber = batchNumber
        self.key = key
        self.witness = witness
    }

    /// The router's answer from the pair's leaves (all of them, in tree order, as its batch committed them): the
    /// leaf with `key` and its proof; nil when no leaf has that key (the receipt was left out).
    public static func make(router: PublicKey, batchNumber: UInt64, key: SettlementLeafKey, pairLeaves: [SettlementLeaf]) -> OmissionAnswer? {
        guard let index = pairLeaves.firstIndex(where: { $0.key == key }),
              let tree = try? SettlementBatchBuilder.pairTree(leaves: pairLeaves),
              let witness = try? SettlementLeafWitness(tree: tree, leaves: pairLeaves, index: index) else { return nil }
        return OmissionAnswer(router: router, batchNumber: batchNumber, key: key, witness: witness)
    }

    public var queryKey: OmissionQueryKey { OmissionQueryKey(settlement: SettlementKey(router: router, batchNumber: batchNumber), leaf: key) }
}

extension OmissionAnswer: CanonicalCodable {
    /// router (32) ‖ batch u64 ‖ leaf key (payer ‖ node ‖ u64 sequence ‖ u32 attempt) ‖ witness (§ 12.4).
    public func encode(to writer: inout ByteWriter) {
        router.encode(to: &writer)
        writer.write(batchNumber)
        key.encode(to: &writer)
        witness.encode(to: &writer)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        router = try PublicKey(from: &reader)
        batchNumber = try reader.readUInt64()
        key = try SettlementLeafKey(from: &reader)
        witness = try SettlementLeafWitness(from: &reader)
    }
}

/// Names an omission query: the settlement and the receipt's leaf key.
public struct OmissionQueryKey: Hashable, Comparable, Sendable {
    public let settlement: SettlementKey
    public let leaf: SettlementLeafKey

    public init(settlement: SettlementKey, leaf: SettlementLeafKey) {
        self.settlement = settlement
        self.leaf = leaf
    }

    /// settlement key (40) ‖ leaf key.
    public var keyBytes: [UInt8] { settlement.keyBytes + leaf.canonicalBytes }

    public static func < (lhs: OmissionQueryKey, rhs: OmissionQueryKey) -> Bool { lhs.keyBytes.lexicographicallyPrecedes(rhs.keyBytes) }
}

public enum OmissionQueryStatus: String, Hashable, Sendable {
    case open
    /// The router proved the leaf: the bond was burned.
    case answered
    /// The deadline passed first: upheld as an omission; the node was paid from the slash.
    case upheld

    var tag: UInt8 {
        switch self {
        case .open: 0
        case .answered: 1
        case .upheld: 2
        }
    }
}

public struct OmissionQueryRecord: Hashable, Sendable {
    public let key: OmissionQueryKey
    public let requester: Account
    public let bond: Amount
    /// The receipt's worth (units × registered prices).
    public let worth: UInt64
    public let requestedAtHeight: UInt64
    public let dueAtHeight: UInt64
    public let tx: Hash32
    public internal(set) var status: OmissionQueryStatus
    public internal(set) var resolvedAtHeight: UInt64 = 0
}

extension LedgerState {
    public func omissionQuery(_ key: OmissionQueryKey) -> OmissionQueryRecord? { omissionQueries[key] }

    /// Every omission query of one router's settlements (all, without a router), in key order.
    public func omissionQueries(router: PublicKey?) -> [OmissionQueryRecord] {
        omissionQueries.values.filter { router == nil || $0.key.settlement.router == router }.sorted { $0.key < $1.key }
    }

    /// The evidence id an omission of `leaf` in `settlement` is paid under, by a kind-13 claim or a query alike.
    static func omissionEvidenceID(_ settlement: SettlementKey, _ leaf: SettlementLeafKey) -> Hash32 {
        Hash32.of([0x10] + settlement.keyBytes + [5] + leaf.canonicalBytes)
    }

    /// Kind 17. Signed by the receipt's compute node key or that node's owner, who posts `challenge_bond`.
    mutating func applyOmissionQuery(_ q: OmissionQuery, signer: PublicKey, height: UInt64, tx: Hash32, commit: Bool) -> Applied {
        let settlement = SettlementKey(router: q.router, batchNumber: q.batchNumber)
        guard let record = settlements[settlement] else { return .failure(.unknownSettlement(router: q.router, batch: q.batchNumber)) }
        guard record.status == .pending || record.status == .challenged, !record.entries.isEmpty else {
            return .failure(.challengeWindowClosed(router: q.router, batch: q.batchNumber, finalAtHeight: record.finalAtHeight))
        }
        func refuse(_ code: String, _ message: String) -> Applied { .failure(.omissionQueryRefused(code: code, message: message)) }
        let body: ReceiptBody, worth: UInt64
        do throws(SettlementLeafRejection) {
            (body, worth) = try RegistryLeafVerifier.verify(q.receipt, router: q.router, nodes: nodes)
        } catch { return refuse(error.code, error.message) }
        let leaf = SettlementLeafKey(payer: body.payer, node: body.node, sequence: body.sequence, attempt: body.attempt)
        guard signer == body.node || signer == nodes[body.node]?.owner else { return .failure(.notPairParty(pair: leaf.pair)) }
        guard (record.firstSequence...record.lastSequence).contains(leaf.sequence) else {
            return refuse("query_receipt_outside_batch", "sequence \(leaf.sequence) is outside the batch's range \(record.firstSequence)...\(record.lastSequence)")
        }
        guard record.entries.contains(where: { $0.pair == leaf.pair }) else {
            return refuse("query_pair_absent", "the batch has no entry for pair \(leaf.pair): file an omission claim (kind 13) instead")
        }
        guard worth > 0 else { return refuse("query_receipt_worth_nothing", "the receipt is worth 0") }
        let key = OmissionQueryKey(settlement: settlement, leaf: leaf)
        guard omissionQueries[key] == nil else { return refuse("query_already_filed", "receipt \(leaf) was already queried in this batch") }
        let evidenceID = Self.omissionEvidenceID(settlement, leaf)
        guard !usedEvidence.contains(evidenceID) else { return .failure(.evidenceAlreadyUsed(evidenceID)) }
        let blocks = Self.dataRequestDeadlineBlocks(record)
        let (due, overflow) = height.addingReportingOverflow(blocks)
        guard !overflow, due < record.finalAtHeight else {
            return .failure(.dataRequestTooLate(router: q.router, batch: q.batchNumber,
                                                lastHeight: record.finalAtHeight.subtractingSaturating(blocks).subtractingSaturating(1)))
        }
        let requester = Account(owner: signer)
        let bond = parameters.challengeBond, fee = parameters.transferFee
        if let error = checkAffordable(requester, bond.baseUnits, fee: fee.baseUnits) { return .failure(error) }
        let effect = TxEffect.omissionQueried(router: q.router, batch: q.batchNumber, leaf: leaf, worth: Amount(baseUnits: worth), dueAtHeight: due)
        guard commit else { return .success((fee, effect)) }
        debit(requester, bond.baseUnits + fee.baseUnits)
        omissionQueries[key] = OmissionQueryRecord(key: key, requester: requester, bond: bond, worth: worth, requestedAtHeight: height,
                                                   dueAtHeight: due, tx: tx, status: .open)
        omissionQueriesDue[due, default: []].append(key)
        return .success((fee, effect))
    }

    /// Kind 18. Signed by the router key or its owner (the owner pays the fee). The witness must verify in the pair's
    /// entry, its receipt pass the leaf check with the queried key, and its committed amount be at least the queried
    /// receipt's worth. The query closes and its bond is burned.
    mutating func applyOmissionAnswer(_ a: OmissionAnswer, signer: PublicKey, height: UInt64, commit: Bool) -> Applied {
        guard let router = nodes[a.router] else { return .failure(.unknownNode(nodeKey: a.router)) }
        guard signer == a.router || signer == router.owner else { return .failure(.notNodeOwner(nodeKey: a.router)) }
        let key = a.queryKey
        func refuse(_ code: String, _ message: String) -> Applied { .failure(.omissionAnswerRefused(code: code, message: message)) }
        guard var query = omissionQueries[key], query.status == .open, let record = settlements[key.settlement],
              let entry = record.entries.first(where: { $0.pair == key.leaf.pair }) else {
            return refuse("answer_no_open_query", "no open omission query for \(key.leaf) in router \(a.router.nodeID)'s batch \(a.batchNumber)")
        }
        do { try a.witness.verify(in: entry) } catch { return refuse("answer_bad_proof", error.description) }
        let decoded: SettlementLeafKey
        do throws(SettlementLeafRejection) {
            let (body, _) = try RegistryLeafVerifier.verify(a.witness.receiptBytes, router: a.router, nodes: nodes)
            decoded = SettlementLeafKey(payer: body.payer, node: body.node, sequence: body.sequence, attempt: body.attempt)
        } catch { return refuse(error.code, error.message) }
        guard decoded == key.leaf else { return refuse("answer_key_mismatch", "the proven leaf is \(decoded), not \(key.leaf)") }
        guard a.witness.amount >= query.worth else {
            return refuse("answer_under_counted", "the leaf is committed for \(a.witness.amount) base units; the receipt is worth \(query.worth)")
        }
        let owner = Account(owner: router.owner)
        let fee = parameters.transferFee
        if let error = checkAffordable(owner, 0, fee: fee.baseUnits) { return .failure(error) }
        let effect = TxEffect.omissionAnswered(router: a.router, batch: a.batchNumber, leaf: key.leaf, bondBurned: query.bond)
        guard commit else { return .success((fee, effect)) }
        debit(owner, fee.baseUnits)
        burn(query.bond.baseUnits)
        query.status = .answered
        query.resolvedAtHeight = height
        omissionQueries[key] = query
        return .success((fee, effect))
    }

    /// Queries whose deadline ends at `height`, still open: upheld as omissions (once per receipt, whichever way it
    /// is proven), the router slashed with the receipt's worth owed to the node, the bond returned. In key order.
    mutating func resolveDueOmissionQueries(height: UInt64) -> [BlockEvent] {
        guard let due = omissionQueriesDue.removeValue(forKey: height) else { return [] }
        var events = [BlockEvent]()
        for key in Set(due).sorted() {
            guard var query = omissionQueries[key], query.status == .open else { continue }
            query.status = .upheld
            query.resolvedAtHeight = height
            omissionQueries[key] = query
            credit(query.requester, query.bond.baseUnits)
            let evidenceID = Self.omissionEvidenceID(key.settlement, key.leaf)
            guard !usedEvidence.contains(evidenceID), var record = settlements[key.settlement],
                  record.status == .pending || record.status == .challenged else { continue }
            usedEvidence.insert(evidenceID)
            let slash = slashRouter(key.settlement.router, bond: query.bond.baseUnits, claimed: query.worth, owed: query.worth,
                                    owedNode: key.leaf.node, claimant: query.requester.owner)
            record.status = .challenged
            record.upheldChallenges += 1
            settlements[key.settlement] = record
            events.append(.omissionUpheld(key, slashed: Amount(baseUnits: slash.slashed), reward: Amount(baseUnits: slash.reward),
                                          compensation: Amount(baseUnits: slash.compensation)))
        }
        return events
    }

    mutating func dropOmissionQueries(of settlement: SettlementKey) {
        for key in omissionQueries.keys.filter({ $0.settlement == settlement }) { omissionQueries.removeValue(forKey: key) }
    }
}
