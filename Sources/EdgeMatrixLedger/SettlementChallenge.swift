import EdgeMatrixCore

/// What a challenger claims is wrong with a pending settlement, with the evidence the ledger checks
/// (docs/PROTOCOL.md § 12.4; the checks are `SettlementBatch.check*`).
public enum SettlementClaim: Hashable, Sendable {
    /// (a) One leaf of entry `entry` is invalid, misfiled, out of range or worth another amount.
    case leaf(entry: UInt32, SettlementLeafWitness)
    /// (a) Two leaves bill one request twice.
    case duplicate(entry: UInt32, SettlementLeafWitness, otherEntry: UInt32, SettlementLeafWitness)
    /// (b) A committed sum on the path from some inner node up to entry `entry`'s pair root does not add up.
    case sums(entry: UInt32, path: [MerkleSumPreimage])
    /// (e) Adjacent leaves of entry `entry` out of order.
    case order(entry: UInt32, SettlementLeafWitness, SettlementLeafWitness)
    /// (c) A router-countersigned receipt in the batch's range that the batch leaves out or under-counts.
    case omission(receipt: [UInt8], OmissionEvidence)

    /// At most this many preimages in a sums path (a pair tree holds at most 2^32 leaves).
    public static let maxPathLength = 40

    /// The claim's name in JSON: leaf, duplicate, sums, order, omission.
    public var name: String { ["leaf", "duplicate", "sums", "order", "omission"][Int(tag) - 1] }

    var tag: UInt8 {
        switch self {
        case .leaf: 1
        case .duplicate: 2
        case .sums: 3
        case .order: 4
        case .omission: 5
        }
    }
}

extension SettlementClaim: CanonicalCodable {
    /// u8 tag ‖ fields: 1 `u32 entry ‖ witness`; 2 `u32 entry ‖ witness ‖ u32 entry ‖ witness`; 3 `u32 entry ‖ u8 n ‖
    /// n × preimage`; 4 `u32 entry ‖ witness ‖ witness`; 5 `u32 length ‖ receipt ‖ omission evidence`.
    public func encode(to writer: inout ByteWriter) {
        writer.write(tag)
        switch self {
        case .leaf(let entry, let witness):
            writer.write(entry)
            witness.encode(to: &writer)
        case .duplicate(let entry, let first, let otherEntry, let second):
            writer.write(entry)
            first.encode(to: &writer)
            writer.write(otherEntry)
            second.encode(to: &writer)
        case .sums(let entry, let path):
            writer.write(entry)
            writer.write(UInt8(truncatingIfNeeded: path.count))
            for preimage in path { preimage.encode(to: &writer) }
        case .order(let entry, let left, let right):
            writer.write(entry)
            left.encode(to: &writer)
            right.encode(to: &writer)
        case .omission(let receipt, let evidence):
            writer.write(bytes: receipt)
            evidence.encode(to: &writer)
        }
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        switch try reader.readUInt8() {
        case 1: self = .leaf(entry: try reader.readUInt32(), try SettlementLeafWitness(from: &reader))
        case 2:
            let entry = try reader.readUInt32()
            let first = try SettlementLeafWitness(from: &reader)
            self = .duplicate(entry: entry, first, otherEntry: try reader.readUInt32(), try SettlementLeafWitness(from: &reader))
        case 3:
            let entry = try reader.readUInt32()
            let count = Int(try reader.readUInt8())
            guard count >= 1, count <= Self.maxPathLength else { throw .invalidValue("a sums path has 1 to \(Self.maxPathLength) preimages, got \(count)") }
            var path = [MerkleSumPreimage]()
            for _ in 0..<count { path.append(try MerkleSumPreimage(from: &reader)) }
            self = .sums(entry: entry, path: path)
        case 4:
            let entry = try reader.readUInt32()
            self = .order(entry: entry, try SettlementLeafWitness(from: &reader), try SettlementLeafWitness(from: &reader))
        case 5: self = .omission(receipt: try reader.readBoundedBytes(max: SettlementBatch.maxReceiptBytes), try OmissionEvidence(from: &reader))
        case let tag: throw .invalidValue("settlement claim tag \(tag) (expected 1 to 5)")
        }
    }
}

/// Challenges a pending settlement (kind 13). The signer posts `challenge_bond`: returned with a reward when the
/// claim is upheld, burned when it is dismissed.
public struct SettlementChallenge: Hashable, Sendable {
    public var router: PublicKey
    public var batchNumber: UInt64
    public var claim: SettlementClaim

    public init(router: PublicKey, batchNumber: UInt64, claim: SettlementClaim) {
        self.router = router
        self.batchNumber = batchNumber
        self.claim = claim
    }

    public var settlement: SettlementKey { SettlementKey(router: router, batchNumber: batchNumber) }
}

/// The ledger's receipt check for leaves (docs/SETTLEMENT.md § 9): the bytes decode as a countersigned receipt of
/// this batch's router; the node is a registered compute node whose signature verifies, as does the router's; the
/// receipt's unit prices are the node's registered ones (current, or the list it replaced last) for its model or
/// app; its worth is units × prices.
public struct RegistryLeafVerifier: SettlementLeafVerifier {
    let nodes: [PublicKey: NodeRecord]

    public init(ledger: LedgerState) { nodes = ledger.nodes }

    public func verifyLeaf(_ receiptBytes: [UInt8], batch: SettlementBatch) throws(SettlementLeafRejection) -> SettlementLeafValue {
        let (body, amount) = try Self.verify(receiptBytes, router: batch.router, nodes: nodes)
        return SettlementLeafValue(key: SettlementLeafKey(payer: body.payer, node: body.node, sequence: body.sequence, attempt: body.attempt),
                                   amount: amount)
    }
}

// MARK: - Applying a challenge

extension LedgerState {
    /// What an upheld claim undoes: `revert` base units of entry `entry` go back to its payer's escrow; `owed` base
    /// units are what the router kept from a compute node (paid to the node owner out of the slash).
    struct ChallengeRemedy {
        var entry: Int?
        var revert: UInt64
        var owed: UInt64
        var owedNode: PublicKey?
        /// Names the fault so the same one is never paid twice.
        var evidence: [UInt8]
    }

    mutating func applyChallenge(_ c: SettlementChallenge, signer: PublicKey, commit: Bool) -> Applied {
        guard let record = settlements[c.settlement] else { return .failure(.unknownSettlement(router: c.router, batch: c.batchNumber)) }
        guard record.status == .pending || record.status == .challenged else {
            return .failure(.challengeWindowClosed(router: c.router, batch: c.batchNumber, finalAtHeight: record.finalAtHeight))
        }
        let challenger = Account(owner: signer)
        let bond = parameters.challengeBond.baseUnits, fee = parameters.transferFee
        if let error = checkAffordable(challenger, bond, fee: fee.baseUnits) { return .failure(error) }
        let batch: SettlementBatch
        do {
            batch = try SettlementBatch(router: c.router, batchNumber: c.batchNumber, firstSequence: record.firstSequence,
                                        lastSequence: record.lastSequence, entries: record.entries)
        } catch { return .failure(.malformed("stored settlement no longer forms a batch: \(error)")) }
        let verifier = RegistryLeafVerifier(ledger: self)
        let (verdict, remedy) = judge(c.claim, batch: batch, record: record, verifier: verifier)
        guard case .upheld = verdict, let remedy else {
            let effect = TxEffect.challengeDismissed(router: c.router, batch: c.batchNumber, code: verdict.code, bondBurned: parameters.challengeBond)
            guard commit else { return .success((fee, effect)) }
            debit(challenger, bond + fee.baseUnits)
            burn(bond)
            return .success((fee, effect))
        }
        let evidenceID = Hash32.of([0x10] + c.settlement.keyBytes + remedy.evidence)
        guard !usedEvidence.contains(evidenceID) else { return .failure(.evidenceAlreadyUsed(evidenceID)) }
        let slash = planSlash(c.router, bond: bond, claimed: remedy.revert.addingSaturating(remedy.owed), owed: remedy.owed,
                              owedNode: remedy.owedNode, claimant: signer)
        let effect = TxEffect.challengeUpheld(router: c.router, batch: c.batchNumber, code: verdict.code,
                                              reverted: Amount(baseUnits: remedy.revert), slashed: Amount(baseUnits: slash.slashed),
                                              reward: Amount(baseUnits: slash.reward), compensation: Amount(baseUnits: slash.compensation))
        guard commit else { return .success((fee, effect)) }
        debit(challenger, fee.baseUnits)  // the bond stays with the challenger
        usedEvidence.insert(evidenceID)
        commitSlash(slash)
        var updated = record
        if let index = remedy.entry, remedy.revert > 0 {
            if updated.reverted.isEmpty { updated.reverted = Array(repeating: 0, count: updated.entries.count) }
            let entry = updated.entries[index]
            updated.reverted[index] += remedy.revert  // judge() caps revert at what is left of the entry
            _ = escrowUncharge(EscrowKey(payer: entry.payer, router: c.router), Amount(baseUnits: remedy.revert))
        }
        updated.status = .challenged
        updated.upheldChallenges += 1
        settlements[c.settlement] = updated
        return .success((fee, effect))
    }

    /// A slash of a router: the plan (pure) and where the money goes.
    struct RouterSlash {
        var router: PublicKey
        var slashed: UInt64
        var reward: UInt64
        var compensation: UInt64
        var claimant: Account
        var nodeOwner: Account?
    }

    /// The slash for a proven fault: the bond plus twice what the router took or kept (`claimed`), capped by its
    /// stake (also while unbonding). At least half of it is burned; the other half first makes the node whole for
    /// `owed` (paid to `owedNode`'s owner), then rewards the claimant. Accounts linked to the router (its owner or
    /// the router key itself) get nothing: their share is burned.
    func planSlash(_ router: PublicKey, bond: UInt64, claimed: UInt64, owed: UInt64, owedNode: PublicKey?, claimant: PublicKey) -> RouterSlash {
        let routerNode = nodes[router]
        let stake = routerNode.flatMap { stakes[$0.stakeID] }
        let wanted = bond.addingSaturating(claimed.multipliedReportingOverflow(by: 2).overflow ? .max : claimed * 2)
        let slashed = min(wanted, stake?.amount.baseUnits ?? 0)
        let half = slashed / 2
        let routerOwner = routerNode.map { $0.owner }
        let linked = { (key: PublicKey?) in key == nil || key == routerOwner || key == router }
        let nodeOwner = owedNode.flatMap { nodes[$0]?.owner }
        let compensation = linked(nodeOwner) ? 0 : min(owed, half)
        let reward = linked(claimant) ? 0 : half - compensation
        return RouterSlash(router: router, slashed: slashed, reward: reward, compensation: compensation,
                           claimant: Account(owner: claimant), nodeOwner: nodeOwner.map { Account(owner: $0) })
    }

    /// Takes a planned slash from the router's stake, pays the node owner and the claimant, burns the rest.
    mutating func commitSlash(_ slash: RouterSlash) {
        if let stakeID = nodes[slash.router]?.stakeID, var s = stakes[stakeID], slash.slashed > 0 {
            s.amount = Amount(baseUnits: s.amount.baseUnits - slash.slashed)
            stakes[s.id] = s
        }
        credit(slash.claimant, slash.reward)
        if let owner = slash.nodeOwner, slash.compensation > 0 { credit(owner, slash.compensation) }
        burn(slash.slashed - slash.reward - slash.compensation)
    }

    /// Plans and commits a slash.
    mutating func slashRouter(_ router: PublicKey, bond: UInt64, claimed: UInt64, owed: UInt64, owedNode: PublicKey?,
                              claimant: PublicKey) -> RouterSlash {
        let slash = planSlash(router, bond: bond, claimed: claimed, owed: owed, owedNode: owedNode, claimant: claimant)
        commitSlash(slash)
        return slash
    }

    /// Runs the claim's check and, when upheld, says what to undo.
    private func judge(_ claim: SettlementClaim, batch: SettlementBatch, record: SettlementRecord,
                       verifier: RegistryLeafVerifier) -> (ChallengeVerdict, ChallengeRemedy?) {
        func left(_ entry: Int) -> UInt64 {
            record.entries[entry].amount - (record.reverted.isEmpty ? 0 : record.reverted[entry])
        }
        func index(_ entry: UInt32) -> Int? { batch.entries.indices.contains(Int(entry)) ? Int(entry) : nil }
        func leafID(_ entry: UInt32, _ witness: SettlementLeafWitness) -> [UInt8] {
            var w = ByteWriter(); w.write(entry); w.write(witness.proof.index); return w.bytes
        }
        switch claim {
        case .leaf(let entry, let witness):
            let verdict = batch.checkLeaf(entryIndex: Int(entry), witness: witness, verifier: verifier)
            guard case .upheld(let fault) = verdict, let i = index(entry) else { return (verdict, nil) }
            var remedy = ChallengeRemedy(entry: i, revert: min(witness.amount, left(i)), owed: 0, evidence: [1] + leafID(entry, witness))
            if case .amountMismatch(let committed, let computed) = fault {
                remedy.revert = committed > computed ? min(committed - computed, left(i)) : 0
                remedy.owed = computed > committed ? computed - committed : 0
                remedy.owedNode = batch.entries[i].node
            }
            return (verdict, remedy)
        case .duplicate(let entry, let first, let otherEntry, let second):
            let verdict = batch.checkDuplicateSequence(first: (Int(entry), first), second: (Int(otherEntry), second), verifier: verifier)
            guard verdict.isUpheld, let i = index(otherEntry) else { return (verdict, nil) }
            // The evidence names the request, so the same double billing is paid once whichever leaves are shown.
            return (verdict, ChallengeRemedy(entry: i, revert: min(second.amount, left(i)), owed: 0,
                                             evidence: [2] + leafID(min(entry, otherEntry), entry <= otherEntry ? first : second)
                                                 + leafID(max(entry, otherEntry), entry <= otherEntry ? second : first)))
        case .sums(let entry, let path):
            let verdict = batch.checkSums(entryIndex: Int(entry), path: path)
            guard verdict.isUpheld, let i = index(entry) else { return (verdict, nil) }
            var w = ByteWriter(); w.write(UInt8(3)); w.write(entry)
            return (verdict, ChallengeRemedy(entry: i, revert: left(i), owed: 0, evidence: w.bytes))
        case .order(let entry, let l, let r):
            let verdict = batch.checkOrder(entryIndex: Int(entry), left: l, right: r, verifier: verifier)
            guard verdict.isUpheld, let i = index(entry) else { return (verdict, nil) }
            var w = ByteWriter(); w.write(UInt8(4)); w.write(entry)
            return (verdict, ChallengeRemedy(entry: i, revert: left(i), owed: 0, evidence: w.bytes))
        case .omission(let receipt, let evidence):
            let verdict = batch.checkOmission(receiptBytes: receipt, evidence: evidence, verifier: verifier)
            guard case .upheld(let fault) = verdict, let value = try? verifier.verifyLeaf(receipt, batch: batch) else { return (verdict, nil) }
            var owed = value.amount
            if case .receiptUnderCounted(let committed, let worth) = fault { owed = worth - min(worth, committed) }
            return (verdict, ChallengeRemedy(entry: nil, revert: 0, owed: owed, owedNode: value.key.node,
                                             evidence: [5] + value.key.canonicalBytes))
        }
    }
}
