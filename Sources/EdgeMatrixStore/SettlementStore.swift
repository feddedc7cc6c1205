import EdgeMatrixCore
import Foundation
import GRDB
import Synchronization

/// Told of each sequence number the receipt store gives out, before the number is durable, so that whoever
/// closes settlement batches can see every request that has a number and may still get a receipt. `release` is
/// called by the store only when the number was not given out after all (its transaction failed).
public protocol AcceptedSequenceHolds: Sendable {
    func hold(_ sequence: UInt64)
    func release(_ sequence: UInt64)
    /// A receipt of `sequence` is now durable (a hold kept across a restart for it may end).
    func receiptStored(_ sequence: UInt64)
}

extension AcceptedSequenceHolds {
    public func receiptStored(_ sequence: UInt64) {}
}

/// The numbers one group commit held, to release them if the commit fails.
final class HeldSequences: Sendable {
    private let value = Mutex<[UInt64]>([])
    func append(_ sequence: UInt64) { value.withLock { $0.append(sequence) } }
    var all: [UInt64] { value.withLock { $0 } }
}

/// How far a closed settlement batch got.
public enum SettlementBatchStatus: String, Sendable, Equatable {
    /// Closed and stored; not yet sent to the chain (or the send was not acknowledged).
    case built
    /// Sent in transaction `txID`, not yet seen included.
    case submitted
    /// Included on chain: its amounts have left `payer_unsettled`.
    case included
}

/// A settlement batch as the router stores it: the encoded `settle` payload (docs/PROTOCOL.md § 12.3) and plain
/// integers, so the store needs no ledger types.
public struct StoredSettlementBatch: Sendable, Equatable {
    public var batch: UInt64
    public var firstSequence: UInt64
    public var lastSequence: UInt64
    /// The chain epoch (height / epoch_length_blocks) in which the router closed it.
    public var closedEpoch: UInt64
    public var encoded: [UInt8]
    public var txID: String?
    public var status: SettlementBatchStatus
    public var createdAtMillis: UInt64

    public init(batch: UInt64, firstSequence: UInt64, lastSequence: UInt64, closedEpoch: UInt64, encoded: [UInt8],
                txID: String? = nil, status: SettlementBatchStatus = .built, createdAtMillis: UInt64 = wallClockMillis()) {
        self.batch = batch
        self.firstSequence = firstSequence
        self.lastSequence = lastSequence
        self.closedEpoch = closedEpoch
        self.encoded = encoded
        self.txID = txID
        self.status = status
        self.createdAtMillis = createdAtMillis
    }
}

/// Countersigned receipts of a sequence range, in leaf-key order (payer, node key bytes, sequence, attempt), and the
/// highest receipt position stored when they were read (see `SettlementStore.record`).
public struct SettlementReceipts: Sendable {
    public var receipts: [Receipt]
    public var watermark: Int64
}

/// How the store answered a batch to record.
public enum SettlementRecordOutcome: Sendable, Equatable {
    case recorded
    /// A receipt in the batch's range was stored after the receipts were read: the batch would leave it out.
    /// Read and build again.
    case stale
    /// Not the next batch: the number or first sequence does not follow the last stored batch (or it exists).
    case outOfOrder(expectedBatch: UInt64, expectedFirstSequence: UInt64)
}

/// The router's settlement batches, in the router's SQLite file beside its receipts.
public struct SettlementStore: Sendable {
    let database: RouterDatabase

    public init(database: RouterDatabase) { self.database = database }

    // MARK: Receipts for batches

    /// The countersigned receipts whose sequence number is in `sequences`, in leaf-key order.
    public func receipts(sequences: ClosedRange<UInt64>) async throws -> SettlementReceipts {
        let (low, high) = Self.bounds(sequences)
        return try await database.pool.read { db in
            let watermark = try Int64.fetchOne(db, sql: "SELECT MAX(position) FROM receipt") ?? 0
            let rows = try Row.fetchAll(db, sql: """
                SELECT position, body, node_signature, router_signature FROM receipt
                WHERE sequence BETWEEN ? AND ? AND length(router_signature) > 0
                """, arguments: [low, high])
            return SettlementReceipts(receipts: Self.inLeafOrder(try rows.map(Self.decode)), watermark: watermark)
        }
    }

    /// The countersigned receipts of one (payer, node) pair whose sequence number is in `sequences`, in leaf-key order.
    public func receipts(sequences: ClosedRange<UInt64>, payer: Account, node: PublicKey) async throws -> [Receipt] {
        let (low, high) = Self.bounds(sequences)
        let receipts = try await database.pool.read { db in
            try Row.fetchAll(db, sql: """
                SELECT position, body, node_signature, router_signature FROM receipt
                WHERE sequence BETWEEN ? AND ? AND payer = ? AND node_id = ? AND length(router_signature) > 0
                """, arguments: [low, high, Data(payer.canonicalBytes), node.nodeID.description]).map(Self.decode)
        }
        // node_id is a hash prefix of the key: keep only receipts of exactly this key.
        return Self.inLeafOrder(receipts.filter { $0.body.node == node })
    }

    /// Leaf-key order: payer (account order), node key bytes, sequence, attempt.
    static func inLeafOrder(_ receipts: [Receipt]) -> [Receipt] {
        receipts.sorted { a, b in
            let x = a.body, y = b.body
            if x.payer != y.payer { return x.payer < y.payer }
            if x.node != y.node { return x.node.rawRepresentation.lexicographicallyPrecedes(y.node.rawRepresentation) }
            return (x.sequence, x.attempt) < (y.sequence, y.attempt)
        }
    }

    static func bounds(_ range: ClosedRange<UInt64>) -> (Int64, Int64) {
        (Int64(clamping: range.lowerBound), Int64(clamping: range.upperBound))
    }

    static func decode(_ row: Row) throws -> Receipt {
        let body: Data = row["body"], nodeSig: Data = row["node_signature"], routerSig: Data = row["router_signature"]
        do {
            return try Receipt(bodyBytes: Array(body), nodeSignature: Array(nodeSig), routerSignature: Array(routerSig))
        } catch {
            throw StoreError.corruptRow("receipt \(row["position"] as Int64? ?? -1): \(error)")
        }
    }

    /// The last sequence number given out (0 before the first request).
    public func lastAcceptedSequence() async throws -> UInt64 {
        let last = try await database.pool.read { db in try Int64.fetchOne(db, sql: "SELECT MAX(sequence) FROM accepted_request") ?? 0 }
        return UInt64(clamping: last)
    }

    // MARK: Batches

    /// Stores a closed batch (status `built`) with what it takes from each payer, if it is the next one: its number
    /// one more than the last stored batch's and its range starting right after it (any number and start when none
    /// is stored). `receiptWatermark` is `SettlementReceipts.watermark` of the read the batch was built from: if a
    /// receipt in its range was stored since, nothing is recorded (`stale`). Once recorded, the store refuses
    /// receipts in the range (`ReceiptAppendOutcome.alreadyBatched`), in the same serial order, so no stored receipt
    /// is ever missing from its batch.
    public func record(_ batch: StoredSettlementBatch, payerTotals: [Account: UInt64], receiptWatermark: Int64?) async throws -> SettlementRecordOutcome {
        guard let number = Int64(exactly: batch.batch), let first = Int64(exactly: batch.firstSequence),
              let last = Int64(exactly: batch.lastSequence), first <= last, let epoch = Int64(exactly: batch.closedEpoch) else {
            throw StoreError.outOfRange("settlement batch \(batch.batch) \(batch.firstSequence)...\(batch.lastSequence) epoch \(batch.closedEpoch)")
        }
        let created = Int64(clamping: batch.createdAtMillis)
        let totals = payerTotals.sorted { $0.key < $1.key }
        return try await database.pool.write { db in
            if let previous = try Row.fetchOne(db, sql: "SELECT batch, last_sequence FROM settlement_batch ORDER BY batch DESC LIMIT 1") {
                let previousBatch: Int64 = previous["batch"], previousLast: Int64 = previous["last_sequence"]
                guard number == previousBatch + 1, first == previousLast + 1 else {
                    return .outOfOrder(expectedBatch: UInt64(clamping: previousBatch + 1), expectedFirstSequence: UInt64(clamping: previousLast + 1))
                }
            }
            if let receiptWatermark {
                let newer = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM receipt WHERE sequence BETWEEN ? AND ? AND position > ?",
                                             arguments: [first, last, receiptWatermark]) ?? 0
                if newer > 0 { return .stale }
            }
            try db.execute(sql: """
                INSERT INTO settlement_batch (batch, first_sequence, last_sequence, closed_epoch, encoded, tx_id, status, created_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                """, arguments: [number, first, last, epoch, Data(batch.encoded), batch.txID, SettlementBatchStatus.built.rawValue, created])
            // The range is closed: its receipts are refused from now on, so its assignments (kept only to check
            // receipts) are dropped, and the table holds only the requests of the open batch.
            try db.execute(sql: "DELETE FROM assignment WHERE sequence <= ?", arguments: [last])
            for (payer, amount) in totals where amount > 0 {
                try db.execute(sql: "INSERT INTO settlement_batch_payer (batch, payer, amount) VALUES (?, ?, ?)",
                               arguments: [number, Data(payer.canonicalBytes), String(amount)])
            }
            return .recorded
        }
    }

    /// Records that the batch was sent in transaction `txID` (a resubmission replaces the id). No effect once included.
    public func markSubmitted(batch: UInt64, txID: String) async throws {
        guard let number = Int64(exactly: batch) else { throw StoreError.outOfRange("settlement batch \(batch)") }
        try await database.pool.write { db in
            try db.execute(sql: "UPDATE settlement_batch SET status = ?, tx_id = ? WHERE batch = ? AND status != ?",
                           arguments: [SettlementBatchStatus.submitted.rawValue, txID, number, SettlementBatchStatus.included.rawValue])
        }
    }

    /// Records that the batch is included on chain and, in the same transaction, takes each payer's total in it
    /// from `payer_unsettled` (saturating at 0). Returns false, changing nothing, when it was already included.
    @discardableResult
    public func markIncluded(batch: UInt64) async throws -> Bool {
        guard let number = Int64(exactly: batch) else { throw StoreError.outOfRange("settlement batch \(batch)") }
        return try await database.pool.write { db in
            guard let status = try String.fetchOne(db, sql: "SELECT status FROM settlement_batch WHERE batch = ?", arguments: [number]) else {
                throw StoreError.corruptRow("settlement batch \(batch) is not stored")
            }
            if status == SettlementBatchStatus.included.rawValue { return false }
            for row in try Row.fetchAll(db, sql: "SELECT payer, amount FROM settlement_batch_payer WHERE batch = ?", arguments: [number]) {
                let payer: Data = row["payer"], text: String = row["amount"]
                guard let amount = UInt64(text) else { throw StoreError.corruptRow("settlement batch \(batch) payer amount '\(text.prefix(40))'") }
                let owed = try String.fetchOne(db, sql: "SELECT amount FROM payer_unsettled WHERE payer = ?", arguments: [payer])
                guard let owed else { continue }
                guard let before = UInt64(owed) else { throw StoreError.corruptRow("payer_unsettled '\(owed.prefix(40))'") }
                let after = before >= amount ? before - amount : 0
                try db.execute(sql: "UPDATE payer_unsettled SET amount = ? WHERE payer = ?", arguments: [String(after), payer])
            }
            try db.execute(sql: "UPDATE settlement_batch SET status = ? WHERE batch = ?",
                           arguments: [SettlementBatchStatus.included.rawValue, number])
            return true
        }
    }

    /// Every stored batch, by number.
    public func batches() async throws -> [StoredSettlementBatch] {
        try await database.pool.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM settlement_batch ORDER BY batch").map(Self.batch)
        }
    }

    /// The batch with this number, if stored.
    public func batch(_ number: UInt64) async throws -> StoredSettlementBatch? {
        guard let number = Int64(exactly: number) else { return nil }
        return try await database.pool.read { db in
            try Row.fetchOne(db, sql: "SELECT * FROM settlement_batch WHERE batch = ?", arguments: [number]).map(Self.batch)
        }
    }

    /// The highest-numbered stored batch.
    public func lastBatch() async throws -> StoredSettlementBatch? {
        try await database.pool.read { db in
            try Row.fetchOne(db, sql: "SELECT * FROM settlement_batch ORDER BY batch DESC LIMIT 1").map(Self.batch)
        }
    }

    /// What the batch takes from each payer (as recorded with it).
    public func payerTotals(batch: UInt64) async throws -> [Account: UInt64] {
        guard let number = Int64(exactly: batch) else { return [:] }
        let rows = try await database.pool.read { db in
            try Row.fetchAll(db, sql: "SELECT payer, amount FROM settlement_batch_payer WHERE batch = ?", arguments: [number])
                .map { row -> (Data, String) in (row["payer"], row["amount"]) }
        }
        var totals: [Account: UInt64] = [:]
        for (payer, text) in rows {
            guard let account = try? Account(canonicalBytes: Array(payer)), let amount = UInt64(text) else {
                throw StoreError.corruptRow("settlement batch \(batch) payer total")
            }
            totals[account] = amount
        }
        return totals
    }

    static func batch(_ row: Row) throws -> StoredSettlementBatch {
        let number: Int64 = row["batch"], first: Int64 = row["first_sequence"], last: Int64 = row["last_sequence"]
        let epoch: Int64 = row["closed_epoch"], created: Int64 = row["created_at"], statusText: String = row["status"]
        guard number >= 0, first >= 0, last >= first, epoch >= 0, let status = SettlementBatchStatus(rawValue: statusText) else {
            throw StoreError.corruptRow("settlement batch \(number)")
        }
        let encoded: Data = row["encoded"]
        return StoredSettlementBatch(batch: UInt64(number), firstSequence: UInt64(first), lastSequence: UInt64(last),
                                     closedEpoch: UInt64(epoch), encoded: Array(encoded), txID: row["tx_id"], status: status,
                                     createdAtMillis: UInt64(clamping: created))
    }
}
