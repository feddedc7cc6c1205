import EdgeMatrixCore
import Foundation
import GRDB

/// The compute node's receipt outbox on disk (DATA_DIR/outbox.sqlite): every receipt the node signed that its
/// router has not acknowledged yet. A receipt is written before it is sent and deleted once acknowledged, both
/// durably (WAL, synchronous=FULL), so a node killed with kill -9 re-delivers exactly the unacknowledged ones.
public final class ReceiptOutboxStore: Sendable {
    /// One change to the outbox; a batch of them is applied in one transaction (one fsync).
    public enum Change: Sendable {
        case add(Receipt)
        case remove(Hash32)
        /// Acknowledged with the router's countersignature: out of the outbox, into the node's own record of what
        /// it served (`countersigned_receipt`), in one step.
        case keep(Receipt)
    }

    /// The most countersigned receipts kept; beyond this the oldest go (at open).
    public static let keptCapacity = 2_000_000

    let pool: DatabasePool
    public let path: String

    public init(path: String) throws {
        self.path = path
        pool = try DurableDatabase.open(path: path)
        do { try Self.migrator.migrate(pool) } catch {
            throw StoreError.cannotOpen(path: path, reason: "\(error)")
        }
    }

    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1-outbox") { db in
            try db.create(table: "outbox_receipt") { t in
                // The order receipts were signed in: oldest first is the order they are re-delivered and dropped.
                t.autoIncrementedPrimaryKey("seq")
                t.column("receipt_id", .text).notNull().unique(onConflict: .ignore)
                t.column("router_id", .text).notNull()
                t.column("body", .blob).notNull()
                t.column("node_signature", .blob).notNull()
            }
        }
        // The node's own countersigned receipts: the evidence it needs to check the router's settlement batches and
        // to claim on chain what a batch left out, without the router's help.
        migrator.registerMigration("v2-countersigned") { db in
            try db.create(table: "countersigned_receipt") { t in
                t.autoIncrementedPrimaryKey("seq")
                t.column("receipt_id", .text).notNull().unique(onConflict: .ignore)
                t.column("router_id", .text).notNull()
                t.column("sequence", .integer).notNull()
                t.column("attempt", .integer).notNull()
                t.column("settlement_bytes", .blob).notNull()
                t.column("kept_at_ms", .integer).notNull()
            }
            try db.create(index: "countersigned_by_router", on: "countersigned_receipt", columns: ["router_id", "sequence"])
        }
        return migrator
    }

    /// Applies the changes, in order, in one transaction; returns once they are durable.
    public func apply(_ changes: [Change]) async throws {
        guard !changes.isEmpty else { return }
        try await pool.write { db in
            for change in changes {
                switch change {
                case .add(let receipt):
                    try db.execute(sql: """
                        INSERT OR IGNORE INTO outbox_receipt (receipt_id, router_id, body, node_signature) VALUES (?, ?, ?, ?)
                        """, arguments: [receipt.id.hex, receipt.body.routerID.description,
                                         Data(receipt.bodyBytes), Data(receipt.nodeSignature)])
                case .remove(let id):
                    try db.execute(sql: "DELETE FROM outbox_receipt WHERE receipt_id = ?", arguments: [id.hex])
                case .keep(let receipt):
                    try db.execute(sql: "DELETE FROM outbox_receipt WHERE receipt_id = ?", arguments: [receipt.id.hex])
                    guard let bytes = receipt.settlementBytes else { continue }
                    try db.execute(sql: """
                        INSERT OR IGNORE INTO countersigned_receipt (receipt_id, router_id, sequence, attempt, settlement_bytes, kept_at_ms)
                        VALUES (?, ?, ?, ?, ?, ?)
                        """, arguments: [receipt.id.hex, receipt.body.routerID.description, Int64(clamping: receipt.body.sequence),
                                         Int64(receipt.body.attempt), Data(bytes), Int64(clamping: wallClockMillis())])
                }
            }
        }
    }

    /// Deletes receipts of an older version than this node signs (version 1 receipts no router reads any more) and
    /// returns how many it deleted.
    @discardableResult
    public func dropOldVersions() throws -> Int {
        try pool.write { db -> Int in
            // Only version 1 exactly: any other unreadable row is a corrupt file, reported by `load`.
            try db.execute(sql: "DELETE FROM outbox_receipt WHERE substr(body, 1, 1) = x'01'")
            return db.changesCount
        }
    }

    /// Number of receipts stored.
    public func count() throws -> Int {
        let count = try pool.read { db in try Int64.fetchOne(db, sql: "SELECT COUNT(*) FROM outbox_receipt") ?? 0 }
        guard let result = Int(exactly: count) else { throw StoreError.outOfRange("outbox row count \(count)") }
        return result
    }

    /// Deletes all but the newest `capacity` receipts (a file written under a larger capacity, say) and returns how
    /// many it deleted.
    @discardableResult
    public func trim(keepingNewest capacity: Int) throws -> Int {
        guard let keep = Int64(exactly: max(0, capacity)) else { throw StoreError.outOfRange("outbox capacity \(capacity)") }
        let deleted = try pool.write { db -> Int in
            try db.execute(sql: """
                DELETE FROM outbox_receipt WHERE seq NOT IN (SELECT seq FROM outbox_receipt ORDER BY seq DESC LIMIT ?)
                """, arguments: [keep])
            return db.changesCount
        }
        return deleted
    }

    /// Deletes all but the newest `capacity` countersigned receipts; returns how many it deleted.
    @discardableResult
    public func trimCountersigned(keepingNewest capacity: Int) throws -> Int {
        guard let keep = Int64(exactly: max(0, capacity)) else { throw StoreError.outOfRange("kept receipts capacity \(capacity)") }
        return try pool.write { db -> Int in
            try db.execute(sql: """
                DELETE FROM countersigned_receipt WHERE seq NOT IN (SELECT seq FROM countersigned_receipt ORDER BY seq DESC LIMIT ?)
                """, arguments: [keep])
            return db.changesCount
        }
    }

    /// Countersigned receipts the node kept, of one router (all with nil), in router sequence order, from
    /// `afterSequence` (exclusive), at most `limit`. A row that does not decode is a corrupt file.
    public func countersigned(router: NodeID? = nil, afterSequence: UInt64 = 0, limit: Int = 10_000) throws -> [Receipt] {
        let rows = try pool.read { db in
            try Row.fetchAll(db, sql: """
                SELECT seq, settlement_bytes FROM countersigned_receipt WHERE (? IS NULL OR router_id = ?) AND sequence > ?
                ORDER BY router_id, sequence, attempt LIMIT ?
                """, arguments: [router?.description, router?.description, Int64(clamping: afterSequence), max(0, limit)])
        }
        return try rows.map { row in
            let seq: Int64 = row["seq"]
            let bytes: Data = row["settlement_bytes"]
            do { return try Receipt(settlementBytes: Array(bytes)) } catch {
                throw StoreError.corruptRow("countersigned receipt \(seq): \(error)")
            }
        }
    }

    /// Every stored receipt, oldest first. A row whose bytes do not decode, or whose id does not match them, is a
    /// corrupt file, reported rather than re-sent.
    public func load() throws -> [Receipt] {
        let rows = try pool.read { db in
            try Row.fetchAll(db, sql: "SELECT seq, receipt_id, body, node_signature FROM outbox_receipt ORDER BY seq")
        }
        return try rows.map { row in
            let seq: Int64 = row["seq"]
            let id: String = row["receipt_id"]
            let body: Data = row["body"]
            let signature: Data = row["node_signature"]
            let receipt: Receipt
            do { receipt = try Receipt(bodyBytes: Array(body), nodeSignature: Array(signature)) } catch {
                throw StoreError.corruptRow("outbox receipt \(seq): \(error)")
            }
            guard receipt.id.hex == id else { throw StoreError.corruptRow("outbox receipt \(seq): id does not match its bytes") }
            return receipt
        }
    }
}
