import AsyncHTTPClient
import EdgeMatrixChain
import EdgeMatrixCore
import EdgeMatrixLedger
import Foundation
import NIOCore

/// A payer's check of what a router settled against its account (`emc audit`): for every batch of the router on
/// chain, the batch the router serves must be the one the chain holds (same commitment), and each of the account's
/// leaves must be a receipt signed by its node and countersigned by the router, for this account, worth what it
/// charges, and (given the client's own log of `x-emc-request-id`s) for a request the client actually made.
///
/// Everything the router serves is untrusted: answers are size-bounded and malformed data is a finding, never a
/// crash.
public struct PayerAudit: Sendable {
    /// One thing wrong in a batch, with a stable code.
    public struct Finding: Sendable, Equatable {
        /// `not_in_client_log`: a leaf for a request id the client never received (evidence to publish);
        /// `bad_receipt`: it does not decode or its signatures do not verify; `wrong_payer` / `wrong_router`;
        /// `amount_mismatch`: the leaf charges other than units × the receipt's prices; `bad_proof`: the leaf is not in
        /// the entry; `commitment_mismatch`: the router serves another batch than the chain holds;
        /// `data_unavailable`: the router does not serve the batch or the account's leaves.
        public var code: String
        public var sequence: UInt64?
        public var message: String
    }

    /// The verdict on one batch.
    public struct BatchVerdict: Sendable {
        public var batch: UInt64
        public var status: String
        public var leaves: Int
        /// What the batch charges this account, in base units.
        public var charged: UInt64
        public var findings: [Finding]
        public var ok: Bool { findings.isEmpty }

        public var json: [String: Any] {
            ["batch": batch, "status": status, "leaves": leaves, "charged": Amount(baseUnits: charged).description,
             "charged_base_units": charged, "verdict": ok ? "ok" : "fault",
             "findings": findings.map { f -> [String: Any] in
                 ["code": f.code, "sequence": f.sequence.map { $0 as Any } ?? NSNull(), "message": f.message]
             }]
        }
    }

    public let chain: ChainClient
    public let routerURL: String
    public let account: Account
    let data: SettlementDataClient

    /// `routerURL` is the router's HTTP address, with or without the `/v1` suffix of its OpenAI base URL.
    public init(chain: ChainClient, routerURL: String, account: Account, http: HTTPClient = .shared) {
        data = SettlementDataClient(routerURL: routerURL, http: http)
        self.routerURL = data.routerURL
        self.chain = chain
        self.account = account
    }

    /// Request ids from a client log: one per line, either a bare integer or a JSON object with `id`,
    /// `request_id` or `x-emc-request-id` (a number or a decimal string). Blank lines are skipped; anything else is
    /// an error naming the line.
    public static func requestIDs(inLog text: String) throws -> Set<UInt64> {
        var ids = Set<UInt64>()
        for (index, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty { continue }
            if let id = UInt64(line) { ids.insert(id); continue }
            let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
            let value = object.flatMap { o in ["id", "request_id", "x-emc-request-id"].lazy.compactMap { o[$0] }.first }
            if let text = value as? String, let id = UInt64(text) { ids.insert(id); continue }
            if let number = value as? NSNumber, let id = UInt64(number.stringValue) { ids.insert(id); continue }
            throw PayerAuditError.badLog(line: index + 1)
        }
        return ids
    }

    /// Audits every batch of the router on chain; `clientLog` (request ids the client received) adds the
    /// `not_in_client_log` check.
    public func run(clientLog: Set<UInt64>?) async throws -> [BatchVerdict] {
        let routerInfo = try await get("/v1/router")
        guard let keyHex = routerInfo["router_key"] as? String, let router = try? PublicKey(hex: keyHex) else {
            throw PayerAuditError.notARouter(routerURL)
        }
        var verdicts: [BatchVerdict] = []
        for settlement in try await chain.settlements(router: router) {
            guard let batch = (settlement["batch"] as? NSNumber)?.uint64Value else { continue }
            verdicts.append(await audit(batch: batch, settlement: settlement, router: router, clientLog: clientLog))
        }
        return verdicts
    }

    func audit(batch number: UInt64, settlement: [String: Any], router: PublicKey, clientLog: Set<UInt64>?) async -> BatchVerdict {
        var verdict = BatchVerdict(batch: number, status: settlement["status"] as? String ?? "?", leaves: 0, charged: 0, findings: [])
        func finding(_ code: String, _ sequence: UInt64? = nil, _ message: String) {
            verdict.findings.append(Finding(code: code, sequence: sequence, message: message))
        }
        let batch: SettlementBatch
        do {
            batch = try await servedBatch(number, router: router)
        } catch {
            finding("data_unavailable", nil, "the router does not serve batch \(number): \(error)")
            return verdict
        }
        guard batch.commitment.hex == settlement["commitment"] as? String else {
            finding("commitment_mismatch", nil, "the batch the router serves is not the one on chain")
            return verdict
        }
        for entry in batch.entries where entry.payer == account {
            verdict.charged = verdict.charged.addingReportingOverflow(entry.amount).partialValue
            let witnesses: [SettlementLeafWitness]
            do { witnesses = try await leaves(batch: number, node: entry.node) } catch {
                finding("data_unavailable", nil, "the router does not serve the leaves of node \(entry.node.nodeID): \(error)")
                continue
            }
            if UInt64(witnesses.count) != entry.count {
                finding("data_unavailable", nil, "node \(entry.node.nodeID): \(witnesses.count) leaves served, the entry counts \(entry.count)")
            }
            for witness in witnesses {
                verdict.leaves += 1
                let (receipt, problems) = SettlementLeafCheck.check(witness, entry: entry, router: router)
                for p in problems { finding(p.code, p.sequence, p.message) }
                guard let body = receipt?.body else { continue }
                if let clientLog, !clientLog.contains(body.sequence) {
                    finding("not_in_client_log", body.sequence, "request \(body.sequence) is not in the client's log: the client never received it")
                }
            }
        }
        return verdict
    }

    /// The batch the router serves, rebuilt from its entries (so its commitment can be compared with the chain's).
    func servedBatch(_ number: UInt64, router: PublicKey) async throws -> SettlementBatch {
        try await data.servedBatch(number, router: router)
    }

    /// Every leaf of this account's pair with `node`, page by page.
    func leaves(batch: UInt64, node: PublicKey) async throws -> [SettlementLeafWitness] {
        try await data.leaves(batch: batch, payer: account, node: node)
    }

    func get(_ path: String) async throws -> [String: Any] { try await data.get(path) }
}

public enum PayerAuditError: Error, CustomStringConvertible {
    case badLog(line: Int)
    case notARouter(String)
    case malformed(String)
    case http(path: String, status: Int)

    public var description: String {
        switch self {
        case .badLog(let line): "client log line \(line) is neither a request id nor a JSON object with `id`"
        case .notARouter(let url): "\(url) did not answer GET /v1/router with its router key; is it an EdgeMatrix router?"
        case .malformed(let what): "the router served a malformed \(what)"
        case .http(let path, let status): "GET \(path) answered HTTP \(status)"
        }
    }
}
