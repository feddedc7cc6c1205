import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixStore
import Logging

/// Why the router could not close a batch.
public enum SettlementBatcherError: Error, CustomStringConvertible, Sendable {
    case build(SettlementError)
    /// The store holds batches that do not end where this one starts (another writer, or a wrong cursor).
    case outOfOrder(expectedBatch: UInt64, expectedFirstSequence: UInt64)
    /// Receipts kept arriving in the range while it was read.
    case keptChanging(attempts: Int)
    /// The receipts of one sequence number alone name more pairs than a batch may hold.
    case sequenceTooWide(sequence: UInt64, pairs: Int, limit: Int)

    public var description: String {
        switch self {
        case .build(let error): "cannot build the settlement batch: \(error.description) (\(error.code))"
        case .outOfOrder(let batch, let first): "not the next batch: the store expects batch \(batch) from sequence \(first)"
        case .keptChanging(let attempts): "receipts in the batch's range kept being stored while it was read (\(attempts) attempts)"
        case .sequenceTooWide(let sequence, let pairs, let limit): "sequence \(sequence) alone names \(pairs) pairs, more than \(limit)"
        }
    }
}

/// A batch the router closed and stored.
public struct ClosedSettlementBatch: Sendable {
    public let batch: SettlementBatch
    public let stored: StoredSettlementBatch
    /// What the batch takes from each payer's escrow.
    public let payerTotals: [Account: UInt64]
}

/// Builds the router's settlement batches from its stored receipts (docs/PROTOCOL.md § 12): one leaf per
/// countersigned receipt, in leaf-key order, its amount the receipt's cost. Receipts the router's own account pays
/// (operator keys) are not settled: that use has no escrow.
public enum SettlementBatcher {
    /// Whether `payer` is the router's own account (its key, default subaccount), whose use is never settled.
    public static func isOperatorAccount(_ payer: Account, router: PublicKey) -> Bool {
        payer.owner == router && payer.subaccount == nil
    }

    /// The leaf a stored receipt makes in a batch of `router`'s, or nil when it is not settled: paid by the router's
    /// own account, for another router, not countersigned, or with a cost above 64 bits (logged; a receipt store
    /// never admits one in practice).
    public static func leaf(for receipt: Receipt, router: PublicKey, logger: Logger? = nil) -> SettlementLeaf? {
        let body = receipt.body
        guard body.router == router, !isOperatorAccount(body.payer, router: router), let bytes = receipt.settlementBytes else { return nil }
        guard let amount = body.cost else {
            logger?.error("receipt left out of settlement: its cost does not fit in 64 bits",
                          metadata: ["sequence": "\(body.sequence)", "attempt": "\(body.attempt)", "node": "\(body.nodeID.short)"])
            return nil
        }
        return SettlementLeaf(key: SettlementLeafKey(payer: body.payer, node: body.node, sequence: body.sequence, attempt: body.attempt),
                              receiptBytes: bytes, amount: amount)
    }

    /// The last sequence number of `range` a batch can cover with at most `maxEntries` (payer, node) pairs: the
    /// batch ends early, at a sequence boundary, where the next sequence's receipts would add one pair too many.
    public static func lastSequence(fitting leaves: [SettlementLeaf], in range: ClosedRange<UInt64>,
                                    maxEntries: Int = SettlementBatch.maxEntries) throws(SettlementBatcherError) -> UInt64 {
        var bySequence: [UInt64: Set<SettlementPair>] = [:]
        for leaf in leaves where range.contains(leaf.key.sequence) { bySequence[leaf.key.sequence, default: []].insert(leaf.key.pair) }
        var pairs = Set<SettlementPair>()
        for sequence in bySequence.keys.sorted() {
            let added = bySequence[sequence]!.subtracting(pairs)
            if pairs.count + added.count > maxEntries {
                guard sequence > range.lowerBound else {
                    throw .sequenceTooWide(sequence: sequence, pairs: added.count, limit: maxEntries)
                }
                return sequence - 1
            }
            pairs.formUnion(added)
        }
        return range.upperBound
    }

    /// Builds batch `batchNumber` over `range` (or a prefix of it, so that it holds at most `maxEntries` pairs) from
    /// receipts in any order; returns the batch and what it takes from each payer.
    public static func build(router: PublicKey, batchNumber: UInt64, range: ClosedRange<UInt64>, receipts: [Receipt],
                             maxEntries: Int = SettlementBatch.maxEntries,
                             logger: Logger? = nil) throws(SettlementBatcherError) -> (batch: SettlementBatch, payerTotals: [Account: UInt64]) {
        let all = receipts.compactMap { leaf(for: $0, router: router, logger: logger) }.filter { range.contains($0.key.sequence) }
        let last = try lastSequence(fitting: all, in: range, maxEntries: maxEntries)
        let leaves = all.filter { $0.key.sequence <= last }.sorted { $0.key < $1.key }
        var builder = SettlementBatchBuilder(router: router, batchNumber: batchNumber, sequenceRange: range.lowerBound...last)
        var totals: [Account: UInt64] = [:]
        do {
            for leaf in leaves {
                try builder.append(leaf)
                // The builder checked that the batch total fits, so no payer's share of it can overflow.
                totals[leaf.key.payer, default: 0] += leaf.amount
            }
            return (try builder.build(), totals)
        } catch { throw .build(error) }
    }

    /// Reads the countersigned receipts of `firstSequence...upperBound`, builds batch `batchNumber` over them and
    /// stores it (status built), unless a receipt came into the range meanwhile (then it reads again). Returns nil
    /// when there is nothing to close (`upperBound < firstSequence`).
    public static func close(store: SettlementStore, router: PublicKey, batchNumber: UInt64, firstSequence: UInt64,
                             upperBound: UInt64, epoch: UInt64, maxEntries: Int = SettlementBatch.maxEntries,
                             logger: Logger? = nil) async throws -> ClosedSettlementBatch? {
        guard firstSequence >= 1, upperBound >= firstSequence else { return nil }
        let attempts = 8
        for _ in 0..<attempts {
            let read = try await store.receipts(sequences: firstSequence...upperBound)
            let (batch, totals) = try build(router: router, batchNumber: batchNumber, range: firstSequence...upperBound,
                                            receipts: read.receipts, maxEntries: maxEntries, logger: logger)
            let stored = StoredSettlementBatch(batch: batchNumber, firstSequence: batch.firstSequence, lastSequence: batch.lastSequence,
                                               closedEpoch: epoch, encoded: batch.canonicalBytes)
            switch try await store.record(stored, payerTotals: totals, receiptWatermark: read.watermark) {
            case .recorded: return ClosedSettlementBatch(batch: batch, stored: stored, payerTotals: totals)
            case .stale: continue
            case .outOfOrder(let expected, let first): throw SettlementBatcherError.outOfOrder(expectedBatch: expected, expectedFirstSequence: first)
            }
        }
        throw SettlementBatcherError.keptChanging(attempts: attempts)
    }

    /// The `data_response` transactions (kind 16) that answer a data request for one pair of a stored batch, in
    /// order: every leaf of the pair, chunked to fit.
    public static func dataResponses(store: SettlementStore, batch: StoredSettlementBatch, router: PublicKey, payer: Account,
                                     node: PublicKey) async throws -> [DataResponse] {
        let leaves = try await pairLeaves(store: store, batch: batch, router: router, payer: payer, node: node)
        return DataResponse.chunks(router: router, batchNumber: batch.batch, pair: SettlementPair(payer: payer, node: node),
                                   leaves: leaves.map(DataLeaf.init))
    }

    /// The `omission_answer` (kind 18) for a queried receipt key of a stored batch: its leaf and proof, or nil when
    /// the batch does not hold it.
    public static func omissionAnswer(store: SettlementStore, batch: StoredSettlementBatch, router: PublicKey,
                                      key: SettlementLeafKey) async throws -> OmissionAnswer? {
        let leaves = try await pairLeaves(store: store, batch: batch, router: router, payer: key.payer, node: key.node)
        return OmissionAnswer.make(router: router, batchNumber: batch.batch, key: key, pairLeaves: leaves)
    }

    /// The leaves of one pair in a stored batch, in leaf order: exactly those its entry commits to.
    public static func pairLeaves(store: SettlementStore, batch: StoredSettlementBatch, router: PublicKey, payer: Account,
                                  node: PublicKey) async throws -> [SettlementLeaf] {
        try await store.receipts(sequences: batch.firstSequence...batch.lastSequence, payer: payer, node: node)
            .compactMap { leaf(for: $0, router: router) }
    }
}
