import EdgeMatrixCore
import Foundation
@testable import EdgeMatrixLedger
import Testing

/// A router (key 90, owned by alice, fee 250 bps), compute nodes owned by bob, and carol as a funded payer with an
/// escrow of 10 EMC. Challenge window 3 blocks, audit window 4, epoch 10.
struct SettleFixture {
    var r: RouterFixture
    let nodeA = testKey(91)
    let nodeB = testKey(92)
    var carol: SigningKey { r.f.carol }
    var router: PublicKey { r.router.publicKey }

    init(challengeWindowBlocks: UInt64 = 3, settlementDeadlineBlocks: UInt64 = 3_600) {
        r = RouterFixture {
            $0.challengeWindowBlocks = challengeWindowBlocks; $0.auditWindowBlocks = 4; $0.protocolFeeBps = 500
            $0.settlementDeadlineBlocks = settlementDeadlineBlocks
        }
        precondition(r.f.submit(r.f.transfer(r.f.alice, to: Account(owner: r.f.carol.publicKey), emc("100"))).value != nil)
        for node in [nodeA, nodeB] { register(node, owner: r.f.bob) }
        precondition(r.f.submit(r.f.tx(r.f.alice, .setRouterFee(SetRouterFee(nodeKey: router, feeBps: 250)))).value != nil)
        precondition(r.f.submit(r.open(r.f.carol, emc("10"))).value != nil)
    }

    mutating func register(_ node: SigningKey, owner: SigningKey) {
        let bond = r.f.submit(r.f.tx(owner, .bond(Bond(role: .compute, amount: Amount(emc: 500), lockDays: 30))))
        guard case .bonded(let id) = bond.value?.effect else { fatalError("compute bond failed: \(bond)") }
        let statement = NodeRegistrationStatement(chainID: Fixture.chainID, owner: owner.publicKey, nodeKey: node.publicKey,
                                                  role: .compute, endpoints: [], stakeID: id)
        precondition(r.f.submit(r.f.tx(owner, .registerNode(NodeRegistration(statement: statement, nodeKey: node)))).value != nil)
    }

    /// A batch with one entry per (payer, node, amount), each of `count` synthetic leaves sharing the amount.
    func batch(number: UInt64 = 0, sequences: ClosedRange<UInt64> = 1...10, router: PublicKey? = nil,
               _ entries: [(payer: SigningKey, node: PublicKey, amount: UInt64)]) throws -> SettlementBatch {
        var leaves = [SettlementLeaf]()
        var sequence = sequences.lowerBound
        for entry in entries {
            let key = SettlementLeafKey(payer: Account(owner: entry.payer.publicKey), node: entry.node, sequence: sequence, attempt: 1)
            leaves.append(SettlementLeaf(key: key, receiptBytes: Array("receipt \(sequence)".utf8), amount: entry.amount))
            sequence += 1
        }
        leaves.sort { $0.key < $1.key }
        return try SettlementBatchBuilder.build(router: router ?? self.router, batchNumber: number, sequenceRange: sequences, leaves: leaves)
    }

    func settle(_ batch: SettlementBatch, signer: SigningKey? = nil) -> Transaction { r.f.tx(signer ?? r.router, .settle(batch)) }
    func balance(_ key: SigningKey) -> UInt64 { r.f.ledger.balance(of: Account(owner: key.publicKey)).baseUnits }
    var escrow: Escrow? { r.escrow(carol) }
}

@Suite("Settle transactions")
struct SettleTests {
    // Catches: a split that rounds in the router's favour, a fee taken from the wrong account, money moved before
    // the challenge window or released before the audit window, escrow not charged, a payout to the wrong owner.
    @Test("a settlement charges escrow at once, pays router fee and burns the protocol fee after the challenge window, pays the node after the audit window")
    func happyPath() throws {
        var s = SettleFixture()
        let amount: UInt64 = 1_000_003  // 500 bps → 50,000 burned; 250 bps → 25,000 router fee; node 925,003
        let batch = try s.batch([(s.carol, s.nodeA.publicKey, amount)])
        let alice0 = s.balance(s.r.f.alice), bob0 = s.balance(s.r.f.bob), burned0 = s.r.f.ledger.burned.baseUnits
        let includedAt = s.r.f.height + 1
        let outcome = try s.r.f.submit(s.settle(batch)).get()
        #expect(outcome.effect == .settled(router: s.router, batch: 0, total: Amount(baseUnits: amount), finalAtHeight: includedAt + 3))
        // The router owner pays the transaction fee even though the router node signed.
        #expect(s.balance(s.r.f.alice) == alice0 - s.r.f.fee.baseUnits)
        #expect(s.escrow?.pending.baseUnits == amount)
        #expect(s.escrow?.balance == emc("10"))
        #expect(s.r.f.ledger.settlementCursor(router: s.router) == SettlementCursor(nextBatch: 1, nextSequence: 11))
        let record = try #require(s.r.f.ledger.settlement(SettlementKey(router: s.router, batchNumber: 0)))
        #expect(record.status == .pending && record.receiptCount == 1 && record.pairCount == 1 && record.total.baseUnits == amount)
        #expect(record.epoch == includedAt / 10 && record.tx == outcome.id && record.routerFeeBps == 250 && record.protocolFeeBps == 500)

        // Nothing moves inside the challenge window.
        while s.r.f.height < includedAt + 2 { #expect(s.r.f.block().events.isEmpty) }
        #expect(s.balance(s.r.f.alice) == alice0 - s.r.f.fee.baseUnits)
        let final = s.r.f.block()
        let key = SettlementKey(router: s.router, batchNumber: 0)
        #expect(final.events == [.settlementFinal(key, total: Amount(baseUnits: amount), routerFees: Amount(baseUnits: 25_000),
                                                  burned: Amount(baseUnits: 50_000))])
        #expect(s.balance(s.r.f.alice) == alice0 - s.r.f.fee.baseUnits + 25_000)
        #expect(s.r.f.ledger.burned.baseUnits == burned0 + s.r.f.fee.baseUnits + 50_000)
        #expect(s.escrow?.balance.baseUnits == 1_000_000_000 - amount && s.escrow?.pending == .zero)
        #expect(s.r.f.ledger.settlement(key)?.status == .final)
        #expect(s.r.f.ledger.settlement(key)?.entries.isEmpty == true)
        #expect(s.balance(s.r.f.bob) == bob0)  // held for the audit window
        #expect(s.r.f.ledger.heldPayoutList.map(\.payout.amount.baseUnits) == [925_003])
        let epoch = record.epoch
        #expect(s.r.f.ledger.earnings(node: s.nodeA.publicKey) == [NodeEarnings(epoch: epoch, asNode: 925_003, asRouter: 0, held: 925_003, receipts: 1)])
        #expect(s.r.f.ledger.earnings(node: s.router) == [NodeEarnings(epoch: epoch, asNode: 0, asRouter: 25_000, held: 0, receipts: 0)])

        for _ in 0..<3 { #expect(s.r.f.block().events.isEmpty) }
        let release = s.r.f.block()
        #expect(release.events.count == 1 && release.events.first?.settlement == key)
        #expect(s.balance(s.r.f.bob) == bob0 + 925_003)
        #expect(s.r.f.ledger.heldPayoutList.isEmpty)
        #expect(s.r.f.ledger.earnings(node: s.nodeA.publicKey).first?.held == 0)
    }

    // Catches: a double settlement of a sequence range, a gap in batch numbers or sequences, a batch that partly
    // charges (one payer's escrow short refuses the whole batch), and anyone but the router or its owner settling.
    @Test("settle refuses out-of-order batches, overlapping ranges, short escrows, strangers and non-compute entries, changing nothing")
    func refusals() throws {
        var s = SettleFixture()
        let nodeA = s.nodeA.publicKey
        let escrow0 = s.escrow
        let expected0 = SettlementCursor.initial
        func outOfOrder(_ batch: UInt64, _ first: UInt64, _ cursor: SettlementCursor) -> LedgerError {
            .settlementOutOfOrder(router: s.router, expected: cursor, gotBatch: batch, gotFirstSequence: first)
        }
        #expect(s.r.f.ledger.check(s.settle(try s.batch(number: 1, [(s.carol, nodeA, 5)])), context: ctx(s)) == outOfOrder(1, 1, expected0))
        #expect(s.r.f.ledger.check(s.settle(try s.batch(sequences: 2...10, [(s.carol, nodeA, 5)])), context: ctx(s)) == outOfOrder(0, 2, expected0))
        // More than carol's escrow holds, alongside an entry that alone would fit: nothing is charged.
        let alice = s.r.f.alice
        #expect(s.r.f.submit(s.r.open(alice, emc("1"))).value != nil)
        let short = try s.batch([(s.carol, nodeA, 1_000_000_001), (alice, nodeA, 10)])
        #expect(s.r.f.submit(s.settle(short)).failure == .escrowInsufficient(
            payer: Account(owner: s.carol.publicKey), router: s.router, available: emc("10"), needed: Amount(baseUnits: 1_000_000_001)))
        #expect(s.escrow == escrow0 && s.r.escrow(alice)?.pending == .zero)
        // Two entries of one payer are charged together: each fits alone, together they do not.
        let split = try s.batch([(s.carol, nodeA, 600_000_000), (s.carol, s.nodeB.publicKey, 600_000_000)])
        #expect(s.r.f.submit(s.settle(split)).failure == .escrowInsufficient(
            payer: Account(owner: s.carol.publicKey), router: s.router, available: emc("10"), needed: Amount(baseUnits: 1_200_000_000)))
        // Signed by a stranger (bob owns compute nodes, not the router).
        #expect(s.r.f.submit(s.settle(try s.batch([(s.carol, nodeA, 5)]), signer: s.r.f.bob)).failure == .notNodeOwner(nodeKey: s.router))
        // An entry for the router itself (not a compute node), for an unknown node, and a batch of a compute node.
        #expect(s.r.f.submit(s.settle(try s.batch([(s.carol, s.router, 5)]))).failure
                == .wrongNodeRole(nodeKey: s.router, role: .router, expected: .compute))
        #expect(s.r.f.submit(s.settle(try s.batch([(s.carol, testKey(77).publicKey, 5)]))).failure == .unknownNode(nodeKey: testKey(77).publicKey))
        #expect(s.r.f.submit(s.settle(try s.batch(router: nodeA, [(s.carol, nodeA, 5)]), signer: s.r.f.bob)).failure
                == .wrongNodeRole(nodeKey: nodeA, role: .compute, expected: .router))
        #expect(s.escrow == escrow0 && s.r.f.ledger.settlements().isEmpty)
        #expect(s.r.f.ledger.settlementCursor(router: s.router) == expected0)

        // The right batch goes through; the same range again, or the same batch number, is refused.
        #expect(s.r.f.submit(s.settle(try s.batch([(s.carol, nodeA, 5)]))).value != nil)
        let next = SettlementCursor(nextBatch: 1, nextSequence: 11)
        #expect(s.r.f.submit(s.settle(try s.batch([(s.carol, nodeA, 7)]))).failure == outOfOrder(0, 1, next))
        #expect(s.r.f.submit(s.settle(try s.batch(number: 1, sequences: 5...20, [(s.carol, nodeA, 7)]))).failure == outOfOrder(1, 5, next))
        // An empty batch advances the range (requests that all failed before their first byte).
        let empty = try SettlementBatch(router: s.router, batchNumber: 1, firstSequence: 11, lastSequence: 12, entries: [])
        #expect(s.r.f.submit(s.settle(empty)).value != nil)
        #expect(s.r.f.ledger.settlementCursor(router: s.router) == SettlementCursor(nextBatch: 2, nextSequence: 13))
        #expect(s.r.f.ledger.settlements(router: s.router).map(\.total.baseUnits) == [5, 0])
        #expect(s.r.f.ledger.settlements(router: s.router).map(\.receiptCount) == [1, 0])
    }

    func ctx(_ s: SettleFixture) -> BlockContext { BlockContext(height: s.r.f.height + 1, timeMillis: s.r.f.now) }

    // Catches: a protocol fee raised by governance pushing the node share below 0 (the min), and rounding that
    // ever gives the router or the burn more than the floor.
    @Test("the split always adds up to the amount, rounds both fees down, and never goes negative", arguments: 0..<200)
    func split(seed: Int) {
        var rng = SeededRandom(seed: UInt64(seed))
        let amount = seed < 3 ? [0, 1, UInt64.max][seed] : UInt64.random(in: 0...UInt64.max, using: &rng)
        let router = UInt32.random(in: 0...12_000, using: &rng), proto = UInt32.random(in: 0...12_000, using: &rng)
        let s = SettlementSplit(amount: amount, routerFeeBps: router, protocolFeeBps: proto)
        #expect(s.protocolFee &+ s.routerFee &+ s.node == amount)
        #expect(s.protocolFee <= amount && s.routerFee <= amount - s.protocolFee)
        let exact = { (bps: UInt32) in (amount.multipliedFullWidth(by: UInt64(min(bps, 10_000)))) }
        let floorProto = UInt64(10_000).dividingFullWidth(exact(proto)).quotient
        let floorRouter = UInt64(10_000).dividingFullWidth(exact(router)).quotient
        #expect(s.protocolFee == floorProto)
        #expect(s.routerFee == min(floorRouter, amount - floorProto))
    }

    // Catches: money created or destroyed anywhere between inclusion, finality and release (escrow, held payouts,
    // balances and burned must always add up to the supply), and a state root that misses settlement state.
    @Test("random settlements: accounts + stakes + escrow + held payouts + burned is the genesis supply at every block; roots are reproducible")
    func conservation() throws {
        func run() throws -> [Hash32] {
            var s = SettleFixture()
            var rng = SeededRandom(seed: 11)
            var roots = [Hash32]()
            var nextSequence: UInt64 = 1
            var number: UInt64 = 0
            for _ in 0..<40 {
                var txs = [Transaction]()
                if Bool.random(using: &rng), let available = s.escrow?.available.baseUnits, available > 10 {
                    let width = UInt64.random(in: 2...5, using: &rng)
                    let range = nextSequence...(nextSequence + width)
                    let a = UInt64.random(in: 0...available / 4, using: &rng), b = UInt64.random(in: 0...available / 4, using: &rng)
                    txs.append(s.settle(try s.batch(number: number, sequences: range, [(s.carol, s.nodeA.publicKey, a), (s.carol, s.nodeB.publicKey, b)])))
                    nextSequence = range.upperBound + 1
                    number += 1
                }
                let result = s.r.f.block(txs)
                #expect(result.txResults.allSatisfy { $0.value != nil })
                let l = s.r.f.ledger
                let accounts = l.balances.values.reduce(UInt64(0), +)
                let staked = l.stakes.values.reduce(UInt64(0)) { $0 + $1.amount.baseUnits }
                let escrowed = l.escrows.values.reduce(UInt64(0)) { $0 + $1.balance.baseUnits }
                let held = l.heldPayoutList.reduce(UInt64(0)) { $0 + $1.payout.amount.baseUnits }
                #expect(accounts + staked + escrowed + held == l.totalSupply.baseUnits)
                #expect(l.totalSupply.baseUnits + l.burned.baseUnits == Amount(emc: 2_100_000_000).baseUnits)
                roots.append(result.stateRoot)
            }
            #expect(number > 5)
            #expect(!s.r.f.ledger.earnings(node: s.nodeA.publicKey).isEmpty)
            return roots
        }
        let first = try run()
        #expect(try run() == first)
        #expect(Set(first).count == first.count)
    }

    // Catches: a settle limit that lets a full batch through as an ordinary 16 KiB transaction would not (or the
    // reverse: a 1 MiB limit for every kind), and a decoder that trusts a huge entry count.
    @Test("a full batch of 7,000 pairs fits the settle limit and round-trips; other kinds keep the 16 KiB limit; lying counts are refused")
    func sizeLimits() throws {
        let router = testKey(90)
        var entries = [SettlementPairEntry]()
        for i in 0..<SettlementBatch.maxEntries {
            var sub = [UInt8](repeating: 0, count: 32)
            sub[0] = UInt8(truncatingIfNeeded: i >> 8) | 0x80
            sub[1] = UInt8(truncatingIfNeeded: i)
            entries.append(SettlementPairEntry(payer: Account(owner: testKey(5).publicKey, subaccount: Subaccount(bytes: sub)),
                                               node: testKey(6).publicKey, amount: 1, count: 1, pairRoot: Hash32.of([UInt8(i & 0xFF)])))
        }
        let batch = try SettlementBatch(router: router.publicKey, batchNumber: 0, firstSequence: 1, lastSequence: 7_000, entries: entries)
        let tx = Transaction(signing: TransactionBody(chainID: "c", createdAtMillis: 1, kind: .settle(batch)), with: router)
        #expect(tx.encoded.count > TransactionLimits.maxTransactionBytes)
        #expect(tx.encoded.count <= TransactionLimits.maxSettleTransactionBytes)
        let decoded = try Transaction(decoding: tx.encoded)
        #expect(decoded.body == tx.body && decoded.hasValidSignature)
        #expect(throws: SettlementError.self) {
            try SettlementBatch(router: router.publicKey, batchNumber: 0, firstSequence: 1, lastSequence: 1, entries: entries + [entries[0]])
        }
        // A transfer body padded past 16 KiB is refused (as too large or as malformed: no ordinary kind can be valid
        // at that size), even though a settle of that size would not be.
        var padded = TransactionBody(chainID: "c", createdAtMillis: 1,
                                     kind: .transfer(Transfer(to: Account(owner: router.publicKey), amount: Amount(baseUnits: 1)))).canonicalBytes
        padded += [UInt8](repeating: 0, count: TransactionLimits.maxTransactionBytes)
        #expect(throws: TransactionDecodingError.self) {
            try Transaction(bodyBytes: padded, signer: router.publicKey, signature: [UInt8](repeating: 0, count: 64))
        }
        // A settle body whose entry count claims more than the bytes hold (or more than the cap) is malformed.
        var lying = TransactionBody(chainID: "c", createdAtMillis: 1, kind: .settle(try SettlementBatch(
            router: router.publicKey, batchNumber: 0, firstSequence: 1, lastSequence: 1, entries: []))).canonicalBytes
        for count in [UInt32(7_001), UInt32(6_999), UInt32.max] {
            var bytes = lying
            bytes.replaceSubrange((bytes.count - 4)..., with: withUnsafeBytes(of: count.bigEndian, Array.init))
            #expect(throws: TransactionDecodingError.self) {
                try Transaction(bodyBytes: bytes, signer: router.publicKey, signature: [UInt8](repeating: 0, count: 64))
            }
        }
        lying.removeAll()
    }
}
