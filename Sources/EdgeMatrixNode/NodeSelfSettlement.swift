import EdgeMatrixChain
import EdgeMatrixCompute
import EdgeMatrixCore
import EdgeMatrixLedger
import Foundation
import Logging
import Metrics
import ServiceLifecycle

/// A compute node's guard against a router that does not settle (docs/SETTLEMENT.md § 10): it follows the chain and,
/// for each router it serves, notices on chain (`node_settle`, kind 14) the router-countersigned receipts it kept
/// whose sequence numbers the router's batches have not covered `graceBlocks` after the node first saw them unsettled.
/// If the router's batches still do not cover them within `settlement_deadline_blocks`, the ledger defaults the router
/// and pays the node from the payers' escrows; after that, receipts are noticed (and settled) without waiting.
///
/// Idempotent: what the chain already holds (`GET /notices?router=&node=`) is never sent again, and a receipt the
/// ledger refuses is logged and set aside, not retried for ever.
public struct ReceiptNoticeService: Service {
    let client: ChainClient
    let nodeKey: SigningKey
    let outbox: ReceiptOutbox
    let routers: [PublicKey]
    let logger: Logger
    let interval: Duration
    /// Blocks a receipt stays unsettled (from when this node first saw it so) before it is noticed; nil:
    /// `defaultGraceBlocks`.
    let graceBlocks: UInt64?

    /// The default grace: two epochs (an honest router settles every epoch), and at least 3,600 blocks (an hour of
    /// one-second blocks), because a router's batch may wait up to an hour for a request still in flight.
    public static func defaultGraceBlocks(epochLengthBlocks: UInt64) -> UInt64 {
        max(epochLengthBlocks.multipliedReportingOverflow(by: 2).overflow ? .max : epochLengthBlocks * 2, 3_600)
    }

    private let noticed = Counter(label: "emc_compute_receipts_noticed_total")
    private let refused = Counter(label: "emc_compute_receipt_notices_refused_total")

    public init(client: ChainClient, nodeKey: SigningKey, outbox: ReceiptOutbox, routers: [PublicKey], logger: Logger,
                interval: Duration = .seconds(2), graceBlocks: UInt64? = nil) {
        self.client = client
        self.nodeKey = nodeKey
        self.outbox = outbox
        var unique = [PublicKey]()
        for router in routers where !unique.contains(router) { unique.append(router) }
        self.routers = unique
        self.logger = logger
        self.interval = interval
        self.graceBlocks = graceBlocks
    }

    /// What the service remembers between rounds (in memory: after a restart the chain's notices are read again).
    public struct State: Sendable {
        var chainID: String?
        var grace: UInt64?
        /// Per receipt key `router/sequence/attempt`: the height at which this node first saw it unsettled.
        /// Bounded: only receipts at or after a router's cursor stay (and the outbox keeps a bounded number).
        var firstSeen: [String: UInt64] = [:]
        /// Receipts on chain already (noticed or settled by this node) or refused for good.
        var done: Set<String> = []
        var refusalsInARow = 0
        /// Routers whose notices on chain were read since the start.
        var synced: Set<PublicKey> = []
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

    static func key(_ body: ReceiptBody) -> String { "\(body.router.hex)/\(body.sequence)/\(body.attempt)" }

    /// One round over every router.
    public func tick(_ state: inout State) async {
        do {
            let status = try await client.status()
            guard let height = (status["height"] as? NSNumber)?.uint64Value else { return }
            if state.chainID == nil { state.chainID = status["chain_id"] as? String }
            if state.grace == nil {
                let parameters = try await client.parameters()
                let epoch = (parameters["epoch_length_blocks"] as? NSNumber)?.uint64Value ?? 900
                state.grace = graceBlocks ?? Self.defaultGraceBlocks(epochLengthBlocks: epoch)
            }
            for router in routers { try await round(router: router, height: height, state: &state) }
            state.errorsInARow = 0
        } catch is CancellationError {
        } catch {
            state.errorsInARow += 1
            if state.errorsInARow == 1 || state.errorsInARow % 60 == 0 {
                logger.warning("cannot check the chain for unsettled receipts", metadata: ["error": "\(error)", "chain": "\(client.baseURL)"])
            }
        }
    }

    func round(router: PublicKey, height: UInt64, state: inout State) async throws {
        guard let chainID = state.chainID, let grace = state.grace else { return }
        if !state.synced.contains(router) {
            for notice in try await client.notices(router: router, node: nodeKey.publicKey) {
                if let sequence = (notice["sequence"] as? NSNumber)?.uint64Value, let attempt = (notice["attempt"] as? NSNumber)?.uint32Value {
                    state.done.insert("\(router.hex)/\(sequence)/\(attempt)")
                }
            }
            state.synced.insert(router)
        }
        let cursor = try await client.settlementCursor(router: router)
        let defaulted = try await client.routerDefaultHeight(router: router) != nil
        let kept = try await outbox.countersigned(router: router.nodeID, afterSequence: max(cursor.nextSequence, 1) - 1, limit: 10_000)
        // Due: this node's, worth something, not done, unsettled for the grace period (or the router has defaulted).
        // What the router's batches have covered since is forgotten (it can never be due again).
        let prefix = router.hex + "/"
        let live = Set(kept.map { Self.key($0.body) })
        for key in state.firstSeen.keys where key.hasPrefix(prefix) && !live.contains(key) { state.firstSeen[key] = nil }
        state.done = state.done.filter { !$0.hasPrefix(prefix) || live.contains($0) }
        var due = [Receipt]()
        for receipt in kept where receipt.body.node == nodeKey.publicKey && receipt.body.router == router {
            let key = Self.key(receipt.body)
            guard !state.done.contains(key), let cost = receipt.body.cost, cost > 0 else { continue }
            let seen = state.firstSeen[key] ?? height
            state.firstSeen[key] = seen
            if defaulted || height >= seen.addingReportingOverflow(grace).partialValue { due.append(receipt) }
        }
        guard !due.isEmpty else { return }
        // One transaction per payer (a payer without escrow refuses only its own), at most 64 receipts each.
        let byPayer = Dictionary(grouping: due, by: { $0.body.payer }).sorted { $0.key < $1.key }
        for (_, receipts) in byPayer {
            for start in stride(from: 0, to: receipts.count, by: NodeSettlement.maxReceipts) {
                let chunk = Array(receipts[start..<min(start + NodeSettlement.maxReceipts, receipts.count)])
                try await submit(chunk, router: router, chainID: chainID, defaulted: defaulted, state: &state)
            }
        }
    }

    func submit(_ chunk: [Receipt], router: PublicKey, chainID: String, defaulted: Bool, state: inout State) async throws {
        let settle = try NodeSettlement(router: router, node: nodeKey.publicKey, receipts: chunk.compactMap(\.settlementBytes))
        let tx = Transaction(signing: TransactionBody(chainID: chainID, createdAtMillis: wallClockMillis(), kind: .nodeSettle(settle)),
                             with: nodeKey)
        let result: [String: Any]
        do {
            result = try await client.waitForCommit(hash: try await client.submit(tx))
        } catch let error as ChainClientError where error.code == "receipt_refused" {
            setAside(chunk, code: error.code, message: error.message, state: &state)
            return
        }
        guard result["status"] as? String == "committed" else {
            let error = result["error"] as? [String: Any]
            setAside(chunk, code: error?["code"] as? String ?? "failed", message: error?["message"] as? String ?? "", state: &state)
            return
        }
        for receipt in chunk { state.done.insert(Self.key(receipt.body)) }
        state.refusalsInARow = 0
        noticed.increment(by: chunk.count)
        logger.info(defaulted ? "settled own receipts of a defaulted router" : "noticed receipts the router has not settled", metadata: [
            "router": "\(router.nodeID.short)", "receipts": "\(chunk.count)",
            "sequences": "\(chunk.first!.body.sequence)...\(chunk.last!.body.sequence)",
        ])
    }

    /// A refused receipt (`receipt N refused (code): …`) is set aside for good; the rest are tried again next round.
    /// Any other refusal (the fee, the open-notice limit) waits for the next round.
    func setAside(_ chunk: [Receipt], code: String, message: String, state: inout State) {
        refused.increment()
        state.refusalsInARow += 1
        if state.refusalsInARow == 1 || state.refusalsInARow % 30 == 0 {
            logger.warning("the chain refused a notice of receipts", metadata: [
                "code": "\(code)", "message": "\(message.prefix(300))", "refusals": "\(state.refusalsInARow)",
            ])
        }
        guard code == "receipt_refused", let index = Self.refusedIndex(message), chunk.indices.contains(index) else { return }
        state.done.insert(Self.key(chunk[index].body))
    }

    static func refusedIndex(_ message: String) -> Int? {
        guard let range = message.range(of: "receipt ") else { return nil }
        return Int(message[range.upperBound...].prefix { $0.isNumber })
    }
}
