import AsyncHTTPClient
import EdgeMatrixCore
import EdgeMatrixLedger
import Foundation
import NIOCore

/// A router's data-availability API (`GET /v1/settlements/{batch}` and `…/receipts?payer=&node=`, docs/PROTOCOL.md
/// § 12), as the payer's audit and the compute node's watchtower read it. Everything the router serves is untrusted:
/// answers are size-bounded and anything malformed is an error, never a crash.
public struct SettlementDataClient: Sendable {
    /// The most bytes read from one router answer.
    static let maxAnswerBytes = 16 << 20
    /// The most leaves read for one pair (a page is at most 1,000).
    static let maxLeavesPerPair = 1 << 22

    public let routerURL: String
    let http: HTTPClient

    /// `routerURL` is the router's HTTP address, with or without the `/v1` suffix of its OpenAI base URL.
    public init(routerURL: String, http: HTTPClient = .shared) {
        var url = routerURL.hasPrefix("http") ? routerURL : "http://" + routerURL
        while url.hasSuffix("/") { url.removeLast() }
        if url.hasSuffix("/v1") { url.removeLast(3) }
        self.routerURL = url
        self.http = http
    }

    /// The batch the router serves, rebuilt from its entries (so its commitment can be compared with the chain's).
    public func servedBatch(_ number: UInt64, router: PublicKey) async throws -> SettlementBatch {
        let served = try await get("/v1/settlements/\(number)")
        guard let first = (served["first_sequence"] as? NSNumber)?.uint64Value, let last = (served["last_sequence"] as? NSNumber)?.uint64Value,
              let rawEntries = served["entries"] as? [[String: Any]], rawEntries.count <= SettlementBatch.maxEntries else {
            throw PayerAuditError.malformed("GET /v1/settlements/\(number)")
        }
        let entries = try rawEntries.map { e -> SettlementPairEntry in
            guard let payerText = e["payer"] as? String, let payer = try? Account(text: payerText),
                  let nodeHex = e["node"] as? String, let node = try? PublicKey(hex: nodeHex),
                  let amount = (e["amount"] as? String).flatMap({ UInt64($0) }), let count = (e["count"] as? NSNumber)?.uint64Value,
                  let root = (e["pair_root"] as? String).flatMap({ Hash32(hex: $0) })
            else { throw PayerAuditError.malformed("an entry of batch \(number)") }
            return SettlementPairEntry(payer: payer, node: node, amount: amount, count: count, pairRoot: root)
        }
        return try SettlementBatch(router: router, batchNumber: number, firstSequence: first, lastSequence: last, entries: entries)
    }

    /// Every leaf of one (payer, node) pair, page by page.
    public func leaves(batch: UInt64, payer: Account, node: PublicKey) async throws -> [SettlementLeafWitness] {
        var witnesses: [SettlementLeafWitness] = []
        var offset = 0
        while witnesses.count < Self.maxLeavesPerPair {
            let page = try await get("/v1/settlements/\(batch)/receipts?payer=\(payer.description)&node=\(node.hex)&offset=\(offset)&limit=1000")
            guard let items = page["receipts"] as? [[String: Any]] else { throw PayerAuditError.malformed("a receipts page of batch \(batch)") }
            for item in items {
                guard let receipt = (item["receipt"] as? String).flatMap({ Hex.decode($0) }),
                      let amount = (item["amount"] as? String).flatMap({ UInt64($0) }),
                      let proofBytes = (item["proof"] as? String).flatMap({ Hex.decode($0) }),
                      let proof = try? MerkleSumProof(canonicalBytes: proofBytes)
                else { throw PayerAuditError.malformed("a leaf of batch \(batch)") }
                witnesses.append(SettlementLeafWitness(receiptBytes: receipt, amount: amount, proof: proof))
            }
            guard let next = (page["next_offset"] as? NSNumber)?.intValue, next > offset else { return witnesses }
            offset = next
        }
        return witnesses
    }

    public func get(_ path: String) async throws -> [String: Any] {
        var request = HTTPClientRequest(url: routerURL + path)
        request.method = .GET
        let response = try await http.execute(request, timeout: .seconds(30))
        let body = try await response.body.collect(upTo: Self.maxAnswerBytes)
        guard response.status == .ok, let object = try? JSONSerialization.jsonObject(with: Data(buffer: body)) as? [String: Any] else {
            throw PayerAuditError.http(path: String(path.prefix(80)), status: Int(response.status.code))
        }
        return object
    }
}

/// One finding of an audit, with a stable code (see `PayerAudit.Finding` and `WatchtowerAudit.Finding`).
public struct SettlementLeafProblem: Sendable, Equatable {
    /// `bad_receipt`: the leaf does not decode or its signatures do not verify; `bad_proof`: the leaf is not in its
    /// entry; `wrong_payer` / `wrong_router`: the receipt names another; `amount_mismatch`: the leaf charges other than
    /// units × the receipt's prices.
    public var code: String
    public var sequence: UInt64?
    public var message: String
}

/// The check of one served leaf that the payer's audit and the node's watchtower share: the leaf is proven in its
/// entry, is a receipt signed by the entry's node and countersigned by the router, for the entry's payer, and is
/// committed for exactly units × the receipt's prices.
public enum SettlementLeafCheck {
    /// The decoded receipt (nil if the bytes are not one) and what is wrong with the leaf, in a fixed order.
    public static func check(_ witness: SettlementLeafWitness, entry: SettlementPairEntry, router: PublicKey) -> (Receipt?, [SettlementLeafProblem]) {
        var problems = [SettlementLeafProblem]()
        let receipt: Receipt
        do { receipt = try Receipt(settlementBytes: witness.receiptBytes) } catch {
            return (nil, [SettlementLeafProblem(code: "bad_receipt", sequence: nil, message: "a leaf of node \(entry.node.nodeID) is not a receipt: \(error)")])
        }
        let body = receipt.body
        do { try witness.verify(in: entry) } catch {
            problems.append(.init(code: "bad_proof", sequence: body.sequence, message: "request \(body.sequence)'s leaf is not in its entry: \(error)"))
        }
        do { try receipt.verify(nodeKey: entry.node, routerKey: router) } catch {
            problems.append(.init(code: "bad_receipt", sequence: body.sequence, message: "request \(body.sequence): \(error)"))
        }
        if body.payer != entry.payer {
            problems.append(.init(code: "wrong_payer", sequence: body.sequence, message: "request \(body.sequence) names payer \(body.payer)"))
        }
        if body.router != router {
            problems.append(.init(code: "wrong_router", sequence: body.sequence, message: "request \(body.sequence) names router \(body.routerID)"))
        }
        if body.cost != witness.amount {
            problems.append(.init(code: "amount_mismatch", sequence: body.sequence,
                                  message: "request \(body.sequence) charges \(witness.amount) base units; its units × prices are \(body.cost.map(String.init) ?? "over 2^64")"))
        }
        return (receipt, problems)
    }
}
