import AsyncHTTPClient
import EdgeMatrixChain
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNode
import EdgeMatrixRouter
import EdgeMatrixStore
import Foundation
import Logging
import Testing

extension Integration {
    /// The router's settlement submitter against a real validator: batches closed from a real router store, sent as
    /// `settle` transactions, and reconciled with the chain's cursor after a crash.
    @Suite("Router settlement against a validator", .serialized)
    struct SettlementSubmitterTests {
        let prices = UnitPrices(perMillionPromptTokens: 1_000_000, perMillionCompletionTokens: 100_000_000, perItem: 0)

        // Catches: a batch never sent or sent with the wrong signer, number or range (refused by the ledger), inclusion
        // not lowering payer_unsettled, and a restarted submitter that re-sends a batch already on chain or cannot
        // resume one it stored but never sent.
        @Test("closes, settles and marks included; a stored but unsent batch is sent by a fresh submitter; one already on chain is marked included")
        func settlesAndResumes() async throws {
            let chain = try await CLITests.startChain()
            do { try await scenario(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        // Catches: batches that stop closing while the chain is unreachable (one huge batch later, past the escrow
        // withdrawal delay), or that close on every tick instead of once per epoch's worth of wall time.
        @Test("with the chain unreachable, a batch still closes once an epoch's worth of wall time has passed, and only then")
        func closesWhileChainAway() async throws {
            let router = SigningKey(), node = SigningKey()
            let payer = Account(owner: SigningKey().publicKey)
            let database = try RouterDatabase(path: Harness.temporaryDirectory("settle-offline") + "/router.sqlite")
            let inFlight = InFlightSequences()
            let receipts = ReceiptStore(database: database, holds: inFlight)
            let settlements = SettlementStore(database: database)
            try await serve(receipts, inFlight: inFlight, router: router, node: node, payer: payer, count: 2)
            // Batch 0 was closed (and included) 5 s ago, in epoch 7; an epoch lasts 2 blocks ≈ 2 s.
            let zero = try #require(try await SettlementBatcher.close(store: settlements, router: router.publicKey, batchNumber: 0,
                                                                      firstSequence: 1, upperBound: 1, epoch: 7))
            _ = zero
            try await settlements.markIncluded(batch: 0)
            let old = try #require(try await settlements.batch(0))
            #expect(old.createdAtMillis <= wallClockMillis())
            // Nothing listens on port 1; fail at once instead of retrying the connection until the request times out.
            var configuration = HTTPClient.Configuration()
            configuration.connectionPool.retryConnectionEstablishment = false
            let http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
            defer { Task { try? await http.shutdown() } }
            let submitter = SettlementSubmitter(client: ChainClient(baseURL: "http://127.0.0.1:1", http: http), routerKey: router,
                                                store: settlements, inFlight: inFlight, logger: Logger(label: "test.settle"))
            var view = SettlementSubmitter.ChainView()
            view.epochLength = 2
            view.chainID = "offline"
            await submitter.tick(&view)
            #expect(!view.reachable)
            // Batch 0 is younger than an epoch's worth of wall time: nothing yet.
            #expect(try await settlements.lastBatch()?.batch == 0)
            try await Task.sleep(for: .milliseconds(2_100))
            await submitter.tick(&view)
            let one = try #require(try await settlements.lastBatch())
            #expect(one.batch == 1 && one.firstSequence == 2 && one.lastSequence == 2 && one.closedEpoch == 8 && one.status == .built)
            // Closed just now: the next tick closes nothing, even with a new request.
            try await serve(receipts, inFlight: inFlight, router: router, node: node, payer: payer, count: 1)
            await submitter.tick(&view)
            #expect(try await settlements.lastBatch()?.batch == 1)
        }

        func serve(_ receipts: ReceiptStore, inFlight: InFlightSequences, router: SigningKey, node: SigningKey, payer: Account,
                   count: Int) async throws {
            for i in 0..<count {
                let sequence = try await receipts.accept(keyHash: Hash32.of([1]), payer: payer)
                try await receipts.recordAssignment(Assignment(sequence: sequence, attempt: 0, nodeID: node.nodeID, app: "llm", model: "m",
                                                               requestHash: Hash32.of([2]), requestBytes: 100, payer: payer, prices: prices))
                let body = ReceiptBody(payer: payer, router: router.publicKey, node: node.publicKey, sequence: sequence, attempt: 0,
                                       app: "llm", model: "m", prices: prices, units: WorkUnits(promptTokens: 5, completionTokens: UInt64(10 + i)),
                                       startedAtMillis: 1, endedAtMillis: 2, requestHash: Hash32.of([2]), responseHash: Hash32.of([3]), status: 200)
                var receipt = Receipt(signing: body, with: node)
                try receipt.countersign(nodeKey: node.publicKey, routerKey: router)
                #expect(try await receipts.append(receipt) == .stored)
                inFlight.release(sequence)
            }
        }

        func scenario(_ chain: InProcessChain) async throws {
            let client = ChainClient(baseURL: chain.url())
            let funded = try chain.funded
            let router = SigningKey(), node = SigningKey()
            let enrollment = NodeEnrollment(client: client, owner: funded)
            let routerStake = LedgerParameters.standard.staking.router, computeStake = LedgerParameters.standard.staking.compute
            try await enrollment.enroll(node: router, role: .router, stake: routerStake.minimumStake, lockDays: routerStake.minimumLockDays,
                                        endpoints: ["127.0.0.1:9"])
            try await enrollment.enroll(node: node, role: .compute, stake: computeStake.minimumStake, lockDays: computeStake.minimumLockDays,
                                        endpoints: [])
            _ = try await enrollment.ensureEscrow(router: router.publicKey, amount: Amount(emc: 10))
            let payer = Account(owner: funded.publicKey)

            let database = try RouterDatabase(path: Harness.temporaryDirectory("settle-router") + "/router.sqlite")
            let inFlight = InFlightSequences()
            let receipts = ReceiptStore(database: database, holds: inFlight)
            let settlements = SettlementStore(database: database)
            try await serve(receipts, inFlight: inFlight, router: router, node: node, payer: payer, count: 5)
            let owed = try await receipts.unsettled(payer: payer)
            #expect(owed > 0)

            // First tick: nothing stored, so batch 0 from the chain's cursor (sequence 1), closed, sent, included.
            let submitter = SettlementSubmitter(client: client, routerKey: router, store: settlements, inFlight: inFlight,
                                                logger: Logger(label: "test.settle"))
            var view = SettlementSubmitter.ChainView()
            await submitter.tick(&view)
            let first = try #require(try await settlements.batch(0))
            #expect(first.status == .included && first.firstSequence == 1 && first.lastSequence == 5 && first.txID != nil)
            var cursor = try await client.settlementCursor(router: router.publicKey)
            #expect(cursor.nextBatch == 1 && cursor.nextSequence == 6)
            #expect(try await receipts.unsettled(payer: payer) == 0)
            let onChain = try await client.settlements(router: router.publicKey)
            #expect(onChain.count == 1 && (onChain.first?["total_base_units"] as? NSNumber)?.stringValue == String(owed), "\(onChain)")
            #expect((onChain.first?["receipt_count"] as? NSNumber)?.intValue == 5 && onChain.first?["status"] as? String == "pending", "\(onChain)")

            // The payer asks on chain for its pair's leaves (kind 15): the submitter posts them on its next tick, so an
            // honest router is not slashed at the request's deadline. Catches: a router that never answers data requests.
            let request = Transaction(signing: TransactionBody(chainID: try await client.chainID(), createdAtMillis: wallClockMillis(),
                                                               kind: .dataRequest(DataRequest(router: router.publicKey, batchNumber: 0,
                                                                                              payer: payer, node: node.publicKey))),
                                      with: funded)
            let requested = try await client.waitForCommit(hash: try await client.submit(request))
            #expect(requested["status"] as? String == "committed", "\(requested)")
            #expect(try await client.dataRequests(router: router.publicKey).dataRequests.first?["status"] as? String == "open")
            await submitter.tick(&view)
            let answered = try await client.dataRequests(router: router.publicKey).dataRequests
            #expect(answered.count == 1 && answered.first?["status"] as? String == DataRequestStatus.answered.rawValue
                        && (answered.first?["leaves_posted"] as? NSNumber)?.intValue == 5, "\(answered)")

            // A crash after storing batch 1 and before sending it: a fresh submitter sends it.
            try await serve(receipts, inFlight: inFlight, router: router, node: node, payer: payer, count: 3)
            let epoch = try #require(view.epoch)
            _ = try #require(try await SettlementBatcher.close(store: settlements, router: router.publicKey, batchNumber: 1, firstSequence: 6,
                                                               upperBound: 8, epoch: epoch))
            #expect(try await settlements.batch(1)?.status != .included)
            var freshView = SettlementSubmitter.ChainView()
            await SettlementSubmitter(client: client, routerKey: router, store: settlements, inFlight: inFlight,
                                      logger: Logger(label: "test.settle")).tick(&freshView)
            #expect(try await settlements.batch(1)?.status == .included)
            cursor = try await client.settlementCursor(router: router.publicKey)
            #expect(cursor.nextBatch == 2 && cursor.nextSequence == 9)
            #expect(try await receipts.unsettled(payer: payer) == 0)

            // A batch on chain that the store still holds as submitted (crash before markIncluded): sent by hand here,
            // then a fresh submitter finds it on chain and marks it included without sending it again.
            try await serve(receipts, inFlight: inFlight, router: router, node: node, payer: payer, count: 2)
            let third = try #require(try await SettlementBatcher.close(store: settlements, router: router.publicKey, batchNumber: 2,
                                                                       firstSequence: 9, upperBound: 10, epoch: epoch + 1_000_000))
            let tx = Transaction(signing: TransactionBody(chainID: try await client.chainID(), createdAtMillis: wallClockMillis(),
                                                          kind: .settle(third.batch)), with: router)
            let result = try await client.waitForCommit(hash: try await client.submit(tx))
            #expect(result["status"] as? String == "committed", "\(result)")
            try await settlements.markSubmitted(batch: 2, txID: tx.id.hex)
            var lastView = SettlementSubmitter.ChainView()
            await SettlementSubmitter(client: client, routerKey: router, store: settlements, inFlight: inFlight,
                                      logger: Logger(label: "test.settle")).tick(&lastView)
            #expect(try await settlements.batch(2)?.status == .included)
            #expect(try await settlements.batch(2)?.txID == tx.id.hex)
            #expect(try await client.settlements(router: router.publicKey).count == 3)
            #expect(try await receipts.unsettled(payer: payer) == 0)
        }
    }
}
