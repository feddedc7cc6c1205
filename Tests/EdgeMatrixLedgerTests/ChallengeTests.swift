import EdgeMatrixCore
import Foundation
@testable import EdgeMatrixLedger
import Testing

/// SettleFixture with priced nodes and real receipts: signed by the compute node, countersigned by the router.
struct ChallengeFixture {
    var s: SettleFixture
    /// 1 EMC per 1M prompt tokens, 2 EMC per 1M completion tokens for model "m".
    static let prices = PriceList(entries: [PriceEntry(name: "m", perMillionPromptTokens: Amount(emc: 1), perMillionCompletionTokens: Amount(emc: 2))])
    var unitPrices: UnitPrices { Self.prices.unitPrices(model: "m", app: "llm", kind: .chat) }

    /// A window of 8 blocks: every submitted transaction commits a block, and a test files several challenges.
    init(settlementDeadlineBlocks: UInt64 = 3_600) {
        s = SettleFixture(challengeWindowBlocks: 8, settlementDeadlineBlocks: settlementDeadlineBlocks)
        for node in [s.nodeA, s.nodeB] {
            precondition(s.r.f.submit(s.r.f.tx(s.r.f.bob, .setPrices(SetPrices(nodeKey: node.publicKey, prices: Self.prices)))).value != nil)
        }
    }

    /// A countersigned receipt for carol's request `sequence` served by `node`.
    func receipt(_ sequence: UInt64, node: SigningKey? = nil, prompt: UInt64 = 1_000, completion: UInt64 = 500, prices: UnitPrices? = nil,
                 router: SigningKey? = nil) -> Receipt {
        let node = node ?? s.nodeA
        let router = router ?? s.r.router
        let body = ReceiptBody(payer: Account(owner: s.carol.publicKey), router: router.publicKey, node: node.publicKey, sequence: sequence, attempt: 1,
                               app: "llm", model: "m", prices: prices ?? unitPrices,
                               units: WorkUnits(promptTokens: prompt, completionTokens: completion), startedAtMillis: 1, endedAtMillis: 2,
                               requestHash: Hash32.of([UInt8(truncatingIfNeeded: sequence)]), responseHash: Hash32.of([2]), status: 200)
        var receipt = Receipt(signing: body, with: node)
        try! receipt.countersign(nodeKey: node.publicKey, routerKey: router)
        return receipt
    }

    func leaf(_ receipt: Receipt, amount: UInt64? = nil) -> SettlementLeaf {
        let b = receipt.body
        return SettlementLeaf(key: SettlementLeafKey(payer: b.payer, node: b.node, sequence: b.sequence, attempt: b.attempt),
                              receiptBytes: receipt.settlementBytes!, amount: amount ?? b.cost!)
    }

    /// Settles `leaves` as batch 0 over sequences 1...10; returns the batch.
    @discardableResult
    mutating func settle(_ leaves: [SettlementLeaf]) throws -> SettlementBatch {
        let batch = try SettlementBatchBuilder.build(router: s.router, batchNumber: 0, sequenceRange: 1...10, leaves: leaves.sorted { $0.key < $1.key })
        _ = try s.r.f.submit(s.settle(batch)).get()
        return batch
    }

    func witness(_ leaves: [SettlementLeaf], _ index: Int) throws -> SettlementLeafWitness {
        try SettlementLeafWitness(tree: SettlementBatchBuilder.pairTree(leaves: leaves), leaves: leaves, index: index)
    }

    func challenge(_ claim: SettlementClaim, by key: SigningKey) -> Transaction {
        s.r.f.tx(key, .challengeSettlement(SettlementChallenge(router: s.router, batchNumber: 0, claim: claim)))
    }

    var routerStake: UInt64 { s.r.f.ledger.stakes[s.r.routerStakeID]!.amount.baseUnits }
    var bond: UInt64 { s.r.f.ledger.parameters.challengeBond.baseUnits }

    /// accounts + stakes + escrows + held payouts = supply, and supply + burned = genesis supply.
    func conserved() -> Bool {
        let l = s.r.f.ledger
        let total = l.balances.values.reduce(UInt64(0), +) + l.stakes.values.reduce(UInt64(0)) { $0 + $1.amount.baseUnits }
            + l.escrows.values.reduce(UInt64(0)) { $0 + $1.balance.baseUnits } + l.heldPayoutList.reduce(UInt64(0)) { $0 + $1.payout.amount.baseUnits }
        return total == l.totalSupply.baseUnits && l.totalSupply.baseUnits + l.burned.baseUnits == Amount(emc: 2_100_000_000).baseUnits
    }
}

@Suite("Settlement challenges on chain")
struct ChallengeTests {
    // Catches: an inflated leaf that stands (payer overcharged), a slash that pays the challenger more than half,
    // a bond kept on an upheld claim, the reverted part still paid out at finality, and the same fault paid twice.
    @Test("(a) an inflated leaf: the payer's charge is reverted, the router slashed (half burned), the challenger rewarded, and the rest still settles")
    func inflatedLeaf() throws {
        var c = ChallengeFixture()
        let honest = c.receipt(1), inflated = c.receipt(2)
        let worth = inflated.body.cost!  // 1,000 × 1 EMC/1M + 500 × 2 EMC/1M = 0.002 EMC = 200,000 base units
        #expect(worth == 200_000)
        let leaves = [c.leaf(honest), c.leaf(inflated, amount: worth + 50_000)].sorted { $0.key < $1.key }
        try c.settle(leaves)
        #expect(c.s.escrow?.pending.baseUnits == 450_000)
        let stake0 = c.routerStake, carol0 = c.s.balance(c.s.carol), burned0 = c.s.r.f.ledger.burned.baseUnits
        let claim = SettlementClaim.leaf(entry: 0, try c.witness(leaves, 1))
        let outcome = try c.s.r.f.submit(c.challenge(claim, by: c.s.carol)).get()
        let slashed = c.bond + 2 * 50_000
        #expect(outcome.effect == .challengeUpheld(router: c.s.router, batch: 0, code: "fault_amount_mismatch", reverted: Amount(baseUnits: 50_000),
                                                   slashed: Amount(baseUnits: slashed), reward: Amount(baseUnits: slashed / 2), compensation: .zero))
        #expect(c.routerStake == stake0 - slashed)
        #expect(c.s.balance(c.s.carol) == carol0 - c.s.r.f.fee.baseUnits + slashed / 2)  // bond kept, reward paid
        #expect(c.s.r.f.ledger.burned.baseUnits == burned0 + c.s.r.f.fee.baseUnits + (slashed - slashed / 2))
        #expect(c.s.escrow?.pending.baseUnits == 400_000)
        #expect(c.s.r.f.ledger.settlement(SettlementKey(router: c.s.router, batchNumber: 0))?.status == .challenged)
        #expect(c.conserved())
        // The same fault again, even with a freshly signed transaction, pays nothing more.
        #expect(c.s.r.f.submit(c.challenge(claim, by: c.s.r.f.bob)).failure.map { if case .evidenceAlreadyUsed = $0 { true } else { false } } == true)
        // At finality only the honest amounts move.
        for _ in 0..<10 where c.s.r.f.ledger.settlement(SettlementKey(router: c.s.router, batchNumber: 0))?.status == .challenged { c.s.r.f.block() }
        #expect(c.s.r.f.ledger.settlement(SettlementKey(router: c.s.router, batchNumber: 0))?.status == .final)
        #expect(c.s.escrow?.balance.baseUnits == 1_000_000_000 - 400_000 && c.s.escrow?.pending == .zero)
        #expect(c.conserved())
    }

    // Catches: a challenge that costs nothing when wrong (spam stalls settlement), or one that changes the batch.
    @Test("a challenge of an honest leaf is dismissed: the bond is burned and nothing else changes")
    func dismissed() throws {
        var c = ChallengeFixture()
        let leaves = [c.leaf(c.receipt(1)), c.leaf(c.receipt(2))]
        try c.settle(leaves)
        let stake0 = c.routerStake, bob0 = c.s.balance(c.s.r.f.bob), escrow0 = c.s.escrow
        let outcome = try c.s.r.f.submit(c.challenge(.leaf(entry: 0, try c.witness(leaves, 0)), by: c.s.r.f.bob)).get()
        #expect(outcome.effect == .challengeDismissed(router: c.s.router, batch: 0, code: "dismissed_no_fault", bondBurned: Amount(baseUnits: c.bond)))
        #expect(c.s.balance(c.s.r.f.bob) == bob0 - c.bond - c.s.r.f.fee.baseUnits)
        #expect(c.routerStake == stake0 && c.s.escrow == escrow0)
        #expect(c.s.r.f.ledger.settlement(SettlementKey(router: c.s.router, batchNumber: 0))?.status == .pending)
        // A witness for another entry index, and a challenger who cannot post the bond.
        #expect(try c.s.r.f.submit(c.challenge(.leaf(entry: 7, try c.witness(leaves, 0)), by: c.s.r.f.bob)).get().effect
                == .challengeDismissed(router: c.s.router, batch: 0, code: "dismissed_unknown_entry", bondBurned: Amount(baseUnits: c.bond)))
        let pauper = testKey(55)
        #expect(c.s.r.f.submit(c.challenge(.leaf(entry: 0, try c.witness(leaves, 0)), by: pauper)).failure == .insufficientFunds(balance: .zero))
        #expect(c.conserved())
    }

    // Catches: the ledger's receipt check accepting a forged node signature, a receipt of another router, or a
    // price the node never registered; and an honest receipt at the node's previous prices being judged forged.
    @Test("(a) the ledger's receipt check: forged signatures, another router and unregistered prices are upheld; prices the node just replaced are not")
    func receiptCheck() throws {
        var c = ChallengeFixture()
        let badSignature = [UInt8](repeating: 7, count: 64)
        let body = c.receipt(2).bodyBytes
        let forged = try Receipt(bodyBytes: body, nodeSignature: badSignature,
                                 routerSignature: c.s.r.router.sign(body + badSignature, domain: .receiptByRouter))
        let foreign = c.receipt(3, router: testKey(66))
        let unpriced = c.receipt(4, prices: UnitPrices(perMillionPromptTokens: 9_000_000))
        let leaves = [c.leaf(c.receipt(1)), c.leaf(forged, amount: 200_000), c.leaf(foreign), c.leaf(unpriced)]
        try c.settle(leaves)
        // The node replaces its prices after serving: the receipt at the old prices is still a valid leaf.
        let newPrices = PriceList(entries: [PriceEntry(name: "m", perMillionPromptTokens: Amount(emc: 3))])
        #expect(c.s.r.f.submit(c.s.r.f.tx(c.s.r.f.bob, .setPrices(SetPrices(nodeKey: c.s.nodeA.publicKey, prices: newPrices)))).value != nil)
        #expect(try c.s.r.f.submit(c.challenge(.leaf(entry: 0, try c.witness(leaves, 0)), by: c.s.carol)).get().effect
                == .challengeDismissed(router: c.s.router, batch: 0, code: "dismissed_no_fault", bondBurned: Amount(baseUnits: c.bond)))
        for index in 1...3 {
            let outcome = try c.s.r.f.submit(c.challenge(.leaf(entry: 0, try c.witness(leaves, index)), by: c.s.carol)).get()
            guard case .challengeUpheld(_, _, let code, let reverted, _, _, _) = outcome.effect else {
                Issue.record("leaf \(index) was not upheld: \(outcome.effect)"); continue
            }
            #expect(code == "fault_invalid_receipt")
            #expect(reverted.baseUnits == leaves[index].amount)
        }
        #expect(c.s.escrow?.pending.baseUnits == leaves[0].amount)
        #expect(c.conserved())
    }

    // Catches: an omission that goes unpunished (the node loses its pay), compensation paid to the wrong account,
    // and a receipt from outside the batch's range passing as omitted.
    @Test("(c) a countersigned receipt left out: the node owner is made whole out of the slash; one outside the range is dismissed")
    func omission() throws {
        var c = ChallengeFixture()
        let dropped = c.receipt(2, node: c.s.nodeB)
        try c.settle([c.leaf(c.receipt(1))])
        let bob = c.s.r.f.bob, bob0 = c.s.balance(bob)
        let outcome = try c.s.r.f.submit(c.challenge(.omission(receipt: dropped.settlementBytes!, .pairAbsent), by: bob)).get()
        let slashed = c.bond + 2 * 200_000, half = slashed / 2
        #expect(outcome.effect == .challengeUpheld(router: c.s.router, batch: 0, code: "fault_receipt_omitted", reverted: .zero,
                                                   slashed: Amount(baseUnits: slashed), reward: Amount(baseUnits: half - 200_000),
                                                   compensation: Amount(baseUnits: 200_000)))
        #expect(c.s.balance(bob) == bob0 - c.s.r.f.fee.baseUnits + half)  // bob owns node B and challenged
        let late = c.receipt(11, node: c.s.nodeB)
        #expect(try c.s.r.f.submit(c.challenge(.omission(receipt: late.settlementBytes!, .pairAbsent), by: bob)).get().effect
                == .challengeDismissed(router: c.s.router, batch: 0, code: "dismissed_receipt_outside_batch", bondBurned: Amount(baseUnits: c.bond)))
        #expect(c.conserved())
    }

    // Catches: a router (or its owner) collecting the challenger's reward on its own fault, challenges after
    // finality, and challenges of batches that do not exist.
    @Test("the router's owner gets no reward for its own fault; final and unknown settlements cannot be challenged")
    func linkedAndLate() throws {
        var c = ChallengeFixture()
        let leaves = [c.leaf(c.receipt(1, router: testKey(66)))]  // another router's receipt: all of it reverts
        try c.settle(leaves)
        let outcome = try c.s.r.f.submit(c.challenge(.leaf(entry: 0, try c.witness(leaves, 0)), by: c.s.r.f.alice)).get()
        guard case .challengeUpheld(_, _, _, _, let slashed, let reward, _) = outcome.effect else { Issue.record("\(outcome.effect)"); return }
        #expect(slashed.baseUnits == c.bond + 2 * 200_000 && reward == .zero)
        let unknown = c.s.r.f.tx(c.s.carol, .challengeSettlement(SettlementChallenge(router: c.s.router, batchNumber: 5,
                                                                                    claim: .leaf(entry: 0, try c.witness(leaves, 0)))))
        #expect(c.s.r.f.submit(unknown).failure == .unknownSettlement(router: c.s.router, batch: 5))
        for _ in 0..<9 { c.s.r.f.block() }
        let final = try #require(c.s.r.f.ledger.settlement(SettlementKey(router: c.s.router, batchNumber: 0)))
        #expect(final.status == .reverted)  // its only entry was fully reverted
        #expect(c.s.r.f.submit(c.challenge(.leaf(entry: 0, try c.witness(leaves, 0)), by: c.s.carol)).failure
                == .challengeWindowClosed(router: c.s.router, batch: 0, finalAtHeight: final.finalAtHeight))
        #expect(c.conserved())
    }

    // Catches: a challenge encoding that does not round-trip, or hostile challenge bytes that trap the decoder or
    // the ledger (every claim kind, mutated, truncated and extended).
    @Test("challenge transactions round-trip; mutated bytes never trap the decoder or the ledger")
    func encoding() throws {
        var c = ChallengeFixture()
        let leaves = [c.leaf(c.receipt(1)), c.leaf(c.receipt(2))]
        try c.settle(leaves)
        let w0 = try c.witness(leaves, 0), w1 = try c.witness(leaves, 1)
        let path = try #require(try SettlementBatchBuilder.pairTree(leaves: leaves).preimagePath(at: 0))
        let claims: [SettlementClaim] = [.leaf(entry: 0, w0), .duplicate(entry: 0, w0, otherEntry: 0, w1), .sums(entry: 0, path: path),
                                         .order(entry: 0, w0, w1), .omission(receipt: c.receipt(3).settlementBytes!, .between(w0, w1))]
        var rng = SeededRandom(seed: 99)
        for claim in claims {
            let tx = c.challenge(claim, by: c.s.carol)
            #expect(try Transaction(decoding: tx.encoded) == tx)
            #expect(claim.name.isEmpty == false)
            for _ in 0..<150 {
                var bytes = tx.encoded
                let at = Int.random(in: 0..<bytes.count, using: &rng)
                switch Int.random(in: 0..<3, using: &rng) {
                case 0: bytes[at] ^= UInt8.random(in: 1...255, using: &rng)
                case 1: bytes = Array(bytes.prefix(at))
                default: bytes.insert(UInt8.random(in: 0...255, using: &rng), at: at)
                }
                var ledger = c.s.r.f.ledger
                _ = ledger.apply(bytes: bytes, context: BlockContext(height: ledger.height + 1, timeMillis: c.s.r.f.now))
            }
        }
        var writer = ByteWriter()
        writer.write(UInt8(3)); writer.write(UInt32(0)); writer.write(UInt8(41))
        #expect(throws: DecodingError.self) { try SettlementClaim(canonicalBytes: writer.bytes) }
    }
}
