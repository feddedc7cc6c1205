import EdgeMatrixCore
import Foundation
import GRDB

public enum StoreError: Error, CustomStringConvertible, Sendable {
    case cannotOpen(path: String, reason: String)
    case corruptRow(String)

    public var description: String {
        switch self {
        case .cannotOpen(let path, let reason): "cannot open database \(path): \(reason)"
        case .corruptRow(let why): "corrupt database row: \(why)"
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

/// Append-only receipt log. Appends are group-committed: concurrent appends share one transaction and one
/// fsync, and each caller returns only once its receipt is durable (that is when the router acknowledges it).
public actor ReceiptStore {
    let database: RouterDatabase
    private var pending: [(Receipt, CheckedContinuation<Void, any Error>)] = []
    private var flushing = false

    public init(database: RouterDatabase) { self.database = database }

    /// Returns once the receipt is committed to disk. Idempotent per receipt id.
    public func append(_ receipt: Receipt) async throws {
        try await withCheckedThrowingContinuation { continuation in
            pending.append((receipt, continuation))
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
                try await database.pool.write { db in
                    for (receipt, _) in batch {
                        let body = receipt.body
                        try db.execute(sql: """
                            INSERT INTO receipt (receipt_id, request_id, node_id, app, model, prompt_tokens, completion_tokens,
                                items, started_at_ms, ended_at_ms, body, node_signature, router_signature, stored_at_ms)
                            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                            """, arguments: [
                                receipt.id.hex, body.requestID, body.nodeID.description, body.app, body.model,
                                Int64(body.units.promptTokens), Int64(body.units.completionTokens), Int64(body.units.items),
                                Int64(body.startedAtMillis), Int64(body.endedAtMillis), Data(receipt.bodyBytes),
                                Data(receipt.nodeSignature), Data(receipt.routerSignature ?? []), now,
                            ])
                    }
                }
                for (_, continuation) in batch { continuation.resume() }
            } catch {
                for (_, continuation) in batch { continuation.resume(throwing: error) }
            }
        }
        flushing = false
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
