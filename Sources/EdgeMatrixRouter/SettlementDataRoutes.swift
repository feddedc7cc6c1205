import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixStore
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import Synchronization

/// Data availability for the router's settlement batches: anyone may read a batch's entries and, page by page, the
/// receipts of one (payer, node) pair with their proofs against the pair's entry, to check or challenge it
/// (docs/PROTOCOL.md § 12). Public: whoever can name a pair can read its receipts.
///
/// - `GET /v1/settlements/{batch}`: the batch's header and entries.
/// - `GET /v1/settlements/{batch}/receipts?payer=ACCOUNT&node=HEX&offset=0&limit=100`: the pair's leaves.
///
/// Errors are `{"error": {"code", "message"}}` with 400 (a malformed parameter) or 404 (no such batch or pair).
public struct SettlementDataRoutes: Sendable {
    public static let defaultLimit = 100
    public static let maxLimit = 1000

    let store: SettlementStore
    let router: PublicKey
    let logger: Logger
    /// The last pair tree built, so that paging through one pair does not rebuild it for every page. A stored batch's
    /// range takes no new receipts, so a tree stays valid.
    private let lastTree = PairTreeCache()

    public init(store: SettlementStore, router: PublicKey, logger: Logger) {
        self.store = store
        self.router = router
        self.logger = logger
    }

    struct Failure: Error {
        var status: HTTPResponse.Status
        var code: String
        var message: String
    }

    public func register<Context: RequestContext>(on routes: Router<Context>) {
        routes.get("v1/settlements/:batch") { _, context in
            await answer { try await batchAnswer(batchText: context.parameters.get("batch")) }
        }
        routes.get("v1/settlements/:batch/receipts") { request, context in
            await answer {
                try await receiptsAnswer(batchText: context.parameters.get("batch"), query: { request.uri.queryParameters.get($0) })
            }
        }
    }

    /// Runs a handler; any failure becomes a JSON error (never a trap, never a 500 with internals).
    func answer(_ handler: () async throws -> [String: Any]) async -> Response {
        do {
            return Self.json(.ok, try await handler())
        } catch let failure as Failure {
            return Self.json(failure.status, ["error": ["code": failure.code, "message": failure.message]])
        } catch {
            logger.error("settlement data unavailable", metadata: ["error": "\(error)"])
            return Self.json(.internalServerError, ["error": ["code": "store_unavailable", "message": "The router's store could not be read."]])
        }
    }

    static func json(_ status: HTTPResponse.Status, _ object: [String: Any]) -> Response {
        let body = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data(#"{"error":{"code":"internal"}}"#.utf8)
        return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: body)))
    }

    /// The stored batch and its decoded payload.
    func load(batchText: String?) async throws -> (StoredSettlementBatch, SettlementBatch) {
        guard let batchText, let number = UInt64(batchText) else {
            throw Failure(status: .badRequest, code: "invalid_batch",
                          message: "The batch number must be a decimal integer from 0 to \(UInt64.max).")
        }
        guard let stored = try await store.batch(number) else {
            throw Failure(status: .notFound, code: "unknown_batch", message: "This router has no settlement batch \(number).")
        }
        do {
            return (stored, try SettlementBatch(canonicalBytes: stored.encoded))
        } catch {
            logger.error("stored settlement batch does not decode", metadata: ["batch": "\(number)", "error": "\(error)"])
            throw Failure(status: .internalServerError, code: "corrupt_batch", message: "Batch \(number) could not be read.")
        }
    }

    static func entryJSON(_ entry: SettlementPairEntry) -> [String: Any] {
        ["payer": entry.payer.description, "node": entry.node.hex, "amount": String(entry.amount), "count": entry.count,
         "pair_root": entry.pairRoot.hex]
    }

    func batchAnswer(batchText: String?) async throws -> [String: Any] {
        let (stored, batch) = try await load(batchText: batchText)
        return [
            "batch": stored.batch, "router": router.hex, "first_sequence": batch.firstSequence, "last_sequence": batch.lastSequence,
            "closed_epoch": stored.closedEpoch, "status": stored.status.rawValue, "tx": stored.txID.map { $0 as Any } ?? NSNull(),
            "receipt_count": batch.receiptCount, "total": String(batch.total), "root": batch.root.hash.hex,
            "commitment": batch.commitment.hex, "entries": batch.entries.map(Self.entryJSON),
        ]
    }

    func receiptsAnswer(batchText: String?, query: (String) -> String?) async throws -> [String: Any] {
        // Parameters first: a malformed request costs no store read.
        guard let payerText = query("payer") else { throw Failure(status: .badRequest, code: "missing_payer", message: "Name the payer account: ?payer=ACCOUNT.") }
        let payer: Account
        do { payer = try Account(text: payerText) } catch {
            throw Failure(status: .badRequest, code: "invalid_payer", message: "'payer' is not an account: \(error)")
        }
        guard let nodeText = query("node") else { throw Failure(status: .badRequest, code: "missing_node", message: "Name the compute node: ?node=HEX.") }
        guard let node = try? PublicKey(hex: nodeText) else {
            throw Failure(status: .badRequest, code: "invalid_node", message: "'node' must be a node public key of 64 hex digits.")
        }
        var offset = 0
        if let text = query("offset") {
            guard let value = Int(text), value >= 0 else {
                throw Failure(status: .badRequest, code: "invalid_offset", message: "'offset' must be a non-negative integer.")
            }
            offset = value
        }
        var limit = Self.defaultLimit
        if let text = query("limit") {
            guard let value = Int(text), value >= 1 else {
                throw Failure(status: .badRequest, code: "invalid_limit", message: "'limit' must be an integer from 1 to \(Self.maxLimit).")
            }
            limit = min(value, Self.maxLimit)
        }
        let (stored, batch) = try await load(batchText: batchText)
        guard let index = batch.entryIndex(for: SettlementPair(payer: payer, node: node)) else {
            throw Failure(status: .notFound, code: "unknown_pair", message: "Batch \(stored.batch) has no entry for this payer and node.")
        }
        let entry = batch.entries[index]
        guard UInt64(offset) < entry.count else {
            throw Failure(status: .badRequest, code: "offset_out_of_range", message: "'offset' must be below the pair's \(entry.count) receipts.")
        }
        let leaves: [SettlementLeaf], tree: MerkleSumTree
        if let cached = lastTree.get(batch: stored.batch, entry: entry) {
            (leaves, tree) = cached
        } else {
            leaves = try await SettlementBatcher.pairLeaves(store: store, batch: stored, router: router, payer: payer, node: node)
            do { tree = try SettlementBatchBuilder.pairTree(leaves: leaves) } catch {
                logger.error("settlement pair tree cannot be rebuilt", metadata: ["batch": "\(stored.batch)", "error": "\(error)"])
                throw Failure(status: .internalServerError, code: "pair_unavailable", message: "The pair's receipts could not be read.")
            }
        }
        guard UInt64(leaves.count) == entry.count, tree.root == entry.pairRootNode else {
            logger.error("stored receipts do not rebuild the batch's pair entry", metadata: ["batch": "\(stored.batch)", "pair": "\(entry.pair)"])
            throw Failure(status: .internalServerError, code: "pair_unavailable", message: "The pair's receipts could not be read.")
        }
        lastTree.set(batch: stored.batch, entry: entry, leaves: leaves, tree: tree)
        let end = min(leaves.count, offset + limit)
        var receipts: [[String: Any]] = []
        receipts.reserveCapacity(end - offset)
        for position in offset..<end {
            let witness: SettlementLeafWitness
            do { witness = try SettlementLeafWitness(tree: tree, leaves: leaves, index: position) } catch {
                throw Failure(status: .internalServerError, code: "pair_unavailable", message: "A proof could not be built.")
            }
            receipts.append(["index": position, "receipt": Hex.encode(witness.receiptBytes), "amount": String(witness.amount),
                             "proof": Hex.encode(witness.proof.canonicalBytes)])
        }
        return [
            "batch": stored.batch, "entry": Self.entryJSON(entry), "leaf_count": leaves.count, "receipts": receipts,
            "next_offset": end < leaves.count ? end as Any : NSNull() as Any,
        ]
    }
}

/// One pair tree, named by its batch and entry.
final class PairTreeCache: Sendable {
    private let value = Mutex<(batch: UInt64, entry: SettlementPairEntry, leaves: [SettlementLeaf], tree: MerkleSumTree)?>(nil)

    func get(batch: UInt64, entry: SettlementPairEntry) -> ([SettlementLeaf], MerkleSumTree)? {
        value.withLock { cached in
            guard let cached, cached.batch == batch, cached.entry == entry else { return nil }
            return (cached.leaves, cached.tree)
        }
    }

    func set(batch: UInt64, entry: SettlementPairEntry, leaves: [SettlementLeaf], tree: MerkleSumTree) {
        value.withLock { $0 = (batch, entry, leaves, tree) }
    }
}
