import EdgeMatrixCore
import EdgeMatrixLedger

/// The compute node's check of one settled batch (docs/SETTLEMENT.md § 13): pure and deterministic. Inputs are the
/// batch as the chain holds it (entries per (payer, node) pair), the leaves and proofs the router serves for this
/// node's pairs, and the node's own kept router-countersigned receipts. Each finding the ledger can judge carries the
/// kind-13 claim that proves it.
public enum WatchtowerAudit {
    public enum Finding: Sendable, Equatable, CustomStringConvertible {
        /// A kept receipt in the batch's range that the batch leaves out, with the non-inclusion evidence.
        case omitted(receipt: Receipt, evidence: OmissionEvidence)
        /// A kept receipt whose leaf is committed for less than the receipt is worth.
        case underCounted(receipt: Receipt, witness: SettlementLeafWitness)
        /// A served leaf of this node's pair, proven in entry `entry`, that is invalid (signature, payer, router or
        /// amount; `code` as `SettlementLeafCheck`).
        case invalidLeaf(entry: UInt32, witness: SettlementLeafWitness, code: String, sequence: UInt64?)
        /// The router does not serve (all of) a pair's leaves, or serves leaves that are not in the entry: nothing
        /// the ledger can judge from this node's data (the withheld-data claim is the remedy).
        case dataUnavailable(pair: SettlementPair, reason: String)
        /// A kept receipt that is missing from the leaves served, but whose omission cannot be proven: the router
        /// serves no adjacent leaves around it.
        case unprovableOmission(receipt: Receipt, reason: String)

        public var code: String {
            switch self {
            case .omitted: "omitted"
            case .underCounted: "under_counted"
            case .invalidLeaf(_, _, let code, _): "invalid_leaf_" + code
            case .dataUnavailable: "data_unavailable"
            case .unprovableOmission: "unprovable_omission"
            }
        }

        /// The kind-13 claim that proves this finding on chain, if the ledger can judge it.
        public var claim: SettlementClaim? {
            switch self {
            case .omitted(let receipt, let evidence): receipt.settlementBytes.map { .omission(receipt: $0, evidence) }
            case .underCounted(let receipt, let witness): receipt.settlementBytes.map { .omission(receipt: $0, .sameKey(witness)) }
            case .invalidLeaf(let entry, let witness, _, _): .leaf(entry: entry, witness)
            case .dataUnavailable, .unprovableOmission: nil
            }
        }

        public var description: String {
            switch self {
            case .omitted(let r, let e): "omitted: request \(r.body.sequence) attempt \(r.body.attempt) (\(e.name))"
            case .underCounted(let r, let w): "under-counted: request \(r.body.sequence) committed for \(w.amount), worth \(r.body.cost ?? 0)"
            case .invalidLeaf(let entry, _, let code, let sequence): "invalid leaf in entry \(entry): \(code) (request \(sequence.map(String.init) ?? "?"))"
            case .dataUnavailable(let pair, let reason): "data unavailable for \(pair): \(reason)"
            case .unprovableOmission(let r, let reason): "request \(r.body.sequence) missing, unprovable: \(reason)"
            }
        }
    }

    /// The receipts of `kept` that concern this batch: this node's, the batch's router's, countersigned, in the
    /// batch's sequence range and worth something.
    public static func concerned(_ kept: [Receipt], batch: SettlementBatch, node: PublicKey) -> [Receipt] {
        kept.filter { r in
            r.body.node == node && r.body.router == batch.router && r.settlementBytes != nil
                && batch.sequenceRange.contains(r.body.sequence) && (r.body.cost ?? 0) > 0
        }
    }

    /// Audits `batch` for `node`. `served[pair]` holds the leaves the router served for each of this node's pairs
    /// (absent: the router did not serve them). Findings come in a deterministic order: per pair of the batch's
    /// entries, then kept receipts in key order.
    public static func audit(batch: SettlementBatch, node: PublicKey, served: [SettlementPair: [SettlementLeafWitness]],
                             kept: [Receipt]) -> [Finding] {
        var findings = [Finding]()
        /// Per pair: the served leaves whose proofs verify, with their keys, by leaf index; nil if unusable.
        var proven = [SettlementPair: [(key: SettlementLeafKey, witness: SettlementLeafWitness)]]()
        /// Every proven leaf by its key (lookup only, never iterated), so a kept receipt is found in O(1).
        var byKey = [SettlementLeafKey: SettlementLeafWitness]()
        for (index, entry) in batch.entries.enumerated() where entry.node == node {
            guard let witnesses = served[entry.pair] else {
                findings.append(.dataUnavailable(pair: entry.pair, reason: "the router does not serve the pair's leaves"))
                continue
            }
            if UInt64(witnesses.count) != entry.count {
                findings.append(.dataUnavailable(pair: entry.pair, reason: "\(witnesses.count) leaves served, the entry counts \(entry.count)"))
            }
            var good = [(key: SettlementLeafKey, witness: SettlementLeafWitness)]()
            var unproven = 0
            for witness in witnesses {
                let (receipt, problems) = SettlementLeafCheck.check(witness, entry: entry, router: batch.router)
                if problems.contains(where: { $0.code == "bad_proof" }) { unproven += 1; continue }
                if let problem = problems.first {
                    findings.append(.invalidLeaf(entry: UInt32(index), witness: witness, code: problem.code, sequence: problem.sequence))
                }
                if let body = receipt?.body {
                    good.append((SettlementLeafKey(payer: body.payer, node: body.node, sequence: body.sequence, attempt: body.attempt), witness))
                }
            }
            if unproven > 0 { findings.append(.dataUnavailable(pair: entry.pair, reason: "\(unproven) served leaves are not in the entry")) }
            proven[entry.pair] = good.sorted { $0.witness.proof.index < $1.witness.proof.index }
            for leaf in good where byKey[leaf.key] == nil { byKey[leaf.key] = leaf.witness }
        }

        let mine = concerned(kept, batch: batch, node: node).sorted { key(of: $0) < key(of: $1) }
        for receipt in mine {
            let key = key(of: receipt)
            guard let entryIndex = batch.entryIndex(for: key.pair) else {
                findings.append(.omitted(receipt: receipt, evidence: .pairAbsent))
                continue
            }
            let entry = batch.entries[entryIndex]
            // Leaves not served: already reported once for the pair (data_unavailable).
            guard let leaves = proven[key.pair] else { continue }
            let worth = receipt.body.cost ?? 0
            if let same = byKey[key] {
                if same.amount < worth { findings.append(.underCounted(receipt: receipt, witness: same)) }
                continue
            }
            // Not in the pair (rare): bracket it with adjacent proven leaves.
            let above = leaves.firstIndex { key < $0.key }
            let evidence: OmissionEvidence?
            switch above {
            case .some(let i) where i == 0:
                evidence = leaves[0].witness.proof.index == 0 ? .beforeFirst(leaves[0].witness) : nil
            case .some(let i):
                let low = leaves[i - 1].witness, high = leaves[i].witness
                evidence = low.proof.index < .max && high.proof.index == low.proof.index + 1 ? .between(low, high) : nil
            case .none:
                let last = leaves.last?.witness
                evidence = last.flatMap { entry.count > 0 && $0.proof.index == entry.count - 1 ? .afterLast($0) : nil }
            }
            if let evidence {
                findings.append(.omitted(receipt: receipt, evidence: evidence))
            } else {
                findings.append(.unprovableOmission(receipt: receipt, reason: "the served leaves have no adjacent pair around it"))
            }
        }
        return findings
    }

    static func key(of receipt: Receipt) -> SettlementLeafKey {
        SettlementLeafKey(payer: receipt.body.payer, node: receipt.body.node, sequence: receipt.body.sequence, attempt: receipt.body.attempt)
    }
}

extension OmissionEvidence {
    /// The evidence's name in logs: pair_absent, between, before_first, after_last, same_key.
    public var name: String {
        switch self {
        case .pairAbsent: "pair_absent"
        case .between: "between"
        case .beforeFirst: "before_first"
        case .afterLast: "after_last"
        case .sameKey: "same_key"
        }
    }
}
