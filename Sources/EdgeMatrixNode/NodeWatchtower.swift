import AsyncHTTPClient
import EdgeMatrixChain
import EdgeMatrixCompute
import EdgeMatrixCore
import EdgeMatrixLedger
import Foundation
import Logging
import Metrics
import ServiceLifecycle

/// The compute node's watchtower (docs/SETTLEMENT.md § 13): it follows the chain and, for each router it serves,
/// checks every batch still open to challenge (`pending` or `challenged`) whose sequence range covers receipts it kept,
/// with `WatchtowerAudit` over the leaves the router's data-availability API serves; it files a kind-13 challenge,
/// signed by the node key (which posts `challenge_bond`), for each finding the ledger can judge.
///
/// The router's HTTP address is the first `http://` or `https://` endpoint of its registration (PROTOCOL.md § 12),
/// or `routerURLs`. Without one the watchtower can still prove an omission from chain data alone only when it knows
/// the batch's entries, which the chain's API does not list: it logs that it cannot check and tries again later.
///
/// Remembered in memory: batches checked and claims filed. After a restart the open batches are checked again; a claim
/// the ledger already upheld is refused as `evidence_already_used` (no bond is taken for a refused transaction).
public struct WatchtowerService: Service {
    let client: ChainClient
    let nodeKey: SigningKey
    let outbox: ReceiptOutbox
    let routers: [PublicKey]
    let routerURLs: [PublicKey: String]
    let http: HTTPClient
    let logger: Logger
    let interval: Duration

    private let filedCounter = Counter(label: "emc_compute_watchtower_challenges_total")

    public init(client: ChainClient, nodeKey: SigningKey, outbox: ReceiptOutbox, routers: [PublicKey], routerURLs: [PublicKey: String] = [:],
                http: HTTPClient = .shared, logger: Logger, interval: Duration = .seconds(2)) {
        self.client = client
        self.nodeKey = nodeKey
        self.outbox = outbox
        var unique = [PublicKey]()
        for router in routers where !unique.contains(router) { unique.append(router) }
        self.routers = unique
        self.routerURLs = routerURLs
        self.http = http
        self.logger = logger
        self.interval = interval
    }

    public struct State: Sendable {
        var chainID: String?
        /// Batches checked to the end (every pair's leaves served); not checked again.
        public internal(set) var checked: Set<SettlementKey> = []
        /// Claims filed (their canonical bytes' hash), so none is filed twice.
        public internal(set) var filed: Set<Hash32> = []
        /// What each filed claim came to, as `claim:outcome` (`committed`, or the refusal code).
        public internal(set) var outcomes: [String] = []
        var warned: Set<String> = []
        var errorsInARow = 0

        public init() {}
    }

    public func run() async throws {
        await cancelWhenGracefulShutdown {
            var state = State()
            while !Task.isCancelled {
                await tick(&state)
                try? await Task.sleep(for: interval)
            }
        }
    }

    public func tick(_ state: inout State) async {
        do {
            if state.chainID == nil { state.chainID = try await client.chainID() }
            for router in routers { try await round(router: router, state: &state) }
            state.errorsInARow = 0
        } catch is CancellationError {
        } catch {
            state.errorsInARow += 1
            if state.errorsInARow == 1 || state.errorsInARow % 60 == 0 {
                logger.warning("watchtower: cannot check the chain's settlements", metadata: ["error": "\(error)", "chain": "\(client.baseURL)"])
            }
        }
    }

    /// The router's HTTP address: configured, or the first http(s) endpoint of its registration.
    func routerURL(_ router: PublicKey) async throws -> String? {
        if let url = routerURLs[router] { return url }
        for node in try await client.nodes() where node["node_key"] as? String == router.hex {
            return (node["endpoints"] as? [String])?.first { $0.hasPrefix("http://") || $0.hasPrefix("https://") }
        }
        return nil
    }

    func warnOnce(_ key: String, _ message: Logger.Message, _ metadata: Logger.Metadata, state: inout State) {
        guard state.warned.insert(key).inserted else { return }
        logger.warning(message, metadata: metadata)
    }

    func round(router: PublicKey, state: inout State) async throws {
        guard let chainID = state.chainID else { return }
        for settlement in try await client.settlements(router: router) {
            guard let status = settlement["status"] as? String, status == "pending" || status == "challenged",
                  let number = (settlement["batch"] as? NSNumber)?.uint64Value,
                  let first = (settlement["first_sequence"] as? NSNumber)?.uint64Value,
                  let last = (settlement["last_sequence"] as? NSNumber)?.uint64Value, first <= last else { continue }
            let key = SettlementKey(router: router, batchNumber: number)
            guard !state.checked.contains(key) else { continue }
            let kept = try await outbox.countersigned(router: router.nodeID, afterSequence: max(first, 1) - 1, limit: 100_000)
                .filter { $0.body.sequence <= last && $0.body.node == nodeKey.publicKey && $0.body.router == router }
            guard kept.contains(where: { ($0.body.cost ?? 0) > 0 }) else { state.checked.insert(key); continue }
            guard let url = try await routerURL(router) else {
                warnOnce("url/\(router.hex)", "watchtower: the router publishes no HTTP endpoint; its batches cannot be checked",
                         ["router": "\(router.nodeID.short)"], state: &state)
                continue
            }
            let data = SettlementDataClient(routerURL: url, http: http)
            let batch: SettlementBatch
            do { batch = try await data.servedBatch(number, router: router) } catch {
                warnOnce("batch/\(router.hex)/\(number)", "watchtower: the router does not serve a batch it settled",
                         ["router": "\(router.nodeID.short)", "batch": "\(number)", "error": "\(error)"], state: &state)
                continue
            }
            guard batch.commitment.hex == settlement["commitment"] as? String else {
                warnOnce("commitment/\(router.hex)/\(number)", "watchtower: the router serves another batch than the chain holds",
                         ["router": "\(router.nodeID.short)", "batch": "\(number)"], state: &state)
                continue
            }
            var served = [SettlementPair: [SettlementLeafWitness]]()
            for entry in batch.entries where entry.node == nodeKey.publicKey {
                served[entry.pair] = try? await data.leaves(batch: number, payer: entry.payer, node: nodeKey.publicKey)
            }
            let findings = WatchtowerAudit.audit(batch: batch, node: nodeKey.publicKey, served: served, kept: kept)
            var complete = true
            for finding in findings {
                guard let claim = finding.claim else {
                    complete = false
                    warnOnce("finding/\(router.hex)/\(number)/\(finding)", "watchtower: a finding the ledger cannot judge",
                             ["router": "\(router.nodeID.short)", "batch": "\(number)", "finding": "\(finding)"], state: &state)
                    continue
                }
                try await file(SettlementChallenge(router: router, batchNumber: number, claim: claim), finding: finding,
                               chainID: chainID, state: &state)
            }
            if complete { state.checked.insert(key) }
        }
    }

    func file(_ challenge: SettlementChallenge, finding: WatchtowerAudit.Finding, chainID: String, state: inout State) async throws {
        let id = Hash32.of(challenge.settlement.keyBytes + challenge.claim.canonicalBytes)
        guard !state.filed.contains(id) else { return }
        let tx = Transaction(signing: TransactionBody(chainID: chainID, createdAtMillis: wallClockMillis(), kind: .challengeSettlement(challenge)),
                             with: nodeKey)
        let metadata: Logger.Metadata = ["router": "\(challenge.router.nodeID.short)", "batch": "\(challenge.batchNumber)",
                                         "claim": "\(challenge.claim.name)", "finding": "\(finding)"]
        let result: [String: Any]
        do {
            result = try await client.waitForCommit(hash: try await client.submit(tx))
        } catch let error as ChainClientError {
            state.filed.insert(id)
            state.outcomes.append("\(challenge.claim.name):\(error.code)")
            logger.warning("watchtower: the chain refused a challenge", metadata: metadata.merging(["error": "\(error)"]) { $1 })
            return
        }
        state.filed.insert(id)
        filedCounter.increment()
        // Committed: judged (upheld, or dismissed with the bond burned; the settlement's `upheld_challenges` says which).
        let outcome = result["status"] as? String == "committed"
            ? "committed" : (((result["error"] as? [String: Any])?["code"] as? String) ?? "failed")
        state.outcomes.append("\(challenge.claim.name):\(outcome)")
        logger.notice("watchtower: filed a challenge", metadata: metadata.merging(["outcome": "\(outcome)"]) { $1 })
    }
}
