import EdgeMatrixCore
import Foundation
@testable import EdgeMatrixLedger
import Testing

/// ChallengeFixture (router 90 owned by alice, fee 250 bps; compute nodes 91/92 owned by bob, priced; carol's escrow of
/// 10 EMC; challenge window 8, audit window 4, protocol fee 500 bps) with a settlement deadline of 6 blocks.
struct NodeSettleFixture {
    var c: ChallengeFixture

    init(deadline: UInt64 = 6) { c = ChallengeFixture(settlementDeadlineBlocks: deadline) }
    var f: Fixture { c.s.r.f }
    var router: PublicKey { c.s.router }
    var carolAccount: Account { Account(owner: c.s.carol.publicKey) }
    /// 1,000 prompt and 500 completion tokens at 1 and 2 EMC per 1M: 200,000 base units; 5% burned: 10,000.
    static let worth: UInt64 = 200_000
    static let protocolFee: UInt64 = 10_000

    /// A countersigned receipt of `payer` (carol by default) served by `node` (91 by default).
    func receipt(_ sequence: UInt64, payer: SigningKey? = nil, node: SigningKey? = nil, attempt: UInt32 = 1, prompt: UInt64 = 1_000,
                 completion: UInt64 = 500, prices: UnitPrices? = nil, router: SigningKey? = nil) -> Receipt {
        let node = node ?? c.s.nodeA
        let router = router ?? c.s.r.router
        let body = ReceiptBody(payer: Account(owner: (payer ?? c.s.carol).publicKey), router: router.publicKey, node: node.publicKey,
                               sequence: sequence, attempt: attempt, app: "llm", model: "m", prices: prices ?? c.unitPrices,
                               units: WorkUnits(promptTokens: prompt, completionTokens: completion), startedAtMillis: 1, endedAtMillis: 2,
                               requestHash: Hash32.of(Array("\(sequence)".utf8)), responseHash: Hash32.of([2]), status: 200)
        var receipt = Receipt(signing: body, with: node)
        try! receipt.countersign(nodeKey: node.publicKey, routerKey: router)
        return receipt
    }

    func notice(_ receipts: [Receipt], node: SigningKey? = nil, signer: SigningKey? = nil, router: PublicKey? = nil) throws -> Transaction {
        let node = node ?? c.s.nodeA
        let settle = try NodeSettlement(router: router ?? self.router, node: node.publicKey, receipts: receipts.map { $0.settlementBytes! })
        return f.tx(signer ?? node, .nodeSettle(settle))
    }

    func notice(bytes: [[UInt8]]) throws -> Transaction {
        f.tx(c.s.nodeA, .nodeSettle(try NodeSettlement(router: router, node: c.s.nodeA.publicKey, receipts: bytes)))
    }

    mutating func submit(_ tx: Transaction) -> TxResult { c.s.r.f.submit(tx) }
    mutating func block() -> BlockResult { c.s.r.f.block() }
    var ledger: LedgerState { f.ledger }
    var escrow: Escrow? { ledger.escrow(payer: carolAccount, router: router) }
    func balance(_ key: SigningKey) -> UInt64 { ledger.balance(of: Account(owner: key.publicKey)).baseUnits }

    /// Applies `tx` to a copy in the next block's context: the refusal, and whether the state root stayed the same.
    func refusal(_ tx: Transaction) -> (LedgerError?, unchanged: Bool) {
        var copy = ledger
        let before = copy.stateRoot()
        let result = copy.apply(tx, context: BlockContext(height: f.height + 1, timeMillis: f.now))
        return (result.failure, copy.stateRoot() == before)
    }

    /// The leaves of `receipts` for a router batch.
    func leaves(_ receipts: [Receipt]) -> [SettlementLeaf] { receipts.map { c.leaf($0) }.sorted { $0.key < $1.key } }
}

@Suite("Node settlement (kind 14): nodes settle their own receipts when the router does not")
struct NodeSettleTests {
    // Catches: a notice that does not hold the payer's escrow (the payer could withdraw from under it), a notice that
    // still charges after the router settled the same receipts (payer charged twice), a router defaulted although its
    // batch covered the notice, and a lapsed notice that can be filed again.
    @Test("a notice moves the receipts' worth to pending; the router's batch covering them lapses it, the escrow is charged once and the router is not defaulted")
    func noticeLapsesWhenRouterSettles() throws {
        var n = NodeSettleFixture()
        let r1 = n.receipt(1), r2 = n.receipt(2)
        let bob0 = n.balance(n.f.bob), fee = n.f.fee.baseUnits
        let noticedAt = n.f.height + 1
        let outcome = try n.submit(try n.notice([r1, r2])).get()
        #expect(outcome.effect == .receiptsNoticed(router: n.router, node: n.c.s.nodeA.publicKey, receipts: 2,
                                                  amount: Amount(baseUnits: 2 * NodeSettleFixture.worth),
                                                  charged: Amount(baseUnits: 2 * NodeSettleFixture.worth), dueAtHeight: noticedAt + 6))
        #expect(n.balance(n.f.bob) == bob0 - fee, "the fee is the node owner's")
        #expect(n.escrow?.pending == Amount(baseUnits: 2 * NodeSettleFixture.worth))
        #expect(n.ledger.openNoticeCount(router: n.router) == 2)
        #expect(n.ledger.receiptNotices(router: n.router).map(\.status) == [.open, .open])

        // The router settles batch 0 over 1...10 with both receipts: the notices lapse, pending is the batch alone.
        try n.c.settle(n.leaves([r1, r2]))
        #expect(n.escrow?.pending == Amount(baseUnits: 2 * NodeSettleFixture.worth))
        #expect(n.ledger.receiptNotices(router: n.router).isEmpty && n.ledger.openNoticeCount(router: n.router) == 0)
        // Past the deadline: no default; the noticed sequences are below the cursor now.
        for _ in 0..<8 { #expect(n.block().events.allSatisfy { if case .routerDefaulted = $0 { false } else { true } }) }
        #expect(n.ledger.routerDefaultHeight(n.router) == nil)
        #expect(n.refusal(try n.notice([r1])).0.map(code) == NodeSettleRefusal.belowCursor)
    }

    // Catches: nodes paid other than worth − protocol fee (to the base unit), a router fee paid to a router that did
    // not settle, the payer's escrow debited other than the worth, money moved before the deadline or paid before the
    // audit window, a defaulted router that can still settle (double payment) or take escrow, and a notice after the
    // default that waits for a deadline nobody will meet.
    @Test("a router that misses the deadline defaults: node owner gets exactly worth − protocol fee after the audit window, the router nothing, the escrow pays the worth; its settle and new escrows are refused; later notices settle at once")
    func defaultPaysNodes() throws {
        var n = NodeSettleFixture()
        let w = NodeSettleFixture.worth, pfee = NodeSettleFixture.protocolFee, fee = n.f.fee.baseUnits
        let alice0 = n.balance(n.f.alice), bob0 = n.balance(n.f.bob), escrow0 = n.escrow!.balance.baseUnits
        let noticedAt = n.f.height + 1
        _ = try n.submit(try n.notice([n.receipt(1), n.receipt(2, attempt: 0)])).get()
        let burned0 = n.ledger.burned.baseUnits
        // Nothing moves before the end of block noticedAt + 6.
        while n.f.height < noticedAt + 5 { #expect(n.block().events.isEmpty) }
        #expect(n.escrow?.balance.baseUnits == escrow0 && n.ledger.routerDefaultHeight(n.router) == nil)
        let defaultBlock = n.block()
        #expect(n.f.height == noticedAt + 6)
        #expect(defaultBlock.events == [.routerDefaulted(router: n.router, receipts: 2, paid: Amount(baseUnits: 2 * w), burned: Amount(baseUnits: 2 * pfee))])
        #expect(n.ledger.routerDefaultHeight(n.router) == noticedAt + 6)
        #expect(!n.ledger.isEligible(n.router), "compute nodes joining must not pick a defaulted router")
        #expect(n.escrow?.balance.baseUnits == escrow0 - 2 * w && n.escrow?.pending == .zero, "the escrow pays exactly the worth")
        #expect(n.ledger.burned.baseUnits == burned0 + 2 * pfee, "only the protocol fee is burned")
        #expect(n.ledger.receiptNotices(router: n.router).allSatisfy { $0.status == .settled && $0.settledAtHeight == noticedAt + 6 })
        // Held for the audit window (4 blocks), then paid to bob (the node owner); alice (the router owner) gets nothing.
        for _ in 0..<3 { n.block() }
        #expect(n.balance(n.f.bob) == bob0 - fee)
        let release = n.block()
        #expect(release.events.count == 2 && release.events.allSatisfy { $0.settlement?.batchNumber == SettlementKey.nodeSettledBatch })
        #expect(n.balance(n.f.bob) == bob0 - fee + 2 * (w - pfee), "node owner: exactly worth − protocol fee")
        #expect(n.balance(n.f.alice) == alice0, "the router owner earns nothing")
        #expect(n.ledger.earnings(node: n.c.s.nodeA.publicKey).reduce(0) { $0 + $1.asNode } == 2 * (w - pfee))
        #expect(n.ledger.earnings(node: n.router).allSatisfy { $0.asRouter == 0 })
        #expect(n.c.conserved())

        // The router can no longer settle (not even the receipts its nodes did not notice), nor take new escrow.
        let batch = try SettlementBatchBuilder.build(router: n.router, batchNumber: 0, sequenceRange: 1...10,
                                                     leaves: n.leaves([n.receipt(1), n.receipt(3)]))
        #expect(n.refusal(n.c.s.settle(batch)).0 == .routerDefaulted(router: n.router, atHeight: noticedAt + 6))
        #expect(n.refusal(n.c.s.r.open(n.f.alice, emc("1"))).0 == .routerDefaulted(router: n.router, atHeight: noticedAt + 6))

        // A receipt noticed after the default settles in its own block (node share held for the audit window).
        let later = n.f.height + 1
        let outcome = try n.submit(try n.notice([n.receipt(3)])).get()
        #expect(outcome.effect == .receiptsNoticed(router: n.router, node: n.c.s.nodeA.publicKey, receipts: 1, amount: Amount(baseUnits: w),
                                                  charged: Amount(baseUnits: w), dueAtHeight: nil))
        #expect(n.escrow?.balance.baseUnits == escrow0 - 3 * w)
        #expect(n.ledger.receiptNotice(ReceiptNoticeKey(router: n.router, sequence: 3, attempt: 1))?.settledAtHeight == later)
        for _ in 0..<4 { n.block() }
        #expect(n.balance(n.f.bob) == bob0 - 2 * fee + 3 * (w - pfee))
        // Sent again (say, after a restart): refused as already noticed, nothing changes.
        let again = n.refusal(try n.notice([n.receipt(3)]))
        #expect(again.0.map(code) == NodeSettleRefusal.alreadyNoticed && again.unchanged)
        #expect(n.c.conserved())
    }

    // Catches: a payer who escapes a notice by withdrawing the escrow before the deadline (the node unpaid), and a
    // charge above what the escrow holds (a negative escrow or minted money).
    @Test("a payer cannot withdraw what a notice holds, and a notice charges at most what the escrow has available")
    func withdrawalAndShortEscrow() throws {
        // A deadline (30) beyond the withdrawal delay (epoch 10 + challenge window 8): the withdrawal comes due first.
        var n = NodeSettleFixture(deadline: 30)
        let w = NodeSettleFixture.worth, pfee = NodeSettleFixture.protocolFee
        _ = try n.submit(try n.notice([n.receipt(1)])).get()
        _ = try n.submit(n.c.s.r.withdraw(n.c.s.carol)).get()
        let due = try #require(n.escrow?.withdrawableAtHeight)
        while n.f.height < due { n.block() }
        #expect(n.escrow?.balance.baseUnits == w && n.escrow?.pending.baseUnits == w, "the withdrawal left what the notice holds")
        #expect(n.ledger.routerDefaultHeight(n.router) == nil)
        while n.ledger.routerDefaultHeight(n.router) == nil || n.escrow?.withdrawableAtHeight != nil, n.f.height < 80 { n.block() }
        #expect(n.ledger.routerDefaultHeight(n.router) != nil)
        #expect(n.escrow == nil, "the withdrawal returned the rest; the notice's charge was paid")
        for _ in 0..<5 { n.block() }
        #expect(n.ledger.earnings(node: n.c.s.nodeA.publicKey).reduce(0) { $0 + $1.asNode } == w - pfee)

        // alice opens 0.001 EMC (100,000 base units) with a fresh router fixture: the notice of a 200,000 receipt charges 100,000.
        var m = NodeSettleFixture()
        _ = try m.submit(m.c.s.r.open(m.f.alice, Amount(baseUnits: 100_000))).get()
        let outcome = try m.submit(try m.notice([m.receipt(1, payer: m.f.alice)])).get()
        #expect(outcome.effect == .receiptsNoticed(router: m.router, node: m.c.s.nodeA.publicKey, receipts: 1, amount: Amount(baseUnits: w),
                                                  charged: Amount(baseUnits: 100_000), dueAtHeight: m.f.height + 6))
        for _ in 0..<6 { m.block() }
        #expect(m.ledger.escrow(payer: Account(owner: m.f.alice.publicKey), router: m.router) == nil, "the escrow paid all it had, no more")
        #expect(m.ledger.routerDefaultHeight(m.router) != nil)
        #expect(m.c.conserved())
    }

    // Catches: a forged, altered or foreign receipt paid out of a payer's escrow, the same request paid twice, a
    // receipt the router already settled paid again, a mispriced receipt, spam without cost, and a refused notice
    // that changes state (each case must leave the state root as it was).
    @Test("bad notices are refused with a stable code and change nothing")
    func badNoticesRefused() throws {
        var n = NodeSettleFixture()
        let good = n.receipt(5)
        var bytes = good.settlementBytes!
        func refused(_ tx: Transaction, _ expected: String, _ comment: Comment? = nil) {
            let (error, unchanged) = n.refusal(tx)
            #expect(error.map(code) == expected, comment)
            #expect(unchanged, "a refused notice changed the state: \(expected)")
        }
        // Bad node signature: a flipped bit in the node's signature (just before the router's 64 bytes).
        bytes[bytes.count - 100] ^= 1
        refused(try n.notice(bytes: [bytes]), "receipt_bad_node_signature")
        // Bad countersignature: a flipped bit in the router's signature.
        bytes = good.settlementBytes!
        bytes[bytes.count - 1] ^= 1
        refused(try n.notice(bytes: [bytes]), "receipt_bad_router_signature")
        // Not a receipt at all.
        refused(try n.notice(bytes: [Array(repeating: 7, count: 200)]), "receipt_malformed")
        // Another router's receipt (countersigned by that router), filed against this router.
        let stranger = testKey(99)
        refused(try n.notice([n.receipt(5, router: stranger)]), "receipt_wrong_router")
        // Another node's receipt in node A's notice.
        refused(try n.notice([n.receipt(5, node: n.c.s.nodeB)]), NodeSettleRefusal.wrongNode)
        // Prices other than the registered ones (amount ≠ units × registered price).
        refused(try n.notice([n.receipt(5, prices: UnitPrices(perMillionPromptTokens: 500_000_000, perMillionCompletionTokens: 200_000_000))]),
                "receipt_unregistered_price")
        // Worth nothing; worth more than 2^64 − 1 base units.
        refused(try n.notice([n.receipt(5, prompt: 0, completion: 0)]), NodeSettleRefusal.zeroAmount)
        refused(try n.notice([n.receipt(5, prompt: .max, completion: .max)]), "receipt_cost_overflow")
        // A payer without an escrow with this router (bob has none).
        refused(try n.notice([n.receipt(5, payer: n.f.bob)]), NodeSettleRefusal.noEscrow)
        // The same request twice in one notice; the same request for two payers.
        refused(try n.notice([good, good]), NodeSettleRefusal.alreadyNoticed)
        _ = try n.submit(n.c.s.r.open(n.f.alice, emc("1"))).get()
        refused(try n.notice([good, n.receipt(5, payer: n.f.alice, attempt: 2)]), NodeSettleRefusal.otherPayer)
        // Sequence 0 is below every cursor (sequences start at 1).
        refused(try n.notice([n.receipt(0)]), NodeSettleRefusal.belowCursor)
        // Signed by someone who is neither the node nor its owner; for a node that is a router; for an unknown router.
        #expect(n.refusal(try n.notice([good], signer: n.f.alice)).0 == .notNodeOwner(nodeKey: n.c.s.nodeA.publicKey))
        #expect(n.refusal(try n.notice([good], router: testKey(98).publicKey)).0 == .unknownNode(nodeKey: testKey(98).publicKey))
        #expect(n.refusal(try n.notice([n.receipt(5, node: n.c.s.r.router)], node: n.c.s.r.router)).0
                == .wrongNodeRole(nodeKey: n.router, role: .router, expected: .compute))
        // One bad receipt refuses the whole notice.
        refused(try n.notice([good, n.receipt(6, prompt: 0, completion: 0)]), NodeSettleRefusal.zeroAmount)

        // Extreme integers that are valid: the last sequence number and attempt are accepted, the deadline computed.
        let edge = n.receipt(.max, attempt: .max)
        let outcome = try n.submit(try n.notice([edge])).get()
        #expect(outcome.effect == .receiptsNoticed(router: n.router, node: n.c.s.nodeA.publicKey, receipts: 1,
                                                  amount: Amount(baseUnits: NodeSettleFixture.worth),
                                                  charged: Amount(baseUnits: NodeSettleFixture.worth), dueAtHeight: n.f.height + 6))
        // Already noticed.
        refused(try n.notice([edge]), NodeSettleRefusal.alreadyNoticed)
        // The receipt's range already settled by the router: below the cursor.
        try n.c.settle(n.leaves([n.receipt(3)]))
        refused(try n.notice([n.receipt(4)]), NodeSettleRefusal.belowCursor)
    }

    // Catches: an unbounded notice (a block's work or a validator's memory at an attacker's choice) and a decoder
    // that allocates before checking counts.
    @Test("a notice holds 1 to 64 receipts of at most 64 KiB; larger or empty ones do not decode")
    func bounds() throws {
        let n = NodeSettleFixture()
        let good = n.receipt(1).settlementBytes!
        #expect(throws: EdgeMatrixCore.DecodingError.self) { try NodeSettlement(router: n.router, node: n.c.s.nodeA.publicKey, receipts: []) }
        #expect(throws: EdgeMatrixCore.DecodingError.self) {
            try NodeSettlement(router: n.router, node: n.c.s.nodeA.publicKey, receipts: Array(repeating: good, count: NodeSettlement.maxReceipts + 1))
        }
        #expect(throws: EdgeMatrixCore.DecodingError.self) {
            try NodeSettlement(router: n.router, node: n.c.s.nodeA.publicKey, receipts: [Array(repeating: 1, count: SettlementBatch.maxReceiptBytes + 1)])
        }
        // A hand-made body claiming 2^32 − 1 receipts is refused while decoding, before anything is read.
        var writer = ByteWriter()
        writer.write(TransactionBody.version)
        writer.write(Fixture.chainID)
        writer.write(n.f.now)
        writer.write(UInt8(14))
        n.router.encode(to: &writer)
        n.c.s.nodeA.publicKey.encode(to: &writer)
        writer.write(UInt32.max)
        let body = writer.bytes
        #expect(throws: TransactionDecodingError.self) {
            try Transaction(bodyBytes: body, signer: n.c.s.nodeA.publicKey, signature: n.c.s.nodeA.sign(body, domain: .transaction))
        }
        // The canonical encoding round-trips, byte for byte.
        let tx = try n.notice([n.receipt(1), n.receipt(2)])
        let decoded = try Transaction(decoding: tx.encoded)
        #expect(decoded.body == tx.body && decoded.bodyBytes == tx.bodyBytes)
        #expect(Array(tx.bodyBytes[(1 + 4 + Fixture.chainID.utf8.count + 8)...].prefix(1)) == [14])
    }

    // Catches: notices or defaults that depend on dictionary order or anything but the blocks (two validators would
    // disagree on the state root), and notices left out of the state root.
    @Test("determinism: the same blocks give the same state root, and notices and defaults are part of it")
    func determinism() throws {
        func run(notice: Bool) throws -> [Hash32] {
            var n = NodeSettleFixture()
            _ = try n.submit(n.c.s.r.open(n.f.alice, emc("1"))).get()
            var roots = [Hash32]()
            if notice {
                let txs = [try n.notice([n.receipt(4), n.receipt(2)]), try n.notice([n.receipt(3, payer: n.f.alice, node: n.c.s.nodeB)], node: n.c.s.nodeB)]
                roots.append(n.c.s.r.f.block(txs).stateRoot)
            } else {
                roots.append(n.block().stateRoot)
            }
            for _ in 0..<12 { roots.append(n.block().stateRoot) }
            return roots
        }
        let a = try run(notice: true), b = try run(notice: true), none = try run(notice: false)
        #expect(a == b)
        #expect(zip(a, none).allSatisfy { $0 != $1 })
    }
}

private func code(_ error: LedgerError) -> String {
    if case .receiptRefused(_, let code, _) = error { return code }
    return error.kind
}

