import EdgeMatrixApplication
import EdgeMatrixConsensus
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNetwork
import EdgeMatrixStore
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore

/// An API error with a stable code: `{"error":{"code":"...","message":"..."}}`.
public struct ChainAPIError: Error, HTTPResponseError, Sendable {
    public var status: HTTPResponse.Status
    public var code: String
    public var message: String

    public init(_ status: HTTPResponse.Status, _ code: String, _ message: String) {
        self.status = status
        self.code = code
        self.message = message
    }

    public func response(from request: Request, context: some RequestContext) throws -> Response {
        jsonResponse(["error": ["code": code, "message": message]], status: status)
    }

    static func notFound(_ what: String) -> ChainAPIError { ChainAPIError(.notFound, "not_found", what) }
    static func badRequest(_ code: String, _ message: String) -> ChainAPIError { ChainAPIError(.badRequest, code, message) }
}

func jsonResponse(_ object: Any, status: HTTPResponse.Status = .ok) -> Response {
    let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])) ?? Data("{}".utf8)
    return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: data)))
}

/// A query parameter that must be an integer in `range` when present: anything else is a 400 naming the parameter,
/// never a silent default.
func queryInteger<T: FixedWidthInteger>(_ request: Request, _ name: String, in range: ClosedRange<T>) throws -> T? {
    guard let text = request.uri.queryParameters[name[...]] else { return nil }
    guard let value = T(String(text)), range.contains(value) else {
        throw ChainAPIError.badRequest("invalid_parameter", "\(name) must be an integer from \(range.lowerBound) to \(range.upperBound)")
    }
    return value
}

/// Converts anything thrown below into the JSON error shape.
struct ChainErrorMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch let error as ChainAPIError {
            return try error.response(from: request, context: context)
        } catch let error as HTTPError where error.status == .notFound {
            return jsonResponse(["error": ["code": "not_found", "message": "no route \(request.method) \(request.uri.path)"]], status: .notFound)
        } catch let error as HTTPError {
            return jsonResponse(["error": ["code": "bad_request", "message": "\(error)"]], status: error.status)
        } catch {
            return jsonResponse(["error": ["code": "internal", "message": "\(error)"]], status: .internalServerError)
        }
    }
}

/// The chain's HTTP JSON API. Amounts are EMC strings with 8 decimals; hashes and keys are hex; accounts are ICRC-1 text.
struct ChainAPI: Sendable {
    let node: ValidatorNode

    func makeRouter() -> Router<BasicRequestContext> {
        let router = Router()
        router.add(middleware: ChainErrorMiddleware())
        let node = node
        let view = node.view
        let store = node.store
        router.get("/health") { _, _ in jsonResponse(["status": "ok"]) }
        router.get("/metrics") { _, _ in
            Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
                     body: .init(byteBuffer: ByteBuffer(bytes: node.metricsText())))
        }
        router.get("/status") { _, _ in
            let s = view.current
            return jsonResponse([
                "chain_id": node.configuration.genesis.chainID,
                "node_id": node.key.nodeID.description,
                "node_key": node.key.publicKey.hex,
                "height": s.height,
                "latest_block_hash": s.blockHash.hex,
                "latest_block_time_ms": s.timeMillis,
                "state_root": s.stateRoot.hex,
                "validators": s.validators.count,
                "mempool_size": node.mempool.count,
                "peers_connected": node.peers.connectedCount,
                "role": node.configuration.role.rawValue,
                "total_supply": s.ledger.totalSupply.description,
                "burned": s.ledger.burned.description,
            ] as [String: Any])
        }
        router.get("/blocks") { request, _ in
            let latest = view.current.height
            let limit = try queryInteger(request, "limit", in: 1...100) ?? 20
            let from = try queryInteger(request, "from", in: 0...UInt64.max)
                ?? (latest >= UInt64(limit) ? latest - UInt64(limit) + 1 : 1)
            let blocks = try store.blocks(from: max(from, 1), limit: limit)
            return jsonResponse(["latest_height": latest, "blocks": try blocks.map { try blockJSON($0, full: false) }] as [String: Any])
        }
        router.get("/blocks/:height") { _, context in
            guard let height = context.parameters.get("height", as: UInt64.self) else {
                throw ChainAPIError.badRequest("invalid_height", "height must be a positive integer")
            }
            guard let block = try store.block(at: height) else {
                throw ChainAPIError.notFound("no block at height \(height); the latest is \(view.current.height)")
            }
            return jsonResponse(try blockJSON(block, full: true))
        }
        router.get("/txs/:hash") { _, context in
            let text = context.parameters.get("hash") ?? ""
            guard let hash = Hash32(hex: text) else {
                throw ChainAPIError.badRequest("invalid_hash", "transaction hash must be 64 hex digits")
            }
            // A failed copy of a body whose valid copy is still pending reads as pending.
            if let stored = try store.tx(hash: hash), stored.ok || !node.mempool.contains(hash) {
                var object: [String: Any] = ["hash": hash.hex, "status": stored.ok ? "committed" : "failed", "height": stored.height,
                                             "index": stored.index]
                if let error = stored.error { object["error"] = ["code": stored.errorCode ?? "error", "message": error] }
                if let block = try store.block(at: stored.height), let decoded = try? ChainBlock(canonicalBytes: block.value),
                   Int(stored.index) < decoded.transactions.count, let tx = try? Transaction(decoding: decoded.transactions[Int(stored.index)]) {
                    object["transaction"] = txJSON(tx)
                    object["block_hash"] = block.hash.hex
                }
                return jsonResponse(object)
            }
            if node.mempool.contains(hash) { return jsonResponse(["hash": hash.hex, "status": "pending"]) }
            throw ChainAPIError.notFound("transaction \(hash.hex) is neither committed nor pending")
        }
        router.post("/txs") { request, _ in
            // A full node refuses before reading the body: nothing it is sent reaches a mempool or a peer.
            if node.configuration.role == .full {
                throw ChainAPIError(.forbidden, MempoolRejection.readOnlyNode.code, MempoolRejection.readOnlyNode.message)
            }
            let limit = Mempool.maxTransactionBytes * 2 + 1024  // hex doubles the size
            let collected: ByteBuffer
            do { collected = try await request.body.collect(upTo: limit) } catch {
                throw ChainAPIError(.contentTooLarge, "too_large", "the body exceeds \(limit) bytes; a transaction is at most \(Mempool.maxTransactionBytes) bytes")
            }
            let body = Array(buffer: collected)
            // Content-Type application/x-protobuf: an edgematrix.ledger.v1.SignedTransaction (proto/edgematrix/ledger/v1).
            let bytes: [UInt8]
            if request.headers[.contentType]?.lowercased().hasPrefix("application/x-protobuf") == true {
                do { bytes = try SignedTransactionWire.envelope(protobufBytes: body) } catch {
                    throw ChainAPIError.badRequest("malformed", "\(error)")
                }
            } else { bytes = decodeTxBody(body) }
            do throws(MempoolRejection) {
                let id = try node.submit(bytes)
                return jsonResponse(["hash": id.hex, "status": "pending"], status: .accepted)
            } catch {
                throw ChainAPIError.badRequest(error.code, error.message)
            }
        }
        router.get("/accounts/:account") { _, context in
            let account = try parseAccount(context.parameters.get("account"))
            let ledger = view.current.ledger
            let balance = ledger.balance(of: account)
            return jsonResponse(["account": account.description, "balance": balance.description, "balance_base_units": balance.baseUnits,
                                 "height": ledger.height, "stakes": try encodable(ledger.stakes(ownedBy: account.owner))] as [String: Any])
        }
        router.get("/accounts/:account/balance") { _, context in
            let account = try parseAccount(context.parameters.get("account"))
            let s = view.current
            let balance = s.ledger.balance(of: account)
            return jsonResponse(["account": account.description, "balance": balance.description, "balance_base_units": balance.baseUnits,
                                 "height": s.height] as [String: Any])
        }
        router.get("/validators") { _, _ in
            let s = view.current
            let validators = s.validators.validators.map { v -> [String: Any] in
                var object: [String: Any] = ["node_id": v.id.description, "public_key": v.publicKey.hex, "voting_power": v.votingPower,
                                             "proposer_priority": v.proposerPriority]
                if let node = s.ledger.node(v.publicKey) { object["endpoints"] = node.endpoints }
                return object
            }
            return jsonResponse(["height": s.height, "total_voting_power": s.validators.totalVotingPower, "validators": validators] as [String: Any])
        }
        router.get("/stakes/:account") { _, context in
            let account = try parseAccount(context.parameters.get("account"))
            return jsonResponse(["owner": account.owner.hex, "stakes": try encodable(view.current.ledger.stakes(ownedBy: account.owner))])
        }
        router.get("/nodes") { _, _ in
            // Each record as stored, plus what a router needs to admit it: the backing stake and eligibility.
            let s = view.current
            let nodes = try s.ledger.allNodes.map { node -> Any in
                guard var object = try encodable(node) as? [String: Any] else { return try encodable(node) }
                if let stake = s.ledger.stake(id: node.stakeID) {
                    object["stake"] = stake.amount.description
                    object["stake_status"] = stake.status.rawValue
                }
                object["eligible"] = s.ledger.isEligible(node.nodeKey)
                if let height = s.ledger.routerDefaultHeight(node.nodeKey) { object["defaulted_at_height"] = height }
                return object
            }
            return jsonResponse(["height": s.height, "nodes": nodes] as [String: Any])
        }
        router.get("/params") { _, _ in
            // Every ledger parameter under its genesis JSON key, and the values derived from them.
            let s = view.current
            let parameters = s.ledger.parameters
            return jsonResponse(["height": s.height, "chain_id": s.ledger.chainID, "parameters": try encodable(parameters),
                                 "derived": ["escrow_withdraw_delay_blocks": parameters.escrowWithdrawDelayBlocks]] as [String: Any])
        }
        router.get("/escrow/:account") { _, context in
            let account = try parseAccount(context.parameters.get("account"))
            let s = view.current
            return jsonResponse(["account": account.description, "height": s.height,
                                 "escrows": s.ledger.escrows(of: account).map { escrowJSON($0, ledger: s.ledger) }] as [String: Any])
        }
        router.get("/escrows") { request, _ in
            guard let text = request.uri.queryParameters["router"], let router = try? PublicKey(hex: String(text)) else {
                throw ChainAPIError.badRequest("invalid_router", "give router=<the router's node key, 64 hex digits>")
            }
            let s = view.current
            return jsonResponse(["router": router.hex, "height": s.height, "cap": s.ledger.escrowCap(router: router).description,
                                 "held": s.ledger.escrowHeld(router: router).description,
                                 "escrows": s.ledger.escrows(withRouter: router).map { escrowJSON($0, ledger: s.ledger) }] as [String: Any])
        }
        router.get("/settlements") { request, _ in
            var routerKey: PublicKey?
            if let text = request.uri.queryParameters["router"] {
                guard let key = try? PublicKey(hex: String(text)) else {
                    throw ChainAPIError.badRequest("invalid_router", "router must be the router's node key, 64 hex digits")
                }
                routerKey = key
            }
            let s = view.current
            return jsonResponse(["height": s.height,
                                 "settlements": s.ledger.settlements(router: routerKey).map(settlementJSON)] as [String: Any])
        }
        router.get("/settlements/cursor/:router") { _, context in
            guard let text = context.parameters.get("router"), let routerKey = try? PublicKey(hex: text) else {
                throw ChainAPIError.badRequest("invalid_router", "give the router's node key, 64 hex digits")
            }
            let s = view.current
            let cursor = s.ledger.settlementCursor(router: routerKey)
            var object: [String: Any] = ["router": routerKey.hex, "height": s.height, "next_batch": cursor.nextBatch,
                                         "next_sequence": cursor.nextSequence, "defaulted": s.ledger.routerDefaultHeight(routerKey) != nil,
                                         "open_notices": s.ledger.openNoticeCount(router: routerKey)]
            if let height = s.ledger.routerDefaultHeight(routerKey) { object["defaulted_at_height"] = height }
            return jsonResponse(object)
        }
        router.get("/data-requests") { request, _ in
            // Data requests (kind 15) and omission queries (kind 17) of settlements not yet final, of one router.
            var routerKey: PublicKey?
            if let text = request.uri.queryParameters["router"] {
                guard let key = try? PublicKey(hex: String(text)) else {
                    throw ChainAPIError.badRequest("invalid_router", "router must be a node key, 64 hex digits")
                }
                routerKey = key
            }
            let s = view.current
            return jsonResponse(["height": s.height,
                                 "data_requests": s.ledger.dataRequests(router: routerKey).map(dataRequestJSON),
                                 "omission_queries": s.ledger.omissionQueries(router: routerKey).map(omissionQueryJSON)] as [String: Any])
        }
        router.get("/notices") { request, _ in
            // Receipts compute nodes noticed or settled themselves (kind 14), of one router and/or node.
            func key(_ name: String) throws -> PublicKey? {
                guard let text = request.uri.queryParameters[Substring(name)] else { return nil }
                guard let key = try? PublicKey(hex: String(text)) else {
                    throw ChainAPIError.badRequest("invalid_\(name)", "\(name) must be a node key, 64 hex digits")
                }
                return key
            }
            let routerKey = try key("router"), nodeKey = try key("node")
            let s = view.current
            return jsonResponse(["height": s.height,
                                 "defaulted_routers": s.ledger.defaultedRouters.map { ["router": $0.router.hex, "defaulted_at_height": $0.height] as [String: Any] },
                                 "notices": s.ledger.receiptNotices(router: routerKey, node: nodeKey).map(noticeJSON)] as [String: Any])
        }
        router.get("/earnings/:key") { _, context in
            // A node key gives that node's income; an owner key the income of every node it owns.
            guard let text = context.parameters.get("key"), let key = try? PublicKey(hex: text) else {
                throw ChainAPIError.badRequest("invalid_key", "give a node key or an owner key, 64 hex digits")
            }
            let s = view.current
            let nodes = s.ledger.node(key) != nil ? [key] : s.ledger.allNodes.filter { $0.owner == key }.map(\.nodeKey)
            let rows = nodes.flatMap { node in s.ledger.earnings(node: node).map { (node, $0) } }
                .sorted { $0.1.epoch != $1.1.epoch ? $0.1.epoch < $1.1.epoch : $0.0.rawRepresentation.lexicographicallyPrecedes($1.0.rawRepresentation) }
            return jsonResponse(["key": key.hex, "height": s.height, "nodes": nodes.map(\.hex),
                                 "earnings": rows.map { earningsJSON(node: $0.0, $0.1) }] as [String: Any])
        }
        router.get("/events/blocks") { _, _ in
            let stream = view.subscribe()
            let body = ResponseBody { writer in
                for await event in stream {
                    let object: [String: Any] = ["height": event.height, "hash": event.hash.hex, "time_ms": event.timeMillis,
                                                 "tx_count": event.txCount, "state_root": event.stateRoot.hex]
                    let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
                    try await writer.write(ByteBuffer(bytes: Array("event: block\ndata: ".utf8) + Array(data) + Array("\n\n".utf8)))
                }
                try await writer.finish(nil)
            }
            return Response(status: .ok, headers: [.contentType: "text/event-stream", .cacheControl: "no-cache"], body: body)
        }
        return router
    }
}

/// The body of POST /txs: hex text (optionally in a JSON `{"tx":"..."}`) or the raw wire bytes.
func decodeTxBody(_ body: [UInt8]) -> [UInt8] {
    var text = String(decoding: body, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    if text.hasPrefix("{"), let object = try? JSONSerialization.jsonObject(with: Data(body)) as? [String: Any],
       let hex = object["tx"] as? String {
        text = hex
    }
    if text.hasPrefix("0x") { text.removeFirst(2) }
    if !text.isEmpty, text.count % 2 == 0, let bytes = Hex.decode(text) { return bytes }
    return body
}

func parseAccount(_ text: String?) throws -> Account {
    guard let text, !text.isEmpty else { throw ChainAPIError.badRequest("invalid_account", "missing account") }
    let decoded = text.removingPercentEncoding ?? text
    do { return try Account(text: decoded) } catch {
        throw ChainAPIError.badRequest("invalid_account", error.description)
    }
}

func encodable<T: Encodable>(_ value: T) throws -> Any {
    let encoder = JSONEncoder()
    return try JSONSerialization.jsonObject(with: encoder.encode(value), options: [.fragmentsAllowed])
}

/// One escrow as the API shows it (amounts as EMC strings, with base units alongside).
func escrowJSON(_ e: Escrow, ledger: LedgerState) -> [String: Any] {
    ["account": e.payer.description, "router": e.router.hex, "router_id": e.router.nodeID.description,
     "balance": e.balance.description, "pending": e.pending.description, "available": e.available.description,
     "balance_base_units": e.balance.baseUnits, "pending_base_units": e.pending.baseUnits, "available_base_units": e.available.baseUnits,
     "withdrawable_at_height": e.withdrawableAtHeight.map { $0 as Any } ?? NSNull()]
}

/// One settlement as the API shows it.
func settlementJSON(_ r: SettlementRecord) -> [String: Any] {
    ["router": r.router.hex, "router_id": r.router.nodeID.description, "batch": r.batchNumber, "first_sequence": r.firstSequence,
     "last_sequence": r.lastSequence, "epoch": r.epoch, "receipt_count": r.receiptCount, "pair_count": r.pairCount,
     "total": r.total.description, "total_base_units": r.total.baseUnits, "status": r.status.rawValue, "tx": r.tx.hex,
     "commitment": r.commitment.hex, "included_height": r.includedAtHeight, "final_height": r.finalAtHeight,
     "router_fee_bps": r.routerFeeBps, "protocol_fee_bps": r.protocolFeeBps, "upheld_challenges": r.upheldChallenges,
     "reverted_base_units": r.revertedTotal]
}

/// One data request (kind 15) as the API shows it.
func dataRequestJSON(_ r: DataRequestRecord) -> [String: Any] {
    ["router": r.key.settlement.router.hex, "batch": r.key.settlement.batchNumber, "payer": r.key.pair.payer.description,
     "node": r.key.pair.node.hex, "requester": r.requester.description, "status": r.status.rawValue,
     "requested_height": r.requestedAtHeight, "due_height": r.dueAtHeight, "resolved_height": r.resolvedAtHeight,
     "leaves_posted": r.receivedLeaves, "tx": r.tx.hex]
}

/// One omission query (kind 17) as the API shows it.
func omissionQueryJSON(_ q: OmissionQueryRecord) -> [String: Any] {
    ["router": q.key.settlement.router.hex, "batch": q.key.settlement.batchNumber, "payer": q.key.leaf.payer.description,
     "node": q.key.leaf.node.hex, "sequence": q.key.leaf.sequence, "attempt": q.key.leaf.attempt,
     "requester": q.requester.description, "worth_base_units": q.worth, "status": q.status.rawValue,
     "requested_height": q.requestedAtHeight, "due_height": q.dueAtHeight, "resolved_height": q.resolvedAtHeight, "tx": q.tx.hex]
}

/// One noticed receipt (kind 14) as the API shows it.
func noticeJSON(_ n: ReceiptNotice) -> [String: Any] {
    ["router": n.router.hex, "node": n.node.hex, "node_id": n.node.nodeID.description, "payer": n.payer.description,
     "sequence": n.sequence, "attempt": n.attempt, "amount": Amount(baseUnits: n.amount).description, "amount_base_units": n.amount,
     "charged_base_units": n.charged, "status": n.status.rawValue, "noticed_height": n.noticedAtHeight, "due_height": n.dueAtHeight,
     "settled_height": n.settledAtHeight, "tx": n.tx.hex]
}

/// One node's income in one epoch (EMC strings, base units alongside).
func earningsJSON(node: PublicKey, _ e: NodeEarnings) -> [String: Any] {
    let total = e.asNode.addingReportingOverflow(e.asRouter)
    return ["epoch": e.epoch, "node": node.hex, "node_id": node.nodeID.description,
            "node_income": Amount(baseUnits: e.asNode).description, "router_income": Amount(baseUnits: e.asRouter).description,
            "held": Amount(baseUnits: e.held).description, "total": Amount(baseUnits: total.overflow ? .max : total.partialValue).description,
            "node_income_base_units": e.asNode, "router_income_base_units": e.asRouter, "held_base_units": e.held, "receipts": e.receipts]
}

func txJSON(_ tx: Transaction) -> [String: Any] {
    var object: [String: Any] = ["hash": tx.id.hex, "signer": tx.signer.hex, "from": Account(owner: tx.signer).description,
                                 "created_at_ms": tx.body.createdAtMillis, "kind": tx.body.kind.name]
    if case .transfer(let transfer) = tx.body.kind {
        var from = Account(owner: tx.signer)
        if let sub = transfer.fromSubaccount { from = Account(owner: tx.signer, subaccount: sub) }
        object["from"] = from.description
        object["to"] = transfer.to.description
        object["amount"] = transfer.amount.description
        if let fee = transfer.fee { object["fee"] = fee.description }
        if let memo = transfer.memo { object["memo_hex"] = Hex.encode(memo) }
    }
    switch tx.body.kind {
    case .escrowOpen(let o):
        object["from"] = Account(owner: tx.signer, subaccount: o.fromSubaccount).description
        object["router"] = o.router.hex
        object["amount"] = o.amount.description
    case .escrowWithdraw(let w):
        object["from"] = Account(owner: tx.signer, subaccount: w.subaccount).description
        object["router"] = w.router.hex
    case .setPrices(let p):
        object["node_key"] = p.nodeKey.hex
        object["prices"] = (try? encodable(p.prices)) ?? []
    case .setRouterFee(let f):
        object["node_key"] = f.nodeKey.hex
        object["router_fee_bps"] = f.feeBps
    case .settle(let batch):
        object["router"] = batch.router.hex
        object["batch"] = batch.batchNumber
        object["first_sequence"] = batch.firstSequence
        object["last_sequence"] = batch.lastSequence
        object["pair_count"] = batch.entries.count
        object["receipt_count"] = batch.receiptCount
        object["total"] = Amount(baseUnits: batch.total).description
    case .challengeSettlement(let c):
        object["router"] = c.router.hex
        object["batch"] = c.batchNumber
        object["claim"] = c.claim.name
    case .nodeSettle(let n):
        object["router"] = n.router.hex
        object["node_key"] = n.node.hex
        object["receipt_count"] = n.receipts.count
    case .dataRequest(let r):
        object["router"] = r.router.hex
        object["batch"] = r.batchNumber
        object["payer"] = r.payer.description
        object["node_key"] = r.node.hex
    case .dataResponse(let r):
        object["router"] = r.router.hex
        object["batch"] = r.batchNumber
        object["payer"] = r.payer.description
        object["node_key"] = r.node.hex
        object["first_index"] = r.firstIndex
        object["leaf_count"] = r.leaves.count
    case .omissionQuery(let q):
        object["router"] = q.router.hex
        object["batch"] = q.batchNumber
    case .omissionAnswer(let a):
        object["router"] = a.router.hex
        object["batch"] = a.batchNumber
    default:
        break
    }
    return object
}

func blockJSON(_ block: StoredBlock, full: Bool) throws -> [String: Any] {
    var object: [String: Any] = ["height": block.height, "hash": block.hash.hex, "time_ms": block.timeMillis,
                                 "tx_count": block.txCount, "state_root": block.stateRoot.hex]
    if let decoded = try? ChainBlock(canonicalBytes: block.value) {
        object["proposer"] = decoded.proposer.description
        object["evidence_count"] = decoded.evidence.count
        if full {
            object["transactions"] = decoded.transactions.map { raw -> Any in
                (try? Transaction(decoding: raw)).map(txJSON) ?? ["raw_hex": Hex.encode(raw)]
            }
        }
    }
    if full, let certificate = try? CommitCertificate(canonicalBytes: block.certificate) {
        object["certificate"] = ["round": certificate.round, "signatures": certificate.signatures.count,
                                 "signers": certificate.signatures.map { $0.validator.description }] as [String: Any]
    }
    return object
}
