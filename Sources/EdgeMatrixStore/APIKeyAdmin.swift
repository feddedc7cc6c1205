import EdgeMatrixCore
import Foundation
import GRDB

/// A stored API key as an operator sees it: never the secret, only an id derived from its hash.
public struct APIKeyInfo: Sendable, Equatable {
    /// The first 16 hex digits of SHA-256(secret): enough to name a key, useless to use it.
    public var id: String
    public var label: String
    public var createdAtMillis: Int64
    public var revoked: Bool
    /// The account the key's signed binding names; nil for a key from before bindings (the router's own account).
    public var account: Account?
    /// Base units per epoch; `APIKeyBinding.unlimited` for none.
    public var spendLimitPerEpoch: UInt64
}

public enum APIKeyAdminError: Error, Equatable, CustomStringConvertible, Sendable {
    case notFound(String)
    case ambiguous(String, matches: Int)
    case invalidSelector(String)

    public var description: String {
        switch self {
        case .notFound(let selector): "no API key matches '\(selector)'; list them with `emc keys api list`"
        case .ambiguous(let selector, let count): "'\(selector)' matches \(count) API keys; give more digits of the id"
        case .invalidSelector(let selector):
            "'\(selector.prefix(80))' is neither an API key (emc-sk-...) nor a key id (8 to 64 hex digits from `emc keys api list`)"
        }
    }
}

/// Operator commands over the router's API keys (`emc keys api list|revoke`).
extension APIKeyStore {
    public static let idLength = 16

    /// Every key, oldest first.
    public func list() throws -> [APIKeyInfo] {
        try database.pool.read { db in
            try Row.fetchAll(db, sql: "SELECT \(Self.infoColumns) FROM api_key ORDER BY created_at, key_hash").map(Self.info)
        }
    }

    /// Revokes the one key named by `selector`: the secret itself, or a prefix (8+ hex digits) of its id.
    /// Revoking a revoked key again is not an error. Returns the key.
    @discardableResult
    public func revoke(_ selector: String) throws -> APIKeyInfo {
        let pattern: String
        if selector.hasPrefix(Self.prefix) {
            pattern = Hash32.of(Array(selector.utf8)).hex
        } else {
            let lowered = selector.lowercased()
            guard (8...64).contains(lowered.count), lowered.allSatisfy({ $0.isHexDigit }) else {
                throw APIKeyAdminError.invalidSelector(selector)
            }
            pattern = lowered
        }
        return try database.pool.write { db in
            let hashes = try String.fetchAll(db, sql: "SELECT key_hash FROM api_key WHERE substr(key_hash, 1, ?) = ?",
                                             arguments: [pattern.count, pattern])
            guard !hashes.isEmpty else { throw APIKeyAdminError.notFound(selector.hasPrefix(Self.prefix) ? "the given key" : selector) }
            guard hashes.count == 1 else { throw APIKeyAdminError.ambiguous(selector, matches: hashes.count) }
            try db.execute(sql: "UPDATE api_key SET revoked = 1 WHERE key_hash = ?", arguments: [hashes[0]])
            guard let row = try Row.fetchOne(db, sql: "SELECT \(Self.infoColumns) FROM api_key WHERE key_hash = ?",
                                             arguments: [hashes[0]]) else { throw APIKeyAdminError.notFound(selector) }
            return try Self.info(row)
        }
    }

    static let infoColumns = "key_hash, label, created_at, revoked, account, spend_limit"

    static func info(_ row: Row) throws -> APIKeyInfo {
        let hash: String = row["key_hash"]
        let id = String(hash.prefix(idLength))
        let (account, limit) = try decodeBinding(row, what: id)
        return APIKeyInfo(id: id, label: row["label"], createdAtMillis: row["created_at"], revoked: row["revoked"],
                          account: account, spendLimitPerEpoch: limit)
    }
}
