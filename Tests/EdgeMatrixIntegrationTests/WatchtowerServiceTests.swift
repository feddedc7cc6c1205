import EdgeMatrixChain
import EdgeMatrixCompute
import EdgeMatrixCore
import EdgeMatrixLedger
@testable import EdgeMatrixNode
import Foundation
import Hummingbird
import Logging
import NIOCore
import Synchronization
import Testing

/// A router's data-availability API as a faulty router serves it: the batches it settled, with their leaves and proofs
/// (the same JSON as `SettlementDataRoutes`).
final class StubSettlementRouter: Sendable {
    let port = Harness.freePort()
    let batches = Mutex<[UInt64: (SettlementBatch, [SettlementPair: [SettlementLeafWitness]])]>([:])
    private let task = Mutex<Task<Void, any Error>?>(nil)

    var url: String { "http://127.0.0.1:\(port)" }

    func serve(_ batch: SettlementBatch, leaves: [SettlementLeaf]) throws {
        var served = [SettlementPair: [SettlementLeafWitness]]()
        for pair in Set(leaves.map(\.key.pair)) {
            let pairLeaves = leaves.filter { $0.key.pair == pair }.sorted { $0.key < $1.key }
            let tree = try SettlementBatchBuilder.pairTree(leaves: pairLeaves)
            served[pair] = try pairLeaves.indices.map { try SettlementLeafWitness(tree: tree, leaves: pairLeaves, index: $0) }
        }
        batches.withLock { $0[batch.batchNumber] = (batch, served) }
    }

    static func json(_ object: [String: Any], status: HTTPResponse.Status = .ok) -> Response {
        Response(status: status, body: .init(byteBuffer: ByteBuffer(bytes: (try? JSONSerialization.data(withJSONObject: object)) ?? Data())))
    }

    func start() {
        let router = Router()
        router.get("v1/settlements/:batch") { [self] _, context -> Response in
            guard let number = context.parameters.get("batch").flatMap(UInt64.init),
                  let (batch, _) = batches.withLock({ $0[number] }) else { return Self.json([:], status: .notFound) }
            return Self.json(["batch": number, "first_sequence": batch.firstSequence, "last_sequence": batch.lastSequence,
                              "entries": batch.entries.map { e -> [String: Any] in
                                  ["payer": e.payer.description, "node": e.node.hex, "amount": String(e.amount), "count": e.count,
                                   "pair_root": e.pairRoot.hex]
                              }])
        }
        router.get("v1/settlements/:batch/receipts") { [self] request, context -> Response in
            guard let number = context.parameters.get("batch").flatMap(UInt64.init), let (_, served) = batches.withLock({ $0[number] }),
                  let payer = request.uri.queryParameters.get("payer").flatMap({ try? Account(text: $0) }),
                  let node = request.uri.queryParameters.get("node").flatMap({ try? PublicKey(hex: $0) }),
                  let witnesses = served[SettlementPair(payer: payer, node: node)] else { return Self.json([:], status: .notFound) }
            return Self.json(["receipts": witnesses.map { w -> [String: Any] in
                ["receipt": Hex.encode(w.receiptBytes), "amount": String(w.amount), "proof": Hex.encode(w.proof.canonicalBytes)]
            }])
        }
        let app = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: port)))
        task.withLock { $0 = Task { try await app.runService() } }
    }

    func stop() { task.withLock { $0?.cancel() } }
}

extension Integration {
    /// The compute node's watchtower (`WatchtowerService`) against a real in-process chain and a router that drops a
    /// receipt from its batch.
    @Suite("Compute node watchtower", .serialized)
    struct WatchtowerServiceTests {
        // Catches: a watchtower that does not notice an omitted receipt, files evidence the ledger dismisses (bond
        // burned), needs a person to file, files against a clean batch, or files the same claim twice; and a ledger
        // that does not make the node's owner whole or does not slash the router.
        @Test("the node's own watchtower files an omission challenge that the chain upholds (owner paid, router slashed); a clean batch gets none")
        func filesOmission() async throws {
            let chain = try InProcessChain(validators: 1, running: 1)
            let stub = StubSettlementRouter()
            stub.start()
            do { try await run(chain, stub) } catch {
                stub.stop()
                await chain.stop()
                throw error
            }
            stub.stop()
            await chain.stop()
        }

        func commit(_ client: ChainClient, _ tx: Transaction) async throws {
            let result = try await client.waitForCommit(hash: try await client.submit(tx))
            #expect(result["status"] as? String == "committed", "\(result)")
        }

        func balance(_ client: ChainClient, _ key: PublicKey) async throws -> UInt64 {
            try #require((try await client.get("/accounts/\(Account(owner: key).description)/balance")["balance_base_units"] as? NSNumber)?.uint64Value)
        }

        func run(_ chain: InProcessChain, _ stub: StubSettlementRouter) async throws {
            let client = ChainClient(baseURL: chain.url())
            try await Harness.eventually(timeout: .seconds(20), "the validator commits") {
                (try await Harness.request(.GET, chain.url() + "/status", timeout: .seconds(1)).json?["height"] as? Int ?? 0) >= 1
            }
            let chainID = try await client.chainID()
            let funded = try chain.funded
            let router = SigningKey(), node = SigningKey(), nodeOwner = SigningKey()
            // The node's owner is not the router's (so it may be made whole); the node key posts the challenge bond.
            try await commit(client, transfer(funded, to: Account(owner: nodeOwner.publicKey), amount: Amount(emc: 1_000), chainID: chainID))
            try await commit(client, transfer(funded, to: Account(owner: node.publicKey), amount: Amount(emc: 100), chainID: chainID))
            let routerStake = LedgerParameters.standard.staking.router, computeStake = LedgerParameters.standard.staking.compute
            // The router publishes its HTTP address after its tunnel address (PROTOCOL.md § 12).
            try await NodeEnrollment(client: client, owner: funded).enroll(
                node: router, role: .router, stake: routerStake.minimumStake, lockDays: routerStake.minimumLockDays,
                endpoints: ["127.0.0.1:9", stub.url])
            let nodeEnrollment = NodeEnrollment(client: client, owner: nodeOwner)
            try await nodeEnrollment.enroll(node: node, role: .compute, stake: computeStake.minimumStake, lockDays: computeStake.minimumLockDays,
                                            endpoints: [])
            try await nodeEnrollment.ensurePrices(node: node.publicKey, prices: PriceList(entries: [
                PriceEntry(name: "*", perMillionPromptTokens: Amount(baseUnits: 1_000_000), perMillionCompletionTokens: Amount(baseUnits: 100_000_000)),
            ]))
            _ = try await NodeEnrollment(client: client, owner: funded).ensureEscrow(router: router.publicKey, amount: Amount(emc: 10))
            let payer = Account(owner: funded.publicKey)

            // The node's outbox, as the tunnel leaves it: receipts acknowledged with the router's countersignature.
            let outbox = try ReceiptOutbox(path: Harness.temporaryDirectory("watchtower-outbox") + "/outbox.sqlite")
            let prices = UnitPrices(perMillionPromptTokens: 1_000_000, perMillionCompletionTokens: 100_000_000, perItem: 0)
            func keep(_ sequence: UInt64) async throws -> SettlementLeaf {
                let body = ReceiptBody(payer: payer, router: router.publicKey, node: node.publicKey, sequence: sequence, attempt: 0,
                                       app: "llm", model: "m", prices: prices, units: WorkUnits(promptTokens: 5, completionTokens: 10 * sequence),
                                       startedAtMillis: 1, endedAtMillis: 2, requestHash: Hash32.of(Array("\(sequence)".utf8)),
                                       responseHash: Hash32.of([3]), status: 200)
                let signed = Receipt(signing: body, with: node)
                var countersigned = signed
                try countersigned.countersign(nodeKey: node.publicKey, routerKey: router)
                await outbox.add(signed)
                #expect(await outbox.acknowledge(signed.id, routerSignature: try #require(countersigned.routerSignature)) != nil)
                return SettlementLeaf(key: SettlementLeafKey(payer: payer, node: node.publicKey, sequence: sequence, attempt: 0),
                                      receiptBytes: try #require(countersigned.settlementBytes), amount: try #require(body.cost))
            }
            var leaves = [SettlementLeaf]()
            for sequence: UInt64 in 1...4 { leaves.append(try await keep(sequence)) }
            let omitted = leaves.remove(at: 2)  // the router drops request 3

            // Batch 0 leaves request 3 out; the router serves exactly what it settled.
            let faulty = try SettlementBatchBuilder.build(router: router.publicKey, batchNumber: 0, sequenceRange: 1...4, leaves: leaves)
            try stub.serve(faulty, leaves: leaves)
            let ownerBefore = try await balance(client, nodeOwner.publicKey)
            let stakeBefore = try await routerStakeAmount(client, owner: funded.publicKey)
            try await commit(client, Transaction(signing: TransactionBody(chainID: chainID, createdAtMillis: wallClockMillis(), kind: .settle(faulty)),
                                                 with: router))

            // The watchtower runs on its own, as the node runs it.
            let watchtower = WatchtowerService(client: client, nodeKey: node, outbox: outbox, routers: [router.publicKey],
                                               logger: Logger(label: "test.watchtower"), interval: .milliseconds(200))
            let running = Task { try await watchtower.run() }
            defer { running.cancel() }
            try await Harness.eventually(timeout: .seconds(30), "the watchtower's challenge is upheld") {
                let batch = try await client.settlements(router: router.publicKey).first { ($0["batch"] as? NSNumber)?.uint64Value == 0 }
                return (batch?["upheld_challenges"] as? NSNumber)?.intValue == 1
            }
            running.cancel()
            let settlement = try #require(try await client.settlements(router: router.publicKey).first)
            #expect(settlement["status"] as? String == "challenged")
            #expect(try await balance(client, nodeOwner.publicKey) == ownerBefore + omitted.amount, "the node's owner is paid what was omitted")
            #expect(try await routerStakeAmount(client, owner: funded.publicKey) < stakeBefore, "the router is slashed")

            // Batch 1 is clean: a fresh watchtower (a restart) files nothing against it, and its claim on batch 0 is
            // refused as already used rather than paid twice.
            var clean = [SettlementLeaf]()
            for sequence: UInt64 in 5...6 { clean.append(try await keep(sequence)) }
            let honest = try SettlementBatchBuilder.build(router: router.publicKey, batchNumber: 1, sequenceRange: 5...6, leaves: clean)
            try stub.serve(honest, leaves: clean)
            try await commit(client, Transaction(signing: TransactionBody(chainID: chainID, createdAtMillis: wallClockMillis(), kind: .settle(honest)),
                                                 with: router))
            var state = WatchtowerService.State()
            await watchtower.tick(&state)
            #expect(state.checked.contains(SettlementKey(router: router.publicKey, batchNumber: 1)))
            #expect(state.outcomes.count <= 1 && state.outcomes.allSatisfy { $0.hasPrefix("omission:") && $0 != "omission:committed" },
                    "\(state.outcomes)")
            let second = try #require(try await client.settlements(router: router.publicKey).first { ($0["batch"] as? NSNumber)?.uint64Value == 1 })
            #expect((second["upheld_challenges"] as? NSNumber)?.intValue == 0)
            #expect(try await balance(client, nodeOwner.publicKey) == ownerBefore + omitted.amount, "nothing is paid twice")
        }

        func routerStakeAmount(_ client: ChainClient, owner: PublicKey) async throws -> UInt64 {
            let stakes = try await client.stakes(ownedBy: owner)
            return stakes.filter { $0["role"] as? String == "router" }.compactMap { s -> UInt64? in
                (s["amount_base_units"] as? NSNumber)?.uint64Value ?? (s["amount"] as? String).flatMap { try? Amount(parsing: $0).baseUnits }
            }.reduce(0, +)
        }
    }
}
