import EdgeMatrixCore
import Foundation
import GRDB

/// A committed block as stored: the value bytes consensus agreed on, its commit certificate, the validator set of
/// the next height (with proposer priorities, so a restart resumes exactly), and the state root after it.
public struct StoredBlock: Sendable, Equatable {
    public var height: UInt64
    public var hash: Hash32
    public var timeMillis: UInt64
    public var value: [UInt8]
    public var certificate: [UInt8]
    public var nextValidators: [UInt8]
    public var stateRoot: Hash32
    public var txCount: Int

    public init(height: UInt64, hash: Hash32, timeMillis: UInt64, value: [UInt8], certificate: [UInt8],
                nextValidators: [UInt8], stateRoot: Hash32, txCount: Int) {
        self.height = height
        self.hash = hash
        self.timeMillis = timeMillis
        self.value = value
        self.certificate = certificate
        self.nextValidators = nextValidators
        self.stateRoot = stateRoot
        self.txCount = txCount
    }
}

/// Where a transaction landed and how it ended.
public struct StoredTx: Sendable, Equatable {
    public var hash: Hash32
    public var height: UInt64
    public var index: UInt32
    public var ok: Bool
    /// The ledger's error text when `ok` is false.
    public var error: String?
    /// A stable error code when `ok` is false.
    public var errorCode: String?

    public init(hash: Hash32, height: UInt64, index: UInt32, ok: Bool, error: String? = nil, errorCode: String? = nil) {
        self.hash = hash
        self.height = height
        self.index = index
        self.ok = ok
        self.error = error
        self.errorCode = errorCode
    }
}

/// The chain's blocks in one SQLite file (WAL mode, synchronous=FULL): a block and its transactions are written in
/// one transaction, so after kill -9 a block is either fully there or not at all.
public final class BlockStore: Sendable {
    let pool: DatabasePool
    public let path: String

    public init(path: String) throws {
        self.path = path
        pool = try DurableDatabase.open(path: path)
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.create(table: "block") { t in
                t.primaryKey("height", .integer)
                t.column("hash", .blob).notNull().indexed()
                t.column("time_ms", .integer).notNull()
                t.column("value", .blob).notNull()
                t.column("certificate", .blob).notNull()
                t.column("next_validators", .blob).notNull()
                t.column("state_root", .blob).notNull()
                t.column("tx_count", .integer).notNull()
            }
            try db.create(table: "tx") { t in
                t.primaryKey("hash", .blob)
                t.column("height", .integer).notNull()
                t.column("idx", .integer).notNull()
                t.column("ok", .boolean).notNull()
                t.column("error", .text)
                t.column("error_code", .text)
            }
        }
        try migrator.migrate(pool)
    }

    /// Appends the next block and its transactions atomically and durably. A transaction id that already committed
    /// successfully keeps its row: a failed copy of the same body (say, with a broken signature) never overwrites it.
    public func append(_ block: StoredBlock, txs: [StoredTx]) throws {
        guard let height = Int64(exactly: block.height), let time = Int64(exactly: block.timeMillis) else {
            throw StoreError.outOfRange("block height \(block.height) or time \(block.timeMillis) exceeds SQLite's integer range")
        }
        try pool.write { db in
            try db.execute(sql: """
                INSERT INTO block (height, hash, time_ms, value, certificate, next_validators, state_root, tx_count)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                """, arguments: [height, Data(block.hash.bytes), time, Data(block.value),
                                 Data(block.certificate), Data(block.nextValidators), Data(block.stateRoot.bytes),
                                 block.txCount])
            // The latest outcome wins unless a successful one is already recorded.
            let statement = try db.cachedStatement(sql: """
                INSERT INTO tx (hash, height, idx, ok, error, error_code) VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT(hash) DO UPDATE SET height = excluded.height, idx = excluded.idx, ok = excluded.ok,
                    error = excluded.error, error_code = excluded.error_code
                WHERE NOT tx.ok
                """)
            for tx in txs {
                try statement.execute(arguments: [Data(tx.hash.bytes), height, Int64(tx.index), tx.ok, tx.error, tx.errorCode])
            }
        }
    }

    public func lastHeight() throws -> UInt64 {
        try pool.read { db in try Self.unsigned(try Int64.fetchOne(db, sql: "SELECT MAX(height) FROM block") ?? 0, "MAX(height)") }
    }

    /// The block at `height`; nil for any height the store cannot hold (above Int64.max), as for one not yet committed.
    public func block(at height: UInt64) throws -> StoredBlock? {
        guard let key = Int64(exactly: height) else { return nil }
        return try pool.read { db in
            try Row.fetchOne(db, sql: "SELECT * FROM block WHERE height = ?", arguments: [key]).map(Self.block)
        }
    }

    public func block(hash: Hash32) throws -> StoredBlock? {
        try pool.read { db in
            try Row.fetchOne(db, sql: "SELECT * FROM block WHERE hash = ?", arguments: [Data(hash.bytes)]).map(Self.block)
        }
    }

    /// Blocks from `from` upwards in height order, at most `limit` (1...1000) of them and about `maxBytes` in total.
    public func blocks(from: UInt64, limit: Int, maxBytes: Int = .max) throws -> [StoredBlock] {
        guard let start = Int64(exactly: from) else { return [] }
        let limit = min(max(limit, 1), 1000)
        return try pool.read { db in
            let rows = try Row.fetchCursor(db, sql: "SELECT * FROM block WHERE height >= ? ORDER BY height LIMIT ?",
                                           arguments: [start, limit])
            var out = [StoredBlock]()
            var bytes = 0
            while let row = try rows.next() {
                let block = try Self.block(row)
                bytes = bytes.addingReportingOverflow(block.value.count + block.certificate.count).partialValue
                if !out.isEmpty, bytes > maxBytes { break }
                out.append(block)
            }
            return out
        }
    }

    public func tx(hash: Hash32) throws -> StoredTx? {
        try pool.read { db in
            try Row.fetchOne(db, sql: "SELECT * FROM tx WHERE hash = ?", arguments: [Data(hash.bytes)]).map { row in
                guard let index = UInt32(exactly: row["idx"] as Int64) else { throw StoreError.corruptRow("tx \(hash.hex): index") }
                return StoredTx(hash: hash, height: try Self.unsigned(row["height"], "tx height"), index: index,
                                ok: row["ok"], error: row["error"], errorCode: row["error_code"])
            }
        }
    }

    private static func unsigned(_ value: Int64, _ what: String) throws -> UInt64 {
        guard let result = UInt64(exactly: value) else { throw StoreError.corruptRow("\(what) is negative (\(value))") }
        return result
    }

    private static func block(_ row: Row) throws -> StoredBlock {
        func hash(_ column: String) throws -> Hash32 {
            guard let hash = Hash32(bytes: [UInt8](row[column] as Data)) else { throw StoreError.corruptRow("block \(column) is not 32 bytes") }
            return hash
        }
        return StoredBlock(height: try unsigned(row["height"], "block height"), hash: try hash("hash"),
                           timeMillis: try unsigned(row["time_ms"], "block time"),
                           value: [UInt8](row["value"] as Data), certificate: [UInt8](row["certificate"] as Data),
                           nextValidators: [UInt8](row["next_validators"] as Data), stateRoot: try hash("state_root"),
                           txCount: row["tx_count"])
    }
}
