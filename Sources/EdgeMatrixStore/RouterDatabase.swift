import EdgeMatrixCore
import Foundation
import GRDB

public enum StoreError: Error, CustomStringConvertible, Sendable {
    case cannotOpen(path: String, reason: String)
    case corruptRow(String)
    /// A value the store cannot represent (SQLite integers are signed 64-bit).
    case outOfRange(String)

    public var description: String {
        switch self {
        case .cannotOpen(let path, let reason): "cannot open database \(path): \(reason)"
        case .corruptRow(let why): "corrupt database row: \(why)"
        case .outOfRange(let why): "value out of range: \(why)"
        }
    }
}

/// Opens the project's SQLite files the one way that is safe for money and receipts: WAL mode with
/// synchronous=FULL, so a committed write survives kill -9 and power loss.
enum DurableDatabase {
    static func open(path: String) throws -> DatabasePool {
        var config = Configuration()
        config.prepareDatabase { db in
            try db.execute(sql: "PRAGMA synchronous = FULL")
        }
        config.busyMode = .timeout(10)
        do {
            try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent,
                                                    withIntermediateDirectories: true)
            return try DatabasePool(path: path, configuration: config)
        } catch {
            throw StoreError.cannotOpen(path: path, reason: "\(error)")
        }
    }
}

/// The router's durable state in one SQLite file: API keys (hashed) and receipts.
public final class RouterDatabase: Sendable {
    let pool: DatabasePool
    public let path: String

    public init(path: String) throws {
        self.path = path
        pool = try DurableDatabase.open(path: path)
        try Self.migrator.migrate(pool)
    }

    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.create(table: "api_key") { t in
                t.primaryKey("key_hash", .text)
                t.column("label", .text).notNull()
                t.column("created_at", .integer).notNull()
                t.column("revoked", .boolean).notNull().defaults(to: false)
            }
            try db.create(table: "receipt") { t in
                t.autoIncrementedPrimaryKey("seq")
                t.column("receipt_id", .text).notNull().unique(onConflict: .ignore)
                t.column("request_id", .text).notNull()
                t.column("node_id", .text).notNull().indexed()
                t.column("app", .text).notNull()
                t.column("model", .text).notNull()
                t.column("prompt_tokens", .integer).notNull()
                t.column("completion_tokens", .integer).notNull()
                t.column("items", .integer).notNull()
                t.column("started_at_ms", .integer).notNull()
                t.column("ended_at_ms", .integer).notNull()
                t.column("body", .blob).notNull()
                t.column("node_signature", .blob).notNull()
                t.column("router_signature", .blob).notNull()
                t.column("stored_at_ms", .integer).notNull()
            }
        }
        // What the router assigned to which node, durable before the node sees the request: a receipt is
        // countersigned only against this record (also after a router restart), and only once.
        migrator.registerMigration("v2-assignments") { db in
            try db.create(table: "assignment") { t in
                t.column("request_id", .text).notNull()
                t.column("node_id", .text).notNull()
                t.column("request_hash", .blob).notNull()
                t.column("assigned_at_ms", .integer).notNull()
                t.column("receipt_id", .text)
                t.primaryKey(["request_id", "node_id"])
            }
        }
        return migrator
    }
}

// MARK: - API keys

/// API keys are random secrets shown once; only their SHA-256 is stored.
public struct APIKeyStore: Sendable {
    let database: RouterDatabase
    public init(database: RouterDatabase) { self.database = database }

    public static let prefix = "emc-sk-"

    /// Creates a key and returns its secret text (the only time it exists in clear).
    public func create(label: String) throws -> String {
        var generator = SystemRandomNumberGenerator()
        let secret = Self.prefix + Hex.encode((0..<24).map { _ in UInt8.random(in: 0...255, using: &generator) })
        let hash = Hash32.of(Array(secret.utf8)).hex
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        try database.pool.write { db in
            try db.execute(sql: "INSERT INTO api_key (key_hash, label, created_at) VALUES (?, ?, ?)",
                           arguments: [hash, label, now])
        }
        return secret
    }

    public func isValid(_ secret: String) throws -> Bool {
        let hash = Hash32.of(Array(secret.utf8)).hex
        return try database.pool.read { db in
            try Bool.fetchOne(db, sql: "SELECT NOT revoked FROM api_key WHERE key_hash = ?", arguments: [hash]) ?? false
        }
    }

}

// MARK: - Receipts

public struct StoredReceipt: Sendable, Equatable {
    public var sequence: Int64
    public var receipt: Receipt
}

/// How the store answered a receipt, checked against the router's own assignment record.
public enum ReceiptAppendOutcome: String, Sendable, Equatable {
    /// Newly stored.
    case stored
    /// This very receipt is already stored (a re-delivery whose acknowledgement was lost): acknowledge again.
    case alreadyStored = "already_stored"
    /// Refused: this router never assigned the request to this node.
    case unassigned = "unassigned_receipt"
    /// Refused: a different receipt for this request and node is already stored (billing one request twice).
    case alreadyReceipted = "replayed_receipt"
    /// Refused: the receipt's request hash is not the hash of the bytes the router forwarded.
    case requestHashMismatch = "request_hash_mismatch"
}

/// Append-only receipt log, and the assignment record receipts are checked against. Writes are group-committed:
/// concurrent writes share one transaction and one fsync, and each caller returns only once its write is durable
/// (that is when the router forwards a request, and when it acknowledges a receipt).
public actor ReceiptStore {
    enum Operation {
        case assign(requestID: String, nodeID: NodeID, requestHash: Hash32)
        case receipt(Receipt)
    }

    let database: RouterDatabase
    private var pending: [(Operation, CheckedContinuation<ReceiptAppendOutcome, any Error>)] = []
    private var flushing = false

    public init(database: RouterDatabase) { self.database = database }

    /// Records, durably, that the request was handed to the node; the node may then be paid for it once.
    public func recordAssignment(requestID: String, nodeID: NodeID, requestHash: Hash32) async throws {
        _ = try await enqueue(.assign(requestID: requestID, nodeID: nodeID, requestHash: requestHash))
    }

    /// Stores a countersigned receipt if it matches an assignment that has no receipt yet. Returns once durable.
    public func append(_ receipt: Receipt) async throws -> ReceiptAppendOutcome {
        try await enqueue(.receipt(receipt))
    }

    private func enqueue(_ operation: Operation) async throws -> ReceiptAppendOutcome {
        try await withCheckedThrowingContinuation { continuation in
            pending.append((operation, continuation))
            if !flushing {
                flushing = true
                Task { await self.flush() }
            }
        }
    }

    private func flush() async {
        while !pending.isEmpty {
            let batch = pending
            pending.removeAll()
            let now = Int64(Date().timeIntervalSince1970 * 1000)
            do {
                let outcomes = try await database.pool.write { db in
                    try batch.map { operation, _ -> Result<ReceiptAppendOutcome, StoreError> in
                        switch operation {
                        case .assign(let requestID, let nodeID, let requestHash):
                            try db.execute(sql: """
                                INSERT OR IGNORE INTO assignment (request_id, node_id, request_hash, assigned_at_ms)
                                VALUES (?, ?, ?, ?)
                                """, arguments: [requestID, nodeID.description, Data(requestHash.bytes), now])
                            return .success(.stored)
                        case .receipt(let receipt):
                            return try Self.insert(receipt, now: now, in: db)
                        }
                    }
                }
                for ((_, continuation), outcome) in zip(batch, outcomes) { continuation.resume(with: outcome) }
            } catch {
                for (_, continuation) in batch { continuation.resume(throwing: error) }
            }
        }
        flushing = false
    }

    private static func insert(_ receipt: Receipt, now: Int64, in db: Database) throws -> Result<ReceiptAppendOutcome, StoreError> {
        let body = receipt.body
        // SQLite integers are signed 64-bit: a value above Int64.max is refused, never trapped on.
        guard let prompt = Int64(exactly: body.units.promptTokens), let completion = Int64(exactly: body.units.completionTokens),
              let items = Int64(exactly: body.units.items), let started = Int64(exactly: body.startedAtMillis),
              let ended = Int64(exactly: body.endedAtMillis) else {
            return .failure(.outOfRange("receipt \(receipt.id.hex) has a count or time above \(Int64.max)"))
        }
        let nodeID = body.nodeID.description
        guard let row = try Row.fetchOne(db, sql: """
            SELECT request_hash, receipt_id FROM assignment WHERE request_id = ? AND node_id = ?
            """, arguments: [body.requestID, nodeID]) else { return .success(.unassigned) }
        let assignedHash: Data = row["request_hash"]
        guard Array(assignedHash) == body.requestHash.bytes else { return .success(.requestHashMismatch) }
        let existing: String? = row["receipt_id"]
        if let existing {
            return .success(existing == receipt.id.hex ? .alreadyStored : .alreadyReceipted)
        }
        try db.execute(sql: """
            INSERT INTO receipt (receipt_id, request_id, node_id, app, model, prompt_tokens, completion_tokens,
                items, started_at_ms, ended_at_ms, body, node_signature, router_signature, stored_at_ms)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """, arguments: [
                receipt.id.hex, body.requestID, nodeID, body.app, body.model, prompt, completion, items, started, ended,
                Data(receipt.bodyBytes), Data(receipt.nodeSignature), Data(receipt.routerSignature ?? []), now,
            ])
        try db.execute(sql: "UPDATE assignment SET receipt_id = ? WHERE request_id = ? AND node_id = ?",
                       arguments: [receipt.id.hex, body.requestID, nodeID])
        return .success(.stored)
    }

    /// Receipts in append order, from `afterSequence` (exclusive).
    public func list(afterSequence: Int64 = 0, limit: Int = 1000) async throws -> [StoredReceipt] {
        let rows = try await database.pool.read { db in
            try Row.fetchAll(db, sql: """
                SELECT seq, body, node_signature, router_signature FROM receipt WHERE seq > ? ORDER BY seq LIMIT ?
                """, arguments: [afterSequence, limit])
        }
        return try rows.map { row in
            let body: Data = row["body"]
            let nodeSig: Data = row["node_signature"]
            let routerSig: Data = row["router_signature"]
            do {
                let receipt = try Receipt(bodyBytes: Array(body), nodeSignature: Array(nodeSig),
                                          routerSignature: Array(routerSig))
                return StoredReceipt(sequence: row["seq"], receipt: receipt)
            } catch {
                throw StoreError.corruptRow("receipt \(row["seq"] as Int64): \(error)")
            }
        }
    }
}
