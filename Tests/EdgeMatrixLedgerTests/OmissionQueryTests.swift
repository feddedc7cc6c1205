import EdgeMatrixCore
import Foundation
@testable import EdgeMatrixLedger
import Testing

extension DataFixture {
    func query(_ receipt: Receipt, by key: SigningKey) -> Transaction {
        f.tx(key, .omissionQuery(OmissionQuery(router: c.s.router, batchNumber: 0, receipt: receipt.settlementBytes!)))
    }

    func answer(_ leaf: SettlementLeafKey, _ witness: SettlementLeafWitness, by key: SigningKey? = nil) -> Transaction {
        f.tx(key ?? c.s.r.router, .omissionAnswer(OmissionAnswer(router: c.s.router, batchNumber: 0, key: leaf, witness: witness)))
    }

    func key(_ receipt: Receipt) -> SettlementLeafKey {
        SettlementLeafKey(payer: receipt.body.payer, node: receipt.body.node, sequence: receipt.body.sequence, attempt: receipt.body.attempt)
    }
}

@Suite("Interactive omission: omission_query and omission_answer")
struct OmissionQueryTests {
    // Catches: a router that escapes by staying silent, a node left unpaid for its receipt, a bond kept, no slash,
    // the payer's escrow touched, or the same omission paid twice (query and kind-13 claim).
    @Test("an omitted receipt queried and left unanswered: upheld at the deadline, the node paid its worth from the slash, the bond back")
    func unanswered() throws {
        var d = try DataFixture()
        let omitted = d.c.receipt(5)
        let worth = omitted.body.cost!
        let bob0 = d.c.s.balance(d.f.bob), stake0 = d.c.routerStake, escrow0 = d.c.s.escrow, fee = d.f.fee.baseUnits, bond = d.c.bond
        let outcome = try d.f.submit(d.query(omitted, by: d.f.bob)).get()
        guard case .omissionQueried(_, _, let leaf, let w, let due) = outcome.effect else { Issue.record("\(outcome.effect)"); return }
        #expect(leaf == d.key(omitted) && w.baseUnits == worth)
        var events = [BlockEvent]()
        while d.f.height < due { events += d.f.block().events }
        let slashed = bond + 2 * worth, half = slashed / 2
        let qkey = OmissionQueryKey(settlement: d.settlement, leaf: leaf)
        #expect(events.contains(.omissionUpheld(qkey, slashed: Amount(baseUnits: slashed), reward: Amount(baseUnits: half - worth),
                                                compensation: Amount(baseUnits: worth))))
        #expect(d.f.ledger.omissionQuery(qkey)?.status == .upheld)
        #expect(d.c.routerStake == stake0 - slashed)
        #expect(d.c.s.balance(d.f.bob) == bob0 - fee + half)  // bond back; compensation and reward both bob's (node owner and querier)
        #expect(d.c.s.escrow == escrow0)
        // The same omission through a kind-13 claim pays nothing more.
        let claim = SettlementClaim.omission(receipt: omitted.settlementBytes!, .afterLast(try d.c.witness(d.leavesA, 2)))
        if case .evidenceAlreadyUsed = d.refused(d.c.challenge(claim, by: d.f.bob)).0 {} else { Issue.record("claim after query not refused") }
        d.runToFinality()
        #expect(d.f.ledger.settlement(d.settlement)?.status == .final)
        #expect(d.c.conserved())
    }

    // Catches: a proven receipt still upheld, a bond not burned for a baseless query, or an answer that proves
    // another leaf, a wrong proof, or comes from someone other than the router being accepted.
    @Test("an included receipt queried: the router's proof closes it and burns the bond; wrong proofs are refused")
    func answered() throws {
        var d = try DataFixture()
        let included = d.c.receipt(2, prompt: 3_000)
        let leaf = d.key(included)
        _ = try d.f.submit(d.query(included, by: d.f.bob)).get()
        let other = try d.c.witness(d.leavesA, 0)
        // The router builds its answer from the pair's leaves; there is none for a receipt it left out.
        let made = try #require(OmissionAnswer.make(router: d.c.s.router, batchNumber: 0, key: leaf, pairLeaves: d.leavesA))
        let right = made.witness
        #expect(OmissionAnswer.make(router: d.c.s.router, batchNumber: 0, key: d.key(d.c.receipt(5)), pairLeaves: d.leavesA) == nil)
        for (tx, code) in [(d.answer(leaf, other), "answer_key_mismatch"),
                           (d.answer(leaf, SettlementLeafWitness(receiptBytes: right.receiptBytes, amount: right.amount - 1, proof: right.proof)), "answer_bad_proof"),
                           (d.answer(d.key(d.c.receipt(7)), right), "answer_no_open_query")] {
            let (error, unchanged) = d.refused(tx)
            #expect(error.map { "\($0)" }?.contains(code) == true, "\(String(describing: error))")
            #expect(unchanged)
        }
        #expect(d.refused(d.answer(leaf, right, by: d.f.bob)).0 == .notNodeOwner(nodeKey: d.c.s.router))
        let burned0 = d.f.ledger.burned.baseUnits, stake0 = d.c.routerStake
        #expect(try d.f.submit(d.answer(leaf, right)).get().effect
                == .omissionAnswered(router: d.c.s.router, batch: 0, leaf: leaf, bondBurned: Amount(baseUnits: d.c.bond)))
        #expect(d.f.ledger.burned.baseUnits == burned0 + d.c.bond + d.f.fee.baseUnits)
        d.runToFinality()
        #expect(d.c.routerStake == stake0)
        #expect(d.f.ledger.settlement(d.settlement)?.status == .final)
        #expect(d.c.conserved())
    }

    // Catches: a payer or stranger querying a node's receipt, a receipt outside the batch, a forged one, one queried
    // twice; any of them changing state.
    @Test("queries by others, outside the range, forged, or twice are refused and change nothing")
    func refusals() throws {
        var d = try DataFixture()
        let omitted = d.c.receipt(5)
        #expect(d.refused(d.query(omitted, by: d.c.s.carol)) == (.notPairParty(pair: d.pairA), true))
        #expect(d.refused(d.query(omitted, by: d.f.alice)) == (.notPairParty(pair: d.pairA), true))
        let outside = d.refused(d.query(d.c.receipt(11), by: d.f.bob))
        #expect(outside.0.map { "\($0)" }?.contains("query_receipt_outside_batch") == true && outside.unchanged)
        let forged = d.refused(d.f.tx(d.f.bob, .omissionQuery(OmissionQuery(router: d.c.s.router, batchNumber: 0, receipt: [1, 2, 3]))))
        #expect(forged.0.map { "\($0)" }?.contains("receipt_malformed") == true && forged.unchanged)
        _ = try d.f.submit(d.query(omitted, by: d.f.bob)).get()
        let twice = d.refused(d.query(omitted, by: d.c.s.nodeA))
        #expect(twice.0.map { "\($0)" }?.contains("query_already_filed") == true && twice.unchanged)
        for tx in [d.query(omitted, by: d.f.bob), d.answer(d.key(omitted), try d.c.witness(d.leavesA, 2))] {
            #expect(try Transaction(decoding: tx.encoded) == tx)
        }
        var empty = ByteWriter(); empty.writeRaw(d.c.s.router.rawRepresentation); empty.write(UInt64(0)); empty.write(bytes: [])
        var reader = ByteReader(empty.bytes, maxFieldLength: 1 << 20)
        #expect(throws: DecodingError.self) { try OmissionQuery(from: &reader) }
    }
}
