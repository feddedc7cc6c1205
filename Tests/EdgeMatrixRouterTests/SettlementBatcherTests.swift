import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixRouter
import EdgeMatrixStore
import Foundation
import Hummingbird
import HummingbirdTesting
import Testing

/// The router's settlement batches, built from real countersigned receipts in a real SQLite file: their entries,
/// the proofs the router serves, what inclusion takes off the payers' unsettled totals, and the guards that keep
/// every stored receipt inside exactly one batch.
@Suite("Settlement batcher")
struct SettlementBatcherTests {
    let router = SigningKey()
    let nodes = [SigningKey(), SigningKey()]
    let payers = [Account(owner: SigningKey().publicKey), Account(owner: SigningKey().publicKey),
                  Account(owner: SigningKey().publicKey, subaccount: Subaccount(index: 7))]
    // 1 base unit per prompt token, 100 per completion token.
    let prices = UnitPrices(perMillionPromptTokens: 1_000_000, perMillionCompletionTokens: 100_000_000, perItem: 0)
    let requestHash = Hash32.of([1])

    /// A router store on a fresh SQLite file, holding accepted numbers in `inFlight`.
    struct Fixture {
        let database: RouterDatabase
        let receipts: ReceiptStore
        let settlements: SettlementStore
        let inFlight: InFlightSequences
    }

    func fixture(directory: String = NSTemporaryDirectory() + "emc-settle-\(UUID().uuidString)") throws -> Fixture {
        let database = try RouterDatabase(path: directory + "/router.sqlite")
        let inFlight = InFlightSequences()
        return Fixture(database: database, receipts: ReceiptStore(database: database, holds: inFlight),
                       settlements: SettlementStore(database: database), inFlight: inFlight)
    }

    func receipt(_ sequence: UInt64, attempt: UInt32 = 0, payer: Account, node: SigningKey, completion: UInt64) -> Receipt {
        let body = ReceiptBody(payer: payer, router: router.publicKey, node: node.publicKey, sequence: sequence, attempt: attempt,
                               app: "llm", model: "m", prices: prices, units: WorkUnits(promptTokens: 3, completionTokens: completion),
                               startedAtMillis: 1, endedAtMillis: 2, requestHash: requestHash, responseHash: Hash32.of([2]), status: 200)
        var receipt = Receipt(signing: body, with: node)
        try? receipt.countersign(nodeKey: node.publicKey, routerKey: router)
        return receipt
    }

    /// Accepts one request for `payer` and stores the countersigned receipts of `attempts` nodes for it (as the tunnel
    /// does: assignment first, receipt checked against it). Releases the store's in-flight hold (the request is over).
    @discardableResult
    func serve(_ f: Fixture, payer: Account, attempts: [(node: SigningKey, completion: UInt64)], release: Bool = true) async throws -> (UInt64, [Receipt]) {
        let sequence = try await f.receipts.accept(keyHash: Hash32.of([9]), payer: payer)
        var stored: [Receipt] = []
        for (index, attempt) in attempts.enumerated() {
            try await f.receipts.recordAssignment(Assignment(
                sequence: sequence, attempt: UInt32(index), nodeID: attempt.node.nodeID, app: "llm", model: "m",
                requestHash: requestHash, requestBytes: 100, payer: payer, prices: prices))
            let r = receipt(sequence, attempt: UInt32(index), payer: payer, node: attempt.node, completion: attempt.completion)
            #expect(try await f.receipts.append(r) == .stored)
            stored.append(r)
        }
        if release { f.inFlight.release(sequence) }
        return (sequence, stored)
    }

    /// Serves a mix: three payers, two nodes, some requests failed over to the second node, one served for the
    /// router's own account (never settled). Returns the receipts that must be settled.
    @discardableResult
    func serveMix(_ f: Fixture, requests: Int = 24) async throws -> [Receipt] {
        var settled: [Receipt] = []
        for i in 0..<requests {
            let payer = payers[i % payers.count]
            var attempts: [(node: SigningKey, completion: UInt64)] = [(nodes[i % 2], UInt64(1 + i))]
            if i % 5 == 0 { attempts.append((nodes[(i + 1) % 2], UInt64(2 * i))) }
            settled += try await serve(f, payer: payer, attempts: attempts).1
        }
        // An operator key's request: billed to the router's own account, which has no escrow with itself.
        try await serve(f, payer: Account(owner: router.publicKey), attempts: [(nodes[0], 50)])
        return settled
    }

    /// The sums per (payer, node) computed from the receipts alone, with the documented cost formula.
    static func expectedEntries(_ receipts: [Receipt]) -> [SettlementPair: (amount: UInt64, count: UInt64)] {
        var sums: [SettlementPair: (amount: UInt64, count: UInt64)] = [:]
        for r in receipts {
            let b = r.body
            let cost = (b.units.promptTokens * b.prices.perMillionPromptTokens + b.units.completionTokens * b.prices.perMillionCompletionTokens)
                / 1_000_000 + b.units.items * b.prices.perItem
            let pair = SettlementPair(payer: b.payer, node: b.node)
            let before = sums[pair] ?? (0, 0)
            sums[pair] = (before.amount + cost, before.count + 1)
        }
        return sums
    }

    // Bug caught: entries that do not add up to the receipts (a receipt dropped, counted twice, or the router's own
    // account settled against an escrow it does not have).
    @Test("a batch's entries are exactly the per-pair sums of the stored receipts in its range")
    func entriesMatchReceipts() async throws {
        let f = try fixture()
        let receipts = try await serveMix(f)
        let last = try await f.settlements.lastAcceptedSequence()
        let closed = try #require(try await SettlementBatcher.close(store: f.settlements, router: router.publicKey, batchNumber: 0,
                                                                    firstSequence: 1, upperBound: f.inFlight.batchUpperBound(lastAccepted: last),
                                                                    epoch: 3))
        #expect(closed.batch.firstSequence == 1 && closed.batch.lastSequence == last)
        let expected = Self.expectedEntries(receipts)
        #expect(closed.batch.entries.count == expected.count)
        for entry in closed.batch.entries {
            let want = try #require(expected[entry.pair])
            #expect(entry.amount == want.amount && entry.count == want.count, "\(entry.pair)")
        }
        #expect(closed.batch.entries.map(\.pair) == expected.keys.sorted())
        #expect(closed.batch.receiptCount == UInt64(receipts.count))
        // What it takes from each payer is what that payer's receipts cost.
        for payer in payers {
            #expect(closed.payerTotals[payer] == expected.filter { $0.key.payer == payer }.values.reduce(0) { $0 + $1.amount })
        }
        #expect(closed.payerTotals[Account(owner: router.publicKey)] == nil)
        // Stored as built, and the stored bytes decode to the same batch.
        let stored = try #require(try await f.settlements.lastBatch())
        #expect(stored.status == .built && stored.batch == 0 && stored.closedEpoch == 3)
        #expect(try SettlementBatch(canonicalBytes: stored.encoded) == closed.batch)
    }

    // Bug caught: the data-availability route serving proofs that do not verify against the committed entry, or
    // pages that skip or repeat leaves (a watchtower could then neither check nor challenge the batch).
    @Test("every receipt the route serves verifies against its batch entry, and the pages cover the pair exactly")
    func servedProofsVerify() async throws {
        let f = try fixture()
        let receipts = try await serveMix(f)
        let last = try await f.settlements.lastAcceptedSequence()
        let closed = try #require(try await SettlementBatcher.close(store: f.settlements, router: router.publicKey, batchNumber: 0,
                                                                    firstSequence: 1, upperBound: last, epoch: 0))
        let app = Self.app(f, router: router.publicKey)
        let batch = closed.batch
        try await app.test(.router) { client in
            for entry in batch.entries {
                var offset: Int? = 0
                var served: [Receipt] = []
                while let from = offset {
                    let page = try await Self.get(client, "/v1/settlements/0/receipts?payer=\(entry.payer.description)&node=\(entry.node.hex)&offset=\(from)&limit=3")
                    #expect(page.status == 200)
                    let object = page.object
                    #expect(object["leaf_count"] as? Int == Int(entry.count))
                    for (k, item) in (object["receipts"] as? [[String: Any]] ?? []).enumerated() {
                        let bytes = try #require(Hex.decode(item["receipt"] as? String ?? ""))
                        let proof = try MerkleSumProof(canonicalBytes: try #require(Hex.decode(item["proof"] as? String ?? "")))
                        let amount = try #require(UInt64(item["amount"] as? String ?? ""))
                        #expect(item["index"] as? Int == from + k)
                        try SettlementLeafWitness(receiptBytes: bytes, amount: amount, proof: proof).verify(in: entry)
                        served.append(try Receipt(settlementBytes: bytes))
                    }
                    offset = object["next_offset"] as? Int
                }
                let want = receipts.filter { $0.body.payer == entry.payer && $0.body.node == entry.node }
                #expect(Set(served.map(\.id)) == Set(want.map(\.id)) && served.count == want.count)
            }
            // The header names every entry as committed.
            let header = try await Self.get(client, "/v1/settlements/0")
            #expect(header.status == 200)
            #expect((header.object["entries"] as? [Any])?.count == batch.entries.count)
            #expect(header.object["total"] as? String == String(batch.total))
            #expect(header.object["status"] as? String == "built")
        }
    }

    // Bugs caught: inclusion not lowering the unsettled totals (the payer refused with 402 for ever), lowering them
    // twice when the chain is read again after a restart, or touching payers not in the batch.
    @Test("markIncluded lowers payer_unsettled by exactly the batch's amounts, once")
    func markIncludedOnce() async throws {
        let f = try fixture()
        try await serveMix(f, requests: 12)
        let last = try await f.settlements.lastAcceptedSequence()
        let closed = try #require(try await SettlementBatcher.close(store: f.settlements, router: router.publicKey, batchNumber: 0,
                                                                    firstSequence: 1, upperBound: last - 2, epoch: 0))
        // Receipts after the batch stay owed.
        var before: [Account: UInt64] = [:]
        for payer in payers { before[payer] = try await f.receipts.unsettled(payer: payer) }
        let own = try await f.receipts.unsettled(payer: Account(owner: router.publicKey))
        try await f.settlements.markSubmitted(batch: 0, txID: "ab")
        #expect(try await f.settlements.batch(0)?.status == .submitted)
        #expect(try await f.settlements.markIncluded(batch: 0))
        for payer in payers {
            #expect(try await f.receipts.unsettled(payer: payer) == before[payer]! - (closed.payerTotals[payer] ?? 0))
        }
        #expect(try await f.receipts.unsettled(payer: Account(owner: router.publicKey)) == own)
        #expect(try await f.settlements.batch(0)?.status == .included)
        // Again: nothing changes.
        #expect(try await f.settlements.markIncluded(batch: 0) == false)
        for payer in payers {
            #expect(try await f.receipts.unsettled(payer: payer) == before[payer]! - (closed.payerTotals[payer] ?? 0))
        }
        // A resubmission after inclusion does not move it back.
        try await f.settlements.markSubmitted(batch: 0, txID: "cd")
        #expect(try await f.settlements.batch(0)?.status == .included)
    }

    // Bug caught: the router countersigning and storing a receipt whose request is in a batch already closed, so the
    // batch omits a stored receipt (a provable fault) or the receipt is never paid.
    @Test("a receipt whose sequence is at or below the last batched sequence is refused; a re-delivered stored one is acknowledged")
    func closedRangeRefusesReceipts() async throws {
        let f = try fixture()
        let payer = payers[0]
        let (first, stored) = try await serve(f, payer: payer, attempts: [(nodes[0], 4)])
        let second = try await f.receipts.accept(keyHash: Hash32.of([9]), payer: payer)
        f.inFlight.release(second)
        // Assigned to a node, but its receipt comes after the batch closed.
        try await f.receipts.recordAssignment(Assignment(sequence: second, attempt: 0, nodeID: nodes[1].nodeID, app: "llm", model: "m",
                                                         requestHash: requestHash, requestBytes: 100, payer: payer, prices: prices))
        _ = try #require(try await SettlementBatcher.close(store: f.settlements, router: router.publicKey, batchNumber: 0,
                                                           firstSequence: 1, upperBound: second, epoch: 0))
        #expect(try await f.receipts.append(receipt(second, payer: payer, node: nodes[1], completion: 1)) == .alreadyBatched)
        #expect(try await f.receipts.append(stored[0]) == .alreadyStored)
        _ = first
        // The next number is open.
        let (_, later) = try await serve(f, payer: payer, attempts: [(nodes[1], 2)])
        #expect(later.count == 1)
    }

    // Bug caught: a batch closing over a request still being served, so its receipt, arriving a moment later, is
    // refused and the node never paid.
    @Test("sequences in flight hold the batch's upper bound back until released")
    func inFlightHoldsBack() async throws {
        let f = try fixture()
        var sequences: [UInt64] = []
        for i in 0..<5 {
            let (sequence, _) = try await serve(f, payer: payers[i % 3], attempts: [(nodes[0], 1)], release: false)
            sequences.append(sequence)
            // Held from before the number was readable.
            #expect(f.inFlight.isHeld(sequence))
        }
        // The tunnel holds 3 as well while its node works; the gateway releases its hold.
        f.inFlight.hold(3)
        for s in sequences where s != 3 { f.inFlight.release(s) }
        f.inFlight.release(3)
        #expect(f.inFlight.batchUpperBound(lastAccepted: 5) == 2)
        let closed = try #require(try await SettlementBatcher.close(store: f.settlements, router: router.publicKey, batchNumber: 0,
                                                                    firstSequence: 1, upperBound: f.inFlight.batchUpperBound(lastAccepted: 5),
                                                                    epoch: 0))
        #expect(closed.batch.lastSequence == 2)
        f.inFlight.release(3)
        #expect(f.inFlight.batchUpperBound(lastAccepted: 5) == 5)
        #expect(f.inFlight.count == 0)
        let next = try #require(try await SettlementBatcher.close(store: f.settlements, router: router.publicKey, batchNumber: 1,
                                                                  firstSequence: 3, upperBound: 5, epoch: 1))
        #expect(next.batch.firstSequence == 3 && next.batch.lastSequence == 5 && next.batch.receiptCount == 3)
        // A hold older than the age limit does not block settlement for ever.
        let aged = InFlightSequences(maxHoldAge: .zero)
        aged.hold(1)
        #expect(aged.batchUpperBound(lastAccepted: 9) == 9)
    }

    // Bug caught: a restarted router (kill -9 with requests in flight) closing a batch over requests whose nodes have
    // not yet re-delivered their receipts, which are then refused as already batched and never paid.
    @Test("a restarted router holds the requests assigned before the crash that have no receipt yet, and only those")
    func restartHoldsUnreceipted() async throws {
        let directory = NSTemporaryDirectory() + "emc-restart-\(UUID().uuidString)"
        do {
            let f = try fixture(directory: directory)
            try await serve(f, payer: payers[0], attempts: [(nodes[0], 1)])  // 1: receipted
            for _ in 0..<2 {  // 2 and 3: assigned, no receipt yet
                let sequence = try await f.receipts.accept(keyHash: Hash32.of([9]), payer: payers[1])
                try await f.receipts.recordAssignment(Assignment(sequence: sequence, attempt: 0, nodeID: nodes[1].nodeID, app: "llm", model: "m",
                                                                 requestHash: requestHash, requestBytes: 100, payer: payers[1], prices: prices))
            }
            _ = try await f.receipts.accept(keyHash: Hash32.of([9]), payer: payers[1])  // 4: accepted, never assigned
        }
        let restarted = try RouterService(configuration: RouterConfiguration(dataDirectory: directory), key: router,
                                          admission: RegisteredNodes(), metricsText: { [] })
        #expect(!restarted.inFlight.isHeld(1) && restarted.inFlight.isHeld(2) && restarted.inFlight.isHeld(3) && !restarted.inFlight.isHeld(4))
        #expect(restarted.inFlight.batchUpperBound(lastAccepted: 4) == 1)
        // The node re-delivers request 2's receipt: its hold ends; 3 still holds the batch back.
        restarted.inFlight.receiptStored(2)
        #expect(!restarted.inFlight.isHeld(2) && restarted.inFlight.batchUpperBound(lastAccepted: 4) == 2)
        restarted.inFlight.receiptStored(2)  // a second receipt (another attempt) releases nothing more
        restarted.inFlight.receiptStored(3)
        #expect(restarted.inFlight.batchUpperBound(lastAccepted: 4) == 4)

        // A number whose answer was cancelled by the crash never gets a receipt: once every node it was assigned
        // to has reconnected (and re-delivered what it had), it holds only for the grace (here none).
        let holds = InFlightSequences(reconnectGrace: .zero)
        holds.holdUntilReceipt(5, node: "a", for: .seconds(600))
        holds.holdUntilReceipt(5, node: "b", for: .seconds(600))
        #expect(holds.batchUpperBound(lastAccepted: 9) == 4)
        holds.nodeRegistered("a")
        #expect(holds.batchUpperBound(lastAccepted: 9) == 4)  // attempt 2's node is not back yet
        holds.nodeRegistered("b")
        #expect(holds.batchUpperBound(lastAccepted: 9) == 9)
    }

    // Bug caught: a receipt stored between reading the range and recording the batch left out of the batch.
    @Test("a batch built from a read older than a receipt stored in its range is not recorded")
    func staleReadNotRecorded() async throws {
        let f = try fixture()
        try await serve(f, payer: payers[0], attempts: [(nodes[0], 1)])
        let sequence = try await f.receipts.accept(keyHash: Hash32.of([9]), payer: payers[1])
        let read = try await f.settlements.receipts(sequences: 1...sequence)
        try await f.receipts.recordAssignment(Assignment(sequence: sequence, attempt: 0, nodeID: nodes[0].nodeID, app: "llm", model: "m",
                                                         requestHash: requestHash, requestBytes: 100, payer: payers[1], prices: prices))
        #expect(try await f.receipts.append(receipt(sequence, payer: payers[1], node: nodes[0], completion: 1)) == .stored)
        let (batch, totals) = try SettlementBatcher.build(router: router.publicKey, batchNumber: 0, range: 1...sequence, receipts: read.receipts)
        let stored = StoredSettlementBatch(batch: 0, firstSequence: 1, lastSequence: sequence, closedEpoch: 0, encoded: batch.canonicalBytes)
        #expect(try await f.settlements.record(stored, payerTotals: totals, receiptWatermark: read.watermark) == .stale)
        #expect(try await f.settlements.lastBatch() == nil)
        // Read again: both receipts are in.
        let closed = try #require(try await SettlementBatcher.close(store: f.settlements, router: router.publicKey, batchNumber: 0,
                                                                    firstSequence: 1, upperBound: sequence, epoch: 0))
        #expect(closed.batch.receiptCount == 2)
    }

    // Bugs caught: a batch over the entry cap (refused on chain for ever), or cut mid-sequence / leaving a gap
    // between batches (receipts never settled).
    @Test("a batch over the pair cap ends early at a sequence boundary and the next one starts right after it")
    func entryCapEndsEarly() async throws {
        let f = try fixture()
        var all: [Receipt] = []
        // Every request a new (payer, node) pair; request 3 goes to both nodes (two pairs in one sequence).
        for i in 0..<6 {
            let payer = Account(owner: SigningKey().publicKey)
            var attempts: [(node: SigningKey, completion: UInt64)] = [(nodes[0], 1)]
            if i == 2 { attempts.append((nodes[1], 1)) }
            all += try await serve(f, payer: payer, attempts: attempts).1
        }
        var first: UInt64 = 1, number: UInt64 = 0
        var batches: [SettlementBatch] = []
        while first <= 6 {
            let closed = try #require(try await SettlementBatcher.close(store: f.settlements, router: router.publicKey, batchNumber: number,
                                                                        firstSequence: first, upperBound: 6, epoch: 0, maxEntries: 3))
            #expect(closed.batch.entries.count <= 3)
            batches.append(closed.batch)
            first = closed.batch.lastSequence + 1
            number += 1
        }
        // 1, 2 | 3 (two pairs), 4 | 5, 6: sequence 3 is never split.
        #expect(batches.map(\.sequenceRange) == [1...2, 3...4, 5...6])
        #expect(batches.reduce(0) { $0 + $1.receiptCount } == UInt64(all.count))
        // Out of order or repeated: refused.
        let stray = StoredSettlementBatch(batch: 9, firstSequence: 7, lastSequence: 7, closedEpoch: 0, encoded: [1])
        #expect(try await f.settlements.record(stray, payerTotals: [:], receiptWatermark: nil) == .outOfOrder(expectedBatch: 3, expectedFirstSequence: 7))
    }

    // Bug caught: the public route trapping or answering 200/500 on hostile parameters (a crash takes the router's
    // serving path down with it).
    @Test("the settlement data route answers malformed batch, payer, node, offset and limit with 4xx and keeps serving")
    func hostileParameters() async throws {
        let f = try fixture()
        try await serveMix(f, requests: 4)
        let closed = try #require(try await SettlementBatcher.close(store: f.settlements, router: router.publicKey, batchNumber: 0,
                                                                    firstSequence: 1, upperBound: 5, epoch: 0))
        let entry = closed.batch.entries[0]
        let good = "payer=\(entry.payer.description)&node=\(entry.node.hex)"
        let app = Self.app(f, router: router.publicKey)
        try await app.test(.router) { client in
            let cases: [(String, Int, String)] = [
                ("/v1/settlements/-1", 400, "invalid_batch"),
                ("/v1/settlements/18446744073709551616", 400, "invalid_batch"),
                ("/v1/settlements/abc", 400, "invalid_batch"),
                ("/v1/settlements/7", 404, "unknown_batch"),
                ("/v1/settlements/18446744073709551615", 404, "unknown_batch"),
                ("/v1/settlements/-1/receipts?\(good)", 400, "invalid_batch"),
                ("/v1/settlements/0/receipts?\(good)&limit=0", 400, "invalid_limit"),
                ("/v1/settlements/0/receipts?\(good)&limit=-5", 400, "invalid_limit"),
                ("/v1/settlements/0/receipts?\(good)&offset=99999999999999999999999", 400, "invalid_offset"),
                ("/v1/settlements/0/receipts?\(good)&offset=4294967296", 400, "offset_out_of_range"),
                ("/v1/settlements/0/receipts?\(good)&offset=-1", 400, "invalid_offset"),
                ("/v1/settlements/0/receipts?payer=not-an-account&node=\(entry.node.hex)", 400, "invalid_payer"),
                ("/v1/settlements/0/receipts?payer=&node=\(entry.node.hex)", 400, "invalid_payer"),
                ("/v1/settlements/0/receipts?node=\(entry.node.hex)", 400, "missing_payer"),
                ("/v1/settlements/0/receipts?payer=\(entry.payer.description)", 400, "missing_node"),
                ("/v1/settlements/0/receipts?payer=\(entry.payer.description)&node=zz", 400, "invalid_node"),
                ("/v1/settlements/0/receipts?payer=\(Account(owner: SigningKey().publicKey).description)&node=\(entry.node.hex)", 404, "unknown_pair"),
            ]
            for (uri, status, code) in cases {
                let answer = try await Self.get(client, uri)
                #expect(answer.status == status, "\(uri)")
                #expect((answer.object["error"] as? [String: Any])?["code"] as? String == code, "\(uri)")
            }
            // Still serving, and a huge limit is capped.
            let page = try await Self.get(client, "/v1/settlements/0/receipts?\(good)&limit=1000000")
            #expect(page.status == 200)
            #expect((page.object["receipts"] as? [Any])?.count == Int(entry.count))
        }
    }

    // MARK: HTTP helpers

    static func app(_ f: Fixture, router: PublicKey) -> some ApplicationProtocol {
        let routes = Router()
        SettlementDataRoutes(store: f.settlements, router: router, logger: .init(label: "test")).register(on: routes)
        return Application(router: routes)
    }

    struct Answer {
        var status: Int
        var object: [String: Any]
    }

    static func get(_ client: some TestClientProtocol, _ uri: String) async throws -> Answer {
        try await client.execute(uri: uri, method: .get) { response in
            Answer(status: response.status.code,
                   object: (try? JSONSerialization.jsonObject(with: Data(response.body.readableBytesView))) as? [String: Any] ?? [:])
        }
    }
}
