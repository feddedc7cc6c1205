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

/// The router's durable state in one SQLite file: API keys (hashed, with their signed bindings), the sequence
/// numbers of accepted requests, what was assigned to which node, and receipts.
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
        // Receipt v2: receipts are named by (router sequence number, attempt). Version 1 receipts and their
        // assignments are kept aside, undecoded (nothing settled them; v1 is no longer read).
        migrator.registerMigration("v3-receipt-v2") { db in
            try db.rename(table: "receipt", to: "receipt_v1")
            try db.rename(table: "assignment", to: "assignment_v1")
            // An index keeps its name when its table is renamed; the new receipt table wants it.
            try db.execute(sql: "DROP INDEX IF EXISTS receipt_on_node_id")
            // One row per accepted request: its sequence number, contiguous from 1 and never reused.
            try db.create(table: "accepted_request") { t in
                t.primaryKey("sequence", .integer)
                t.column("key_hash", .text).notNull()
                t.column("payer", .blob).notNull()
                t.column("accepted_at_ms", .integer).notNull()
                // The router-local spend epoch the request counts against (see `APIKeySpend`).
                t.column("epoch", .integer).notNull().defaults(to: 0)
            }
            // What each key spent per epoch, in base units (decimal text: a u64), from its stored receipts.
            try db.create(table: "key_spend") { t in
                t.column("key_hash", .text).notNull()
                t.column("epoch", .integer).notNull()
                t.column("spent", .text).notNull()
                t.primaryKey(["key_hash", "epoch"])
            }
            // What the router handed to which node, durable before the node sees the request; and, once the answer
            // ended, what the router relayed. A receipt is countersigned only against this record, and only once.
            try db.create(table: "assignment") { t in
                t.column("sequence", .integer).notNull()
                t.column("attempt", .integer).notNull()
                t.column("node_id", .text).notNull()
                t.column("app", .text).notNull()
                t.column("model", .text).notNull()
                t.column("request_hash", .blob).notNull()
                t.column("request_bytes", .integer).notNull()
                t.column("payer", .blob).notNull()
                t.column("prices", .blob).notNull()
                t.column("assigned_at_ms", .integer).notNull()
                t.column("response_status", .integer)
                t.column("response_hash", .blob)
                t.column("response_bytes", .integer)
                t.column("receipt_id", .text)
                t.primaryKey(["sequence", "attempt"])
            }
            try db.create(table: "receipt") { t in
                t.autoIncrementedPrimaryKey("position")
                t.column("receipt_id", .text).notNull().unique()
                t.column("sequence", .integer).notNull()
                t.column("attempt", .integer).notNull()
                t.column("payer", .blob).notNull().indexed()
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
                // One receipt per node that worked on a request: the identity settlement relies on.
                t.uniqueKey(["sequence", "attempt"])
            }
            // Keys are bound to accounts by a signed statement. Keys from before this have no binding and count as
            // bound to the router's own account (NULL account), with no spend limit.
            try db.alter(table: "api_key") { t in
                t.add(column: "account", .blob)
                t.add(column: "spend_limit", .text)
                t.add(column: "binding", .blob)
                t.add(column: "binding_signature", .blob)
            }
            try db.create(index: "api_key_account", on: "api_key", columns: ["account"])
        }
        // What each payer's stored receipts cost and no settlement has taken from its escrow yet (base units, decimal
        // text: a u64). The router serves a payer only while its escrow's available balance on chain exceeds this.
        migrator.registerMigration("v4-payer-unsettled") { db in
            try db.create(table: "payer_unsettled") { t in
                t.primaryKey("payer", .blob)
                t.column("amount", .text).notNull()
            }
        }
        // Settlement batches the router closed (docs/PROTOCOL.md § 12): the encoded `settle` payload, the range it
        // covers and how far it got on chain; and what each batch takes from each payer, subtracted from
        // `payer_unsettled` once the batch is included.
        migrator.registerMigration("v5-settlement-batches") { db in
            try db.create(table: "settlement_batch") { t in
                t.primaryKey("batch", .integer)
                t.column("first_sequence", .integer).notNull()
                t.column("last_sequence", .integer).notNull()
                t.column("closed_epoch", .integer).notNull()
                t.column("encoded", .blob).notNull()
                t.column("tx_id", .text)
                t.column("status", .text).notNull()
                t.column("created_at", .integer).notNull()
            }
            try db.create(table: "settlement_batch_payer") { t in
                t.column("batch", .integer).notNull()
                t.column("payer", .blob).notNull()
                t.column("amount", .text).notNull()
                t.primaryKey(["batch", "payer"])
            }
            try db.create(index: "receipt_on_sequence", on: "receipt", columns: ["sequence"])
        }
        // The request's own bound on what it may bill (`RequestBound.units` of the forwarded request: the prompt
        // bound, max_tokens × choices, the embeddings inputs), which the router reserved against the escrow: a receipt
        // above it is refused like one above the relayed bytes. NULL on older rows (only the relayed bound applies).
        migrator.registerMigration("v6-assignment-request-bound") { db in
            try db.alter(table: "assignment") { t in
                t.add(column: "bound_prompt_tokens", .integer)
                t.add(column: "bound_completion_tokens", .integer)
                t.add(column: "bound_items", .integer)
            }
        }
        return migrator
    }
}

// MARK: - API keys

/// An API key as the gateway sees it once the secret checks out: its hash, who pays, and its limit.
public struct AuthorizedKey: Sendable, Equatable {
    public var keyHash: Hash32
    /// The account the key's binding names; nil for a key from before bindings (the router's own account).
    public var account: Account?
    public var spendLimitPerEpoch: UInt64

    public init(keyHash: Hash32, account: Account?, spendLimitPerEpoch: UInt64) {
        self.keyHash = keyHash
        self.account = account
        self.spendLimitPerEpoch = spendLimitPerEpoch
    }
}

/// How the store answered a binding.
public enum APIKeyBindOutcome: String, Sendable, Equatable {
    case stored
    /// A key with this hash exists already (a repeated post, or a revoked key): nothing changed.
    case exists = "key_exists"
    /// The account holds the most keys one account may bind at this router.
    case tooManyKeys = "too_many_keys"
}

/// API keys are random secrets shown once; only their SHA-256 is stored, with the account's signed binding.
public struct APIKeyStore: Sendable {
    let database: RouterDatabase
    public init(database: RouterDatabase) { self.database = database }

    public static let prefix = APIKeyBinding.secretPrefix
    /// Bound keys (revoked ones included) per account: anyone may post a binding, so one account cannot fill the disk.
    public static let maxKeysPerAccount = 64
    public static let maxLabelBytes = 128

    /// Creates a key bound to `signer`'s account (the router's own key for an operator's key), and returns its
    /// secret text: the only time it exists in clear.
    public func create(label: String, router: PublicKey, signer: SigningKey, spendLimitPerEpoch: UInt64 = APIKeyBinding.unlimited) throws -> String {
        let secret = APIKeyBinding.newSecret()
        let binding = APIKeyBinding(router: router, account: Account(owner: signer.publicKey), keyHash: APIKeyBinding.hash(ofSecret: secret),
                                    spendLimitPerEpoch: spendLimitPerEpoch, createdAtMillis: wallClockMillis())
        switch try bind(SignedAPIKeyBinding(signing: binding, with: signer), label: label) {
        case .stored: return secret
        case let refused: throw StoreError.outOfRange("API key not stored: \(refused.rawValue)")
        }
    }

    /// Stores a checked binding (see `SignedAPIKeyBinding(bytes:signature:router:)`) under its key hash.
    public func bind(_ signed: SignedAPIKeyBinding, label: String) throws -> APIKeyBindOutcome {
        let binding = signed.binding
        let account = Data(binding.account.canonicalBytes)
        guard let created = Int64(exactly: binding.createdAtMillis) else {
            throw StoreError.outOfRange("binding created_at_ms \(binding.createdAtMillis)")
        }
        return try database.pool.write { db in
            if try Bool.fetchOne(db, sql: "SELECT 1 FROM api_key WHERE key_hash = ?", arguments: [binding.keyHash.hex]) == true {
                return .exists
            }
            let held = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM api_key WHERE account = ?", arguments: [account]) ?? 0
            guard held < Self.maxKeysPerAccount else { return .tooManyKeys }
            try db.execute(sql: """
                INSERT INTO api_key (key_hash, label, created_at, account, spend_limit, binding, binding_signature)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                """, arguments: [binding.keyHash.hex, String(label.prefix(Self.maxLabelBytes)), created, account,
                                 String(binding.spendLimitPerEpoch), Data(signed.bytes), Data(signed.signature)])
            return .stored
        }
    }

    /// The key with this secret, unless unknown or revoked.
    public func lookup(_ secret: String) throws -> AuthorizedKey? {
        let hash = APIKeyBinding.hash(ofSecret: secret)
        guard let row = try database.pool.read({ db in
            try Row.fetchOne(db, sql: "SELECT account, spend_limit FROM api_key WHERE key_hash = ? AND NOT revoked",
                             arguments: [hash.hex])
        }) else { return nil }
        let (account, limit) = try Self.decodeBinding(row, what: hash.hex.prefix(Self.idLength))
        return AuthorizedKey(keyHash: hash, account: account, spendLimitPerEpoch: limit)
    }

    public func isValid(_ secret: String) throws -> Bool { try lookup(secret) != nil }

    static func decodeBinding(_ row: Row, what: some StringProtocol) throws -> (Account?, UInt64) {
        var account: Account?
        if let bytes: Data = row["account"] {
            do { account = try Account(canonicalBytes: Array(bytes)) } catch { throw StoreError.corruptRow("API key \(what): account: \(error)") }
        }
        var limit = APIKeyBinding.unlimited
        if let text: String = row["spend_limit"] {
            guard let value = UInt64(text) else { throw StoreError.corruptRow("API key \(what): spend limit '\(text.prefix(40))'") }
            limit = value
        }
        return (account, limit)
    }

}

// MARK: - Receipts

public struct StoredReceipt: Sendable, Equatable {
    /// Order in which the router stored it (not the router sequence number, which is in the body).
    public var position: Int64
    public var receipt: Receipt
}

/// One request handed to one node, as the router records it before the node sees it.
public struct Assignment: Sendable, Equatable {
    public var sequence: UInt64
    public var attempt: UInt32
    public var nodeID: NodeID
    public var app: String
    public var model: String
    public var requestHash: Hash32
    public var requestBytes: UInt64
    public var payer: Account
    public var prices: UnitPrices
    /// `RequestBound.units` of the forwarded request: no receipt may bill more (nil: only the relayed bound applies).
    public var requestBound: WorkUnits?

    public init(sequence: UInt64, attempt: UInt32, nodeID: NodeID, app: String, model: String, requestHash: Hash32,
                requestBytes: UInt64, payer: Account, prices: UnitPrices, requestBound: WorkUnits? = nil) {
        self.requestBound = requestBound
        self.sequence = sequence
        self.attempt = attempt
        self.nodeID = nodeID
        self.app = app
        self.model = model
        self.requestHash = requestHash
        self.requestBytes = requestBytes
        self.payer = payer
        self.prices = prices
    }
}

/// What the router itself relayed of one answer: the node's receipt must agree with it.
public struct RelayedAnswer: Sendable, Equatable {
    public var status: UInt16
    public var responseHash: Hash32
    public var responseBytes: UInt64

    public init(status: UInt16, responseHash: Hash32, responseBytes: UInt64) {
        self.status = status
        self.responseHash = responseHash
        self.responseBytes = responseBytes
    }
}

/// How the store answered a receipt, checked against the router's own assignment record.
public enum ReceiptAppendOutcome: String, Sendable, Equatable {
    /// Newly stored.
    case stored
    /// This very receipt is already stored (a re-delivery whose acknowledgement was lost): acknowledge again.
    case alreadyStored = "already_stored"
    /// Refused: this router never assigned this (sequence, attempt) to this node.
    case unassigned = "unassigned_receipt"
    /// Refused: a different receipt for this (sequence, attempt) is already stored (billing one request twice).
    case alreadyReceipted = "replayed_receipt"
    /// Refused: the receipt's request hash is not the hash of what the router forwarded.
    case requestHashMismatch = "request_hash_mismatch"
    /// Refused: the receipt names another payer than the account the request's API key is bound to.
    case payerMismatch = "payer_mismatch"
    /// Refused: the receipt names other unit prices than those in force at the assignment.
    case pricesMismatch = "prices_mismatch"
    /// Refused: the receipt names another app or model than the assignment.
    case assignmentMismatch = "assignment_mismatch"
    /// Refused: the receipt's response hash or status is not what the router relayed.
    case responseMismatch = "receipt_mismatch"
    /// Refused: the receipt bills more units than the relayed bytes can carry, or than the request's own bound
    /// (`BilledUnits.bound`, `RequestBound`).
    case unitsAboveBound = "units_above_relayed_bound"
    /// Refused: its sequence number is in a settlement batch the router already closed, so it can no longer be
    /// settled (a late re-delivery; not misbehaviour by itself).
    case alreadyBatched = "sequence_already_batched"
}

/// Why the store refused to record an assignment (nothing was recorded; the node must not get the request).
public enum AssignmentRefusal: Error, Equatable, Sendable, CustomStringConvertible {
    /// At the node's prices now, the request's worst case costs more than was reserved for it at admission (its
    /// prices rose in between); nil: a cost beyond 64 bits.
    case aboveReservation(cost: UInt64?, reserved: UInt64)

    public var code: String { "price_above_reservation" }

    public var description: String {
        switch self {
        case .aboveReservation(let cost, let reserved):
            "at the node's prices now the request may cost \(cost.map { "\(Amount(baseUnits: $0)) EMC" } ?? "more than 2^64 − 1 base units"), "
                + "above the \(Amount(baseUnits: reserved)) EMC reserved for it"
        }
    }
}

/// Append-only receipt log, the sequence numbers of accepted requests, and the assignment record receipts are
/// checked against. Writes are group-committed: concurrent writes share one transaction and one fsync, and each
/// caller returns only once its write is durable (that is when the router accepts a request, forwards it, and
/// acknowledges a receipt).
public actor ReceiptStore {
    enum Operation {
        case accept(keyHash: Hash32, payer: Account, epoch: UInt64, limit: UInt64, escrowAvailable: UInt64?, worst: UInt64)
        case assign(Assignment)
        case relayed(sequence: UInt64, attempt: UInt32, RelayedAnswer)
        case receipt(Receipt, relayed: RelayedAnswer?)
    }

    enum Answer {
        case sequence(UInt64)
        case overLimit(spent: UInt64)
        case overEscrow(unsettled: UInt64, reserved: UInt64, worst: UInt64, available: UInt64)
        case done
        case assignmentRefused(AssignmentRefusal)
        case receipt(ReceiptAppendOutcome)
    }

    /// What one flush did to the reservations, replayed on the actor's copy once the write is durable (a release
    /// that came meanwhile stays released: every event is keyed by sequence and idempotent).
    enum ReservationEvent: Sendable {
        case reserve(UInt64, payer: Account, amount: UInt64)
        case assigned(UInt64, attempt: UInt32)
        case release(UInt64)
    }

    let database: RouterDatabase
    /// Told of every sequence number given out before the number is durable (visible to readers), so a settlement
    /// batch never closes over a request that has a number but is not yet known to be in flight.
    let holds: (any AcceptedSequenceHolds)?
    private var pending: [(Operation, CheckedContinuation<Answer, any Error>)] = []
    private var flushing = false
    /// The worst-case costs of accepted requests not yet receipted, held against their payers' escrows.
    private var reservations = EscrowReservations()

    public init(database: RouterDatabase, holds: (any AcceptedSequenceHolds)? = nil) {
        self.database = database
        self.holds = holds
    }

    /// Accepts a request: returns its sequence number, one more than the last one ever given out (durably, so a
    /// restarted router never gives a number twice and never skips one).
    public func accept(keyHash: Hash32, payer: Account) async throws -> UInt64 {
        guard case .accepted(let sequence) = try await accept(keyHash: keyHash, payer: payer, epoch: 0, spendLimit: APIKeyBinding.unlimited,
                                                            escrowAvailable: nil, worstCost: 0) else {
            throw StoreError.corruptRow("no sequence number allocated")
        }
        return sequence
    }

    public enum Acceptance: Sendable, Equatable {
        case accepted(sequence: UInt64)
        /// The key's receipts in this epoch already cost its spend limit: no sequence number was given out.
        case overLimit(spent: UInt64)
        /// What the payer's unsettled receipts cost, what its requests in flight have reserved and this request's
        /// worst case (at least 1) together exceed what its escrow with this router has available on chain.
        case overEscrow(unsettled: UInt64, reserved: UInt64, worst: UInt64, available: UInt64)
    }

    /// Accepts a request unless the key has spent its limit in `epoch` (stored receipts count), or, when
    /// `escrowAvailable` is given (the payer's escrow's available balance with this router as last read from the
    /// chain), unless `unsettled + reserved + max(worstCost, 1) > escrowAvailable`. An accepted request then reserves
    /// `max(worstCost, 1)` in the same step, so concurrent requests cannot pass the escrow together; the reservation
    /// ends when the receipt of its latest attempt is stored (its cost is then unsettled) or with
    /// `releaseReservation`. The minimum of 1 keeps an escrow with nothing available from serving even free work.
    public func accept(keyHash: Hash32, payer: Account, epoch: UInt64, spendLimit: UInt64,
                       escrowAvailable: UInt64? = nil, worstCost: UInt64 = 0) async throws -> Acceptance {
        switch try await enqueue(.accept(keyHash: keyHash, payer: payer, epoch: epoch, limit: spendLimit, escrowAvailable: escrowAvailable,
                                         worst: max(worstCost, 1))) {
        case .sequence(let sequence): return .accepted(sequence: sequence)
        case .overLimit(let spent): return .overLimit(spent: spent)
        case .overEscrow(let unsettled, let reserved, let worst, let available):
            return .overEscrow(unsettled: unsettled, reserved: reserved, worst: worst, available: available)
        default: throw StoreError.corruptRow("no sequence number allocated")
        }
    }

    /// Ends the reservation of a request that ended without a stored receipt (or whose receipt is handled); ending
    /// one that is gone changes nothing.
    public func releaseReservation(_ sequence: UInt64) {
        reservations.release(sequence)
    }

    /// What the payer's requests in flight have reserved.
    public func reserved(payer: Account) -> UInt64 { reservations.reserved(payer: payer) }

    /// How many requests hold a reservation.
    public var reservationCount: Int { reservations.count }

    /// What the payer's stored receipts cost that no settlement has taken from its escrow yet (saturating).
    public func unsettled(payer: Account) async throws -> UInt64 {
        try await database.pool.read { db in try Self.unsettled(payer: payer, in: db) }
    }

    private static func unsettled(payer: Account, in db: Database) throws -> UInt64 {
        try amount(db, sql: "SELECT amount FROM payer_unsettled WHERE payer = ?", arguments: [Data(payer.canonicalBytes)],
                   row: "payer_unsettled of \(payer)")
    }

    /// A stored u64 amount (kept as decimal text: SQLite integers are signed), 0 when there is no row.
    private static func amount(_ db: Database, sql: String, arguments: StatementArguments, row: @autoclosure () -> String) throws -> UInt64 {
        guard let text = try String.fetchOne(db, sql: sql, arguments: arguments) else { return 0 }
        guard let value = UInt64(text) else { throw StoreError.corruptRow("\(row()): '\(text.prefix(40))'") }
        return value
    }

    /// What the key's stored receipts of `epoch` cost, in base units (saturating at 2^64 − 1).
    public func spent(keyHash: Hash32, epoch: UInt64) async throws -> UInt64 {
        try await database.pool.read { db in try Self.spent(keyHash: keyHash, epoch: epoch, in: db) }
    }

    private static func spent(keyHash: Hash32, epoch: UInt64, in db: Database) throws -> UInt64 {
        guard let epoch = Int64(exactly: epoch) else { return 0 }
        return try amount(db, sql: "SELECT spent FROM key_spend WHERE key_hash = ? AND epoch = ?", arguments: [keyHash.hex, epoch],
                          row: "key_spend of \(keyHash.hex.prefix(16))")
    }

    /// Records, durably, that the request was handed to the node on these terms; the node may then be paid once.
    /// Throws `AssignmentRefusal` (recording nothing) when the request holds a reservation that the worst case at
    /// these prices would exceed.
    public func recordAssignment(_ assignment: Assignment) async throws {
        if case .assignmentRefused(let refusal) = try await enqueue(.assign(assignment)) { throw refusal }
    }

    /// Records what the router relayed of an answer that ended without an acceptable receipt, so that a receipt
    /// the node sends later (on its control stream) is checked against it too.
    public func recordRelayed(sequence: UInt64, attempt: UInt32, _ relayed: RelayedAnswer) async throws {
        _ = try await enqueue(.relayed(sequence: sequence, attempt: attempt, relayed))
    }

    /// Stores a countersigned receipt if it matches its assignment, which has no receipt yet, and what the router
    /// relayed (`relayed`, or the record of it). Returns once durable.
    public func append(_ receipt: Receipt, relayed: RelayedAnswer? = nil) async throws -> ReceiptAppendOutcome {
        guard case .receipt(let outcome) = try await enqueue(.receipt(receipt, relayed: relayed)) else {
            throw StoreError.corruptRow("no receipt outcome")
        }
        return outcome
    }

    private func enqueue(_ operation: Operation) async throws -> Answer {
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
            let now = Int64(clamping: wallClockMillis())
            let holds = holds
            let held = HeldSequences()
            reservations.expire()
            let snapshot = reservations
            do {
                let (outcomes, events) = try await database.pool.write { db in
                    // The batch's operations in order against one copy of the reservations, so that a check and its
                    // reservation are one step and each accept sees those before it (and receipts stored before it).
                    var reservations = snapshot
                    var events = [ReservationEvent]()
                    let outcomes = try batch.map { operation, _ -> Result<Answer, StoreError> in
                        switch operation {
                        case .accept(let keyHash, let payer, let epoch, let limit, let escrowAvailable, let worst):
                            if limit != APIKeyBinding.unlimited {
                                let spent = try Self.spent(keyHash: keyHash, epoch: epoch, in: db)
                                if spent >= limit { return .success(.overLimit(spent: spent)) }
                            }
                            if let escrowAvailable {
                                let unsettled = try Self.unsettled(payer: payer, in: db)
                                let reserved = reservations.reserved(payer: payer)
                                guard EscrowReservations.admits(unsettled: unsettled, reserved: reserved, worst: worst,
                                                                available: escrowAvailable) else {
                                    return .success(.overEscrow(unsettled: unsettled, reserved: reserved, worst: worst,
                                                                available: escrowAvailable))
                                }
                            }
                            let accepted = try Self.accept(keyHash: keyHash, payer: payer, epoch: epoch, now: now, in: db)
                            if case .success(let sequence) = accepted {
                                if let holds {
                                    holds.hold(sequence)
                                    held.append(sequence)
                                }
                                if escrowAvailable != nil {
                                    reservations.reserve(sequence, payer: payer, amount: worst)
                                    events.append(.reserve(sequence, payer: payer, amount: worst))
                                }
                            }
                            return accepted.map { .sequence($0) }
                        case .assign(let assignment):
                            if let entry = reservations.entry(assignment.sequence) {
                                if let bound = assignment.requestBound {
                                    let cost = assignment.prices.cost(of: bound)
                                    guard let cost, cost <= entry.amount else {
                                        return .success(.assignmentRefused(.aboveReservation(cost: cost, reserved: entry.amount)))
                                    }
                                }
                                reservations.assigned(assignment.sequence, attempt: assignment.attempt)
                                events.append(.assigned(assignment.sequence, attempt: assignment.attempt))
                            }
                            return try Self.insert(assignment, now: now, in: db).map { .done }
                        case .relayed(let sequence, let attempt, let relayed):
                            return try Self.record(relayed, sequence: sequence, attempt: attempt, in: db).map { .done }
                        case .receipt(let receipt, let relayed):
                            let outcome = try Self.insert(receipt, relayed: relayed, now: now, in: db)
                            // Its cost is now unsettled: the reservation it replaces ends in the same step.
                            let body = receipt.body
                            if case .success(.stored) = outcome, let entry = reservations.entry(body.sequence), body.attempt >= entry.attempt {
                                reservations.release(body.sequence)
                                events.append(.release(body.sequence))
                            }
                            return outcome.map { .receipt($0) }
                        }
                    }
                    return (outcomes, events)
                }
                // Before anyone learns a new sequence number, so its release can never come first.
                for event in events {
                    switch event {
                    case .reserve(let sequence, let payer, let amount): reservations.reserve(sequence, payer: payer, amount: amount)
                    case .assigned(let sequence, let attempt): reservations.assigned(sequence, attempt: attempt)
                    case .release(let sequence): reservations.release(sequence)
                    }
                }
                for ((operation, continuation), outcome) in zip(batch, outcomes) {
                    if case .receipt(let receipt, _) = operation, case .success(.receipt(.stored)) = outcome {
                        holds?.receiptStored(receipt.body.sequence)
                    }
                    continuation.resume(with: outcome)
                }
            } catch {
                // Nothing was given out: the numbers held above are not in flight.
                for sequence in held.all { holds?.release(sequence) }
                for (_, continuation) in batch { continuation.resume(throwing: error) }
            }
        }
        flushing = false
    }

    private static func accept(keyHash: Hash32, payer: Account, epoch: UInt64, now: Int64, in db: Database) throws -> Result<UInt64, StoreError> {
        let last = try Int64.fetchOne(db, sql: "SELECT MAX(sequence) FROM accepted_request") ?? 0
        guard last >= 0, last < Int64.max, let epoch = Int64(exactly: epoch) else {
            return .failure(.outOfRange("router sequence number \(last) or epoch \(epoch)"))
        }
        try db.execute(sql: "INSERT INTO accepted_request (sequence, key_hash, payer, accepted_at_ms, epoch) VALUES (?, ?, ?, ?, ?)",
                       arguments: [last + 1, keyHash.hex, Data(payer.canonicalBytes), now, epoch])
        return .success(UInt64(last + 1))
    }

    private static func insert(_ a: Assignment, now: Int64, in db: Database) throws -> Result<Void, StoreError> {
        guard let sequence = Int64(exactly: a.sequence), let requestBytes = Int64(exactly: a.requestBytes) else {
            return .failure(.outOfRange("assignment \(a.sequence).\(a.attempt)"))
        }
        // Clamped: a bound beyond Int64.max is no bound (no receipt may bill that much anyway).
        let bound = a.requestBound
        try db.execute(sql: """
            INSERT OR IGNORE INTO assignment (sequence, attempt, node_id, app, model, request_hash, request_bytes, payer, prices,
                assigned_at_ms, bound_prompt_tokens, bound_completion_tokens, bound_items) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """, arguments: [sequence, Int64(a.attempt), a.nodeID.description, a.app, a.model, Data(a.requestHash.bytes), requestBytes,
                             Data(a.payer.canonicalBytes), Data(a.prices.canonicalBytes), now,
                             bound.map { Int64(clamping: $0.promptTokens) }, bound.map { Int64(clamping: $0.completionTokens) },
                             bound.map { Int64(clamping: $0.items) }])
        return .success(())
    }

    private static func record(_ relayed: RelayedAnswer, sequence: UInt64, attempt: UInt32, in db: Database) throws -> Result<Void, StoreError> {
        guard let sequence = Int64(exactly: sequence), let bytes = Int64(exactly: relayed.responseBytes) else {
            return .failure(.outOfRange("relayed answer of \(sequence).\(attempt)"))
        }
        // The first record stands: what was relayed does not change afterwards.
        try db.execute(sql: """
            UPDATE assignment SET response_status = ?, response_hash = ?, response_bytes = ?
            WHERE sequence = ? AND attempt = ? AND response_hash IS NULL
            """, arguments: [Int64(relayed.status), Data(relayed.responseHash.bytes), bytes, sequence, Int64(attempt)])
        return .success(())
    }

    private static func insert(_ receipt: Receipt, relayed: RelayedAnswer?, now: Int64,
                               in db: Database) throws -> Result<ReceiptAppendOutcome, StoreError> {
        let body = receipt.body
        // SQLite integers are signed 64-bit: a value above Int64.max is refused, never trapped on.
        guard let prompt = Int64(exactly: body.units.promptTokens), let completion = Int64(exactly: body.units.completionTokens),
              let items = Int64(exactly: body.units.items), let started = Int64(exactly: body.startedAtMillis),
              let ended = Int64(exactly: body.endedAtMillis), let sequence = Int64(exactly: body.sequence) else {
            return .failure(.outOfRange("receipt \(receipt.id.hex) has a count, time or sequence above \(Int64.max)"))
        }
        let attempt = Int64(body.attempt)
        // Checked on the receipt table, not the assignment: a closed batch's assignments are pruned, and an exact
        // re-delivery of a stored receipt (its acknowledgement was lost) must still be acknowledged.
        if let existing = try String.fetchOne(db, sql: "SELECT receipt_id FROM receipt WHERE sequence = ? AND attempt = ?",
                                              arguments: [sequence, attempt]) {
            return .success(existing == receipt.id.hex ? .alreadyStored : .alreadyReceipted)
        }
        // A closed batch's range is final: a receipt stored in it now would be one the batch left out.
        if let closed = try Int64.fetchOne(db, sql: "SELECT MAX(last_sequence) FROM settlement_batch"), sequence <= closed {
            return .success(.alreadyBatched)
        }
        guard let row = try Row.fetchOne(db, sql: """
            SELECT node_id, app, model, request_hash, request_bytes, payer, prices, response_status, response_hash, response_bytes,
                bound_prompt_tokens, bound_completion_tokens, bound_items FROM assignment WHERE sequence = ? AND attempt = ?
            """, arguments: [sequence, attempt]),
              row["node_id"] as String == body.nodeID.description else { return .success(.unassigned) }
        guard Array(row["request_hash"] as Data) == body.requestHash.bytes else { return .success(.requestHashMismatch) }
        guard Array(row["payer"] as Data) == body.payer.canonicalBytes else { return .success(.payerMismatch) }
        guard Array(row["prices"] as Data) == body.prices.canonicalBytes else { return .success(.pricesMismatch) }
        guard row["app"] as String == body.app, row["model"] as String == body.model else { return .success(.assignmentMismatch) }
        let requestBytes = UInt64(clamping: row["request_bytes"] as Int64)
        // What was relayed: this answer's, or the record of it. Without either (the router stopped mid-answer) only
        // the request side can be bounded.
        var answer = relayed
        if answer == nil, let hash: Data = row["response_hash"], let hash32 = Hash32(bytes: Array(hash)),
           let status = UInt16(exactly: row["response_status"] as Int64? ?? -1), let bytes = row["response_bytes"] as Int64? {
            answer = RelayedAnswer(status: status, responseHash: hash32, responseBytes: UInt64(clamping: bytes))
        }
        if let answer {
            guard answer.status == body.status, answer.responseHash == body.responseHash else { return .success(.responseMismatch) }
        }
        var requestBound: WorkUnits?
        if let prompt = row["bound_prompt_tokens"] as Int64?, let completion = row["bound_completion_tokens"] as Int64?,
           let items = row["bound_items"] as Int64? {
            requestBound = WorkUnits(promptTokens: UInt64(clamping: prompt), completionTokens: UInt64(clamping: completion),
                                     items: UInt64(clamping: items))
        }
        let bound = BilledUnits.bound(requestBytes: requestBytes, responseBytes: answer?.responseBytes ?? .max, requestBound: requestBound)
        guard body.units.isWithin(bound) else { return .success(.unitsAboveBound) }
        if let relayed, case .failure(let error) = try record(relayed, sequence: body.sequence, attempt: body.attempt, in: db) {
            return .failure(error)
        }
        try db.execute(sql: """
            INSERT INTO receipt (receipt_id, sequence, attempt, payer, node_id, app, model, prompt_tokens, completion_tokens,
                items, started_at_ms, ended_at_ms, body, node_signature, router_signature, stored_at_ms)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """, arguments: [
                receipt.id.hex, sequence, attempt, Data(body.payer.canonicalBytes), body.nodeID.description, body.app, body.model,
                prompt, completion, items, started, ended, Data(receipt.bodyBytes), Data(receipt.nodeSignature),
                Data(receipt.routerSignature ?? []), now,
            ])
        try db.execute(sql: "UPDATE assignment SET receipt_id = ? WHERE sequence = ? AND attempt = ?",
                       arguments: [receipt.id.hex, sequence, attempt])
        // The key that made the request has spent what the receipt costs (a cost above 64 bits counts as all).
        if let accepted = try Row.fetchOne(db, sql: "SELECT key_hash, epoch FROM accepted_request WHERE sequence = ?", arguments: [sequence]),
           let keyHash = Hash32(hex: accepted["key_hash"] as String) {
            let epoch: Int64 = accepted["epoch"]
            let before = try spent(keyHash: keyHash, epoch: UInt64(clamping: epoch), in: db)
            let (total, overflow) = before.addingReportingOverflow(body.cost ?? .max)
            try db.execute(sql: "INSERT OR REPLACE INTO key_spend (key_hash, epoch, spent) VALUES (?, ?, ?)",
                           arguments: [keyHash.hex, epoch, String(overflow ? .max : total)])
        }
        // And its payer owes it until a settlement takes it from the escrow.
        let owed = try unsettled(payer: body.payer, in: db)
        let (owedTotal, owedOverflow) = owed.addingReportingOverflow(body.cost ?? .max)
        try db.execute(sql: "INSERT OR REPLACE INTO payer_unsettled (payer, amount) VALUES (?, ?)",
                       arguments: [Data(body.payer.canonicalBytes), String(owedOverflow ? .max : owedTotal)])
        return .success(.stored)
    }

    /// Sequence numbers assigned to a node at or after `sinceMillis` of which no attempt has a receipt yet, with the
    /// node of each attempt: after a restart, requests whose receipts their nodes may still re-deliver.
    public nonisolated func sequencesAwaitingReceipt(assignedSinceMillis sinceMillis: UInt64) throws -> [(sequence: UInt64, node: String)] {
        try database.pool.read { db in
            try Row.fetchAll(db, sql: """
                SELECT sequence, node_id FROM assignment a WHERE assigned_at_ms >= ?
                AND NOT EXISTS (SELECT 1 FROM assignment b WHERE b.sequence = a.sequence AND b.receipt_id IS NOT NULL)
                ORDER BY sequence, attempt
                """, arguments: [Int64(clamping: sinceMillis)])
        }.map { row in (UInt64(clamping: row["sequence"] as Int64), row["node_id"] as String) }
    }

    /// The last sequence number given out (0 before the first request).
    public func lastSequence() async throws -> UInt64 {
        let last = try await database.pool.read { db in try Int64.fetchOne(db, sql: "SELECT MAX(sequence) FROM accepted_request") ?? 0 }
        return UInt64(clamping: last)
    }

    /// Receipts in the order they were stored, from `afterPosition` (exclusive).
    public func list(afterPosition: Int64 = 0, limit: Int = 1000) async throws -> [StoredReceipt] {
        let rows = try await database.pool.read { db in
            try Row.fetchAll(db, sql: """
                SELECT position, body, node_signature, router_signature FROM receipt WHERE position > ? ORDER BY position LIMIT ?
                """, arguments: [afterPosition, limit])
        }
        return try rows.map { row in
            let body: Data = row["body"]
            let nodeSig: Data = row["node_signature"]
            let routerSig: Data = row["router_signature"]
            do {
                let receipt = try Receipt(bodyBytes: Array(body), nodeSignature: Array(nodeSig),
                                          routerSignature: Array(routerSig))
                return StoredReceipt(position: row["position"], receipt: receipt)
            } catch {
                throw StoreError.corruptRow("receipt \(row["position"] as Int64): \(error)")
            }
        }
    }
}
