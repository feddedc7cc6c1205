import EdgeMatrixCore
import Foundation
@testable import EdgeMatrixLedger
import Testing

/// ChallengeFixture with a batch of two pairs: carol→nodeA (three receipts) and carol→nodeB (one).
struct DataFixture {
    var c = ChallengeFixture()
    var leavesA = [SettlementLeaf]()
    var leafB: SettlementLeaf

    init() throws {
        leavesA = [c.leaf(c.receipt(1)), c.leaf(c.receipt(2, prompt: 3_000)), c.leaf(c.receipt(4, completion: 100))].sorted { $0.key < $1.key }
        leafB = c.leaf(c.receipt(3, node: c.s.nodeB))
        try c.settle(leavesA + [leafB])
    }

    var f: Fixture {
        get { c.s.r.f }
        set { c.s.r.f = newValue }
    }
    var carol: Account { Account(owner: c.s.carol.publicKey) }
    var pairA: SettlementPair { SettlementPair(payer: carol, node: c.s.nodeA.publicKey) }
    var settlement: SettlementKey { SettlementKey(router: c.s.router, batchNumber: 0) }
    var amountA: UInt64 { leavesA.reduce(0) { $0 + $1.amount } }

    func request(by key: SigningKey, payer: Account? = nil, node: PublicKey? = nil, batch: UInt64 = 0) -> Transaction {
        f.tx(key, .dataRequest(DataRequest(router: c.s.router, batchNumber: batch, payer: payer ?? carol, node: node ?? c.s.nodeA.publicKey)))
    }

    func response(_ leaves: [SettlementLeaf], from first: UInt64 = 0, by key: SigningKey? = nil) -> Transaction {
        f.tx(key ?? c.s.r.router, .dataResponse(DataResponse(router: c.s.router, batchNumber: 0, payer: carol, node: c.s.nodeA.publicKey,
                                                               firstIndex: first, leaves: leaves.map(DataLeaf.init))))
    }

    var record: DataRequestRecord? { f.ledger.dataRequest(DataRequestKey(settlement: settlement, pair: pairA)) }

    /// Applies `tx` to a copy of the ledger: its error, and whether the state root stayed the same.
    func refused(_ tx: Transaction) -> (LedgerError?, unchanged: Bool) {
        var ledger = f.ledger
        let root = ledger.stateRoot()
        let result = ledger.apply(tx, context: BlockContext(height: f.height + 1, timeMillis: f.now))
        return (result.failure, ledger.stateRoot() == root)
    }

    /// Runs empty blocks until the settlement is no longer pending or challenged (at most 20).
    mutating func runToFinality() {
        for _ in 0..<20 where [.pending, .challenged].contains(f.ledger.settlement(settlement)?.status) { f.block() }
    }
}

@Suite("Withheld data: data_request and data_response")
struct DataRequestTests {
    // Catches: a complete, correct answer that does not close the request, a bond kept after an answer, the
    // answer's chunks not accumulating across transactions, or a settlement that no longer finalises normally.
    @Test("a request answered in full (two chunks): closed, bond back, the settlement finalises with every pair paid")
    func answered() throws {
        var d = try DataFixture()
        let carol0 = d.c.s.balance(d.c.s.carol), fee = d.f.fee.baseUnits, bond = d.c.bond
        let requested = try d.f.submit(d.request(by: d.c.s.carol)).get()
        guard case .dataRequested(_, _, let pair, let due, let postedBond) = requested.effect else { Issue.record("effect \(requested.effect)"); return }
        #expect(pair == d.pairA && postedBond.baseUnits == bond && due == d.f.height + 4)
        #expect(d.c.s.balance(d.c.s.carol) == carol0 - bond - fee)
        #expect(d.record?.status == .open)
        // The router's chunks of the pair (one here) would close it at once; this test posts two by hand.
        let chunks = DataResponse.chunks(router: d.c.s.router, batchNumber: 0, pair: d.pairA, leaves: d.leavesA.map(DataLeaf.init))
        #expect(chunks.count == 1 && d.refused(d.f.tx(d.c.s.r.router, .dataResponse(chunks[0]))).0 == nil)
        // Chunk 1: leaves 0 and 1. Chunk 2: leaf 2 closes it.
        #expect(try d.f.submit(d.response(Array(d.leavesA[0..<2]))).get().effect
                == .dataAnswered(router: d.c.s.router, batch: 0, pair: d.pairA, leaves: 2, complete: false))
        #expect(d.record?.status == .open && d.record?.receivedLeaves == 2)
        #expect(try d.f.submit(d.response([d.leavesA[2]], from: 2)).get().effect
                == .dataAnswered(router: d.c.s.router, batch: 0, pair: d.pairA, leaves: 3, complete: true))
        #expect(d.record?.status == .answered)
        #expect(d.c.s.balance(d.c.s.carol) == carol0 - fee)  // the bond is back
        // Nothing more may be posted, nor the pair asked again.
        #expect(d.refused(d.response([d.leavesA[2]], from: 3)).0 == .noOpenDataRequest(router: d.c.s.router, batch: 0, pair: d.pairA))
        #expect(d.refused(d.request(by: d.c.s.carol)).0 == .dataAlreadyRequested(router: d.c.s.router, batch: 0, pair: d.pairA, status: "answered"))
        let stake0 = d.c.routerStake
        d.runToFinality()
        #expect(d.f.ledger.settlement(d.settlement)?.status == .final)
        #expect(d.c.routerStake == stake0)
        #expect(d.c.s.escrow?.balance.baseUnits == 1_000_000_000 - d.amountA - d.leafB.amount && d.c.s.escrow?.pending == .zero)
        #expect(d.f.ledger.dataRequests().isEmpty)  // dropped with finality
        #expect(d.c.conserved())
    }

    // Catches: a withheld pair still paid at finality, a revert off by a base unit, no slash or a slash that pays
    // the requester more than half, the bond kept, the node left unpaid, or the other pairs of the batch reverted too.
    @Test("a request left unanswered: at the deadline the pair's charge is back in escrow, the router slashed, the bond back, the rest finalises")
    func withheld() throws {
        var d = try DataFixture()
        let escrow0 = try #require(d.c.s.escrow), stake0 = d.c.routerStake, bond = d.c.bond
        let carol0 = d.c.s.balance(d.c.s.carol), bob0 = d.c.s.balance(d.f.bob), fee = d.f.fee.baseUnits
        _ = try d.f.submit(d.request(by: d.c.s.carol)).get()
        let due = try #require(d.record?.dueAtHeight)
        var events = [BlockEvent]()
        while d.f.height < due { events += d.f.block().events }
        #expect(d.record?.status == .withheld)
        let amount = d.amountA
        let slashed = bond + 2 * amount, half = slashed / 2
        let nodeShare = SettlementSplit(amount: amount, routerFeeBps: 250, protocolFeeBps: 500).node
        #expect(events.contains(.dataWithheld(DataRequestKey(settlement: d.settlement, pair: d.pairA), reverted: Amount(baseUnits: amount),
                                              slashed: Amount(baseUnits: slashed), reward: Amount(baseUnits: half - nodeShare),
                                              compensation: Amount(baseUnits: nodeShare))))
        #expect(d.c.s.escrow?.pending.baseUnits == escrow0.pending.baseUnits - amount)
        #expect(d.c.routerStake == stake0 - slashed)
        #expect(d.c.s.balance(d.c.s.carol) == carol0 - fee + half - nodeShare)  // bond back, reward
        #expect(d.c.s.balance(d.f.bob) == bob0 + nodeShare)  // the node owner is made whole
        #expect(d.f.ledger.settlement(d.settlement)?.status == .challenged)
        // The router can no longer answer; the batch's other pair still finalises.
        #expect(d.refused(d.response(d.leavesA)).0 == .noOpenDataRequest(router: d.c.s.router, batch: 0, pair: d.pairA))
        d.runToFinality()
        #expect(d.f.ledger.settlement(d.settlement)?.status == .final)
        #expect(d.c.s.escrow?.balance.baseUnits == 1_000_000_000 - d.leafB.amount && d.c.s.escrow?.pending == .zero)
        #expect(d.c.conserved())
    }

    // Catches: a wrong leaf, a leaf too many, a chunk out of order or a partial answer closing the request (the
    // router escaping the slash with data nobody can check), or a refused answer changing state.
    @Test("wrong, partial and out-of-order answers do not close the request and change nothing")
    func wrongAnswers() throws {
        var d = try DataFixture()
        _ = try d.f.submit(d.request(by: d.f.bob, node: d.c.s.nodeA.publicKey)).get()  // the node's owner asks
        var wrong = d.leavesA
        wrong[1] = SettlementLeaf(key: wrong[1].key, receiptBytes: wrong[1].receiptBytes, amount: wrong[1].amount - 1)
        let (mismatch, unchanged1) = d.refused(d.response(wrong))
        #expect(mismatch?.kind == "DataResponseRefused" && unchanged1)
        if case .dataResponseRefused(let code, _) = mismatch { #expect(code == "data_response_root_mismatch") }
        let swapped = [d.leavesA[1], d.leavesA[0], d.leavesA[2]]
        #expect(d.refused(d.response(swapped)).0.map { "\($0)" }?.contains("data_response_root_mismatch") == true)
        let inflated = [SettlementLeaf(key: d.leavesA[0].key, receiptBytes: d.leavesA[0].receiptBytes, amount: d.amountA + 1)]
        #expect(d.refused(d.response(inflated)).0.map { "\($0)" }?.contains("data_response_amount_exceeded") == true)
        #expect(d.refused(d.response(d.leavesA + [d.leafB])).0.map { "\($0)" }?.contains("data_response_too_many_leaves") == true)
        #expect(d.refused(d.response([d.leavesA[1]], from: 1)).0.map { "\($0)" }?.contains("data_response_out_of_order") == true)
        // Only the router (or its owner) answers.
        let (byOther, unchanged2) = d.refused(d.response(d.leavesA, by: d.f.bob))
        #expect(byOther == .notNodeOwner(nodeKey: d.c.s.router) && unchanged2)
        // A partial answer stays open, and at the deadline the pair is reverted as if nothing had been posted.
        _ = try d.f.submit(d.response([d.leavesA[0]])).get()
        let due = try #require(d.record?.dueAtHeight)
        while d.f.height < due { d.f.block() }
        #expect(d.record?.status == .withheld && d.record?.receivedLeaves == 1)
        #expect(d.c.conserved())
    }

    // Catches: a stranger (or the router) holding a settlement hostage, a request on a final batch or an absent
    // pair, a request too late for its deadline to end before the window, a second request for one pair, a
    // requester who cannot post the bond; any of them changing state.
    @Test("requests by an unrelated account, for a final settlement, for an absent pair, too late, twice, or unbonded are refused and change nothing")
    func refusals() throws {
        var d = try DataFixture()
        let router = d.c.s.router, pair = d.pairA
        for (tx, error) in [
            (d.request(by: d.f.alice), LedgerError.notPairParty(pair: pair)),  // the router's owner
            (d.request(by: d.c.s.r.router), .notPairParty(pair: pair)),
            (d.request(by: d.c.s.carol, node: d.c.s.r.router.publicKey),
             .unknownPair(router: router, batch: 0, pair: SettlementPair(payer: d.carol, node: d.c.s.r.router.publicKey))),
            (d.request(by: d.c.s.carol, payer: Account(owner: d.f.bob.publicKey)),
             .unknownPair(router: router, batch: 0, pair: SettlementPair(payer: Account(owner: d.f.bob.publicKey), node: d.c.s.nodeA.publicKey))),
            (d.request(by: d.c.s.carol, batch: 1), .unknownSettlement(router: router, batch: 1)),
            (d.request(by: d.c.s.carol, batch: .max), .unknownSettlement(router: router, batch: .max)),
            (d.request(by: testKey(55), node: d.c.s.nodeA.publicKey, batch: 0), .notPairParty(pair: pair)),
            (d.response(d.leavesA), .noOpenDataRequest(router: router, batch: 0, pair: pair)),
        ] {
            let (got, unchanged) = d.refused(tx)
            #expect(got == error)
            #expect(unchanged)
        }
        // The node key itself may ask (once funded for the bond), but not twice.
        _ = try d.f.submit(d.f.transfer(d.f.bob, to: Account(owner: d.c.s.nodeA.publicKey), emc("20"))).get()
        _ = try d.f.submit(d.request(by: d.c.s.nodeA)).get()
        #expect(d.record?.requester == Account(owner: d.c.s.nodeA.publicKey))
        #expect(d.refused(d.request(by: d.c.s.carol)) == (.dataAlreadyRequested(router: router, batch: 0, pair: pair, status: "open"), true))
        // Pair B, asked too late: window 8, deadline 4 blocks, settled 4 blocks ago.
        d.f.block()
        let record = try #require(d.f.ledger.settlement(d.settlement))
        let late = d.refused(d.request(by: d.c.s.carol, node: d.c.s.nodeB.publicKey))
        #expect(late.0 == .dataRequestTooLate(router: router, batch: 0, lastHeight: record.finalAtHeight - 5) && late.unchanged)
        // After finality.
        d.runToFinality()
        #expect(d.refused(d.request(by: d.c.s.carol, node: d.c.s.nodeB.publicKey))
                == (.challengeWindowClosed(router: router, batch: 0, finalAtHeight: record.finalAtHeight), true))
    }

    @Test("a requester who cannot post the bond is refused and nothing changes")
    func unbonded() throws {
        var d = try DataFixture()
        // The node key holds nothing.
        d.f.block()
        let (error, unchanged) = d.refused(d.request(by: d.c.s.nodeB, node: d.c.s.nodeB.publicKey))
        #expect(error == .insufficientFunds(balance: .zero) && unchanged)
    }

    // Catches: a decoder that trusts a leaf count (memory blow-up from a tiny transaction), accepts an empty or
    // oversized answer or an empty receipt, or encodes kinds 15 and 16 differently from how it decodes them.
    @Test("extreme data_response inputs are refused by the decoder; kinds 15 and 16 round-trip")
    func decoding() throws {
        let d = try DataFixture()
        for tx in [d.request(by: d.c.s.carol), d.response(d.leavesA)] {
            #expect(try Transaction(decoding: tx.encoded) == tx)
        }
        let good = DataResponse(router: d.c.s.router, batchNumber: 0, payer: d.carol, node: d.c.s.nodeA.publicKey, firstIndex: 0,
                                leaves: d.leavesA.map(DataLeaf.init))
        let header = Array(good.canonicalBytes.prefix(32 + 8 + 33 + 32 + 8))
        func decode(_ bytes: [UInt8]) throws -> DataResponse {
            var reader = ByteReader(bytes, maxFieldLength: TransactionLimits.maxSettleTransactionBytes)
            return try DataResponse(from: &reader)
        }
        #expect(try decode(good.canonicalBytes) == good)
        for count in [UInt32(0), UInt32(DataResponse.maxLeaves + 1), .max] {
            var w = ByteWriter(); w.writeRaw(header); w.write(count); w.writeRaw([UInt8](repeating: 0, count: 64))
            #expect(throws: DecodingError.self) { try decode(w.bytes) }
        }
        // A count the bytes cannot hold.
        var short = ByteWriter(); short.writeRaw(header); short.write(UInt32(4_000)); short.writeRaw([UInt8](repeating: 1, count: 100))
        #expect(throws: DecodingError.self) { try decode(short.bytes) }
        // An empty receipt.
        var empty = ByteWriter(); empty.writeRaw(header); empty.write(UInt32(1)); empty.write(bytes: []); empty.write(UInt64(5))
        #expect(throws: DecodingError.self) { try decode(empty.bytes) }
        // Chunking keeps order and size.
        let chunks = DataResponse.chunks(router: d.c.s.router, batchNumber: 0, pair: d.pairA, leaves: d.leavesA.map(DataLeaf.init), maxBytes: 1)
        #expect(chunks.map(\.firstIndex) == [0, 1, 2] && chunks.flatMap(\.leaves) == d.leavesA.map(DataLeaf.init))
    }

    // Catches: state that depends on dictionary order or is missing from the state root (two validators would
    // diverge mid-answer, when only the accumulated frontier tells them apart).
    @Test("determinism: the same blocks give the same state root, and a half-answered request is in the root")
    func determinism() throws {
        func run(answerFirst: Bool) throws -> [Hash32] {
            var d = try DataFixture()
            var roots = [d.f.ledger.stateRoot()]
            _ = try d.f.submit(d.request(by: d.c.s.carol)).get()
            _ = try d.f.submit(d.request(by: d.c.s.carol, node: d.c.s.nodeB.publicKey)).get()
            roots.append(d.f.ledger.stateRoot())
            if answerFirst { _ = try d.f.submit(d.response([d.leavesA[0]])).get() } else { d.f.block() }
            roots.append(d.f.ledger.stateRoot())
            d.runToFinality()
            roots.append(d.f.ledger.stateRoot())
            return roots
        }
        let a = try run(answerFirst: true), b = try run(answerFirst: true), c = try run(answerFirst: false)
        #expect(a == b)
        #expect(a[1] == c[1] && a[2] != c[2])
    }
}
