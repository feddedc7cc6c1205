import EdgeMatrixCore
import Foundation
@testable import EdgeMatrixLedger
import Testing

/// A fixture with a registered router (node key 90, owned by alice, backed by a router stake of `routerStake`).
struct RouterFixture {
    var f: Fixture
    let router = testKey(90)
    let routerStakeID: UInt64

    init(routerStake: Amount = Amount(emc: 100_000), configure: (inout LedgerParameters) -> Void = { _ in }) {
        f = Fixture(configure: configure)
        let bond = f.submit(f.tx(f.alice, .bond(Bond(role: .router, amount: routerStake, lockDays: 180))))
        guard case .bonded(let id) = bond.value?.effect else { fatalError("router bond failed: \(bond)") }
        routerStakeID = id
        let statement = NodeRegistrationStatement(chainID: Fixture.chainID, owner: f.alice.publicKey, nodeKey: router.publicKey,
                                                  role: .router, endpoints: ["router.example:7000"], stakeID: id)
        let registration = f.submit(f.tx(f.alice, .registerNode(NodeRegistration(statement: statement, nodeKey: router))))
        precondition(registration.value != nil, "router registration failed: \(registration)")
    }

    func open(_ payer: SigningKey, _ amount: Amount, router: PublicKey? = nil) -> Transaction {
        f.tx(payer, .escrowOpen(EscrowOpen(router: router ?? self.router.publicKey, amount: amount)))
    }

    func withdraw(_ payer: SigningKey, router: PublicKey? = nil) -> Transaction {
        f.tx(payer, .escrowWithdraw(EscrowWithdraw(router: router ?? self.router.publicKey)))
    }

    func escrow(_ payer: SigningKey) -> Escrow? { f.ledger.escrow(payer: Account(owner: payer.publicKey), router: router.publicKey) }
    func balance(_ key: SigningKey) -> Amount { f.ledger.balance(of: Account(owner: key.publicKey)) }

    /// Registers a compute node (key 91) for alice; returns its key.
    mutating func computeNode() -> SigningKey {
        let node = testKey(91)
        let bond = f.submit(f.tx(f.alice, .bond(Bond(role: .compute, amount: Amount(emc: 500), lockDays: 30))))
        guard case .bonded(let id) = bond.value?.effect else { fatalError("compute bond failed") }
        let statement = NodeRegistrationStatement(chainID: Fixture.chainID, owner: f.alice.publicKey, nodeKey: node.publicKey,
                                                  role: .compute, endpoints: [], stakeID: id)
        precondition(f.submit(f.tx(f.alice, .registerNode(NodeRegistration(statement: statement, nodeKey: node)))).value != nil)
        return node
    }
}

@Suite("Escrow")
struct EscrowTests {
    @Test("open moves amount + fee from the payer into the escrow; a second open tops it up")
    func openAndTopUp() throws {
        var r = RouterFixture()
        let before = r.balance(r.f.bob)
        let supply = r.f.ledger.totalSupply
        let outcome = try r.f.submit(r.open(r.f.bob, emc("50"))).get()
        #expect(outcome.effect == .escrowOpened(payer: Account(owner: r.f.bob.publicKey), router: r.router.publicKey, amount: emc("50"), balance: emc("50")))
        #expect(r.balance(r.f.bob) == before.subtracting(emc("50"))!.subtracting(r.f.fee)!)
        #expect(r.f.ledger.totalSupply == supply.subtracting(r.f.fee)!)  // only the fee is burned
        let top = try r.f.submit(r.open(r.f.bob, emc("0.5"))).get()
        #expect(top.effect == .escrowOpened(payer: Account(owner: r.f.bob.publicKey), router: r.router.publicKey, amount: emc("0.5"), balance: emc("50.5")))
        let escrow = try #require(r.escrow(r.f.bob))
        #expect(escrow.balance == emc("50.5") && escrow.pending == .zero && escrow.available == emc("50.5") && escrow.withdrawableAtHeight == nil)
        #expect(r.f.ledger.escrowHeld(router: r.router.publicKey) == emc("50.5"))
        #expect(r.f.ledger.escrows(of: Account(owner: r.f.bob.publicKey)).map(\.balance) == [emc("50.5")])
        // The escrow belongs to the exact account: bob's other subaccounts and other payers have none.
        #expect(r.f.ledger.escrows(of: Account(owner: r.f.bob.publicKey, subaccount: Subaccount(index: 1))).isEmpty)
        #expect(r.escrow(r.f.alice) == nil)
    }

    @Test("the total escrow of all payers with a router is capped at k × its bonded stake")
    func cap() throws {
        var r = RouterFixture()  // k = 1, stake 100,000 EMC
        #expect(r.f.ledger.escrowCap(router: r.router.publicKey) == Amount(emc: 100_000))
        #expect(r.f.submit(r.open(r.f.bob, Amount(emc: 60_000))).value != nil)
        let root = r.f.ledger.stateRoot()
        let bobBefore = r.balance(r.f.bob)
        // Alice would take the router to 100,000 EMC + 1 base unit.
        let over = Amount(baseUnits: Amount(emc: 40_000).baseUnits + 1)
        let refused = r.f.ledger.apply(r.open(r.f.alice, over), context: BlockContext(height: r.f.height + 1, timeMillis: r.f.now))
        #expect(refused.failure == .escrowCapExceeded(router: r.router.publicKey, cap: Amount(emc: 100_000), held: Amount(emc: 60_000)))
        #expect(r.f.ledger.stateRoot() == root)
        #expect(refused.failure?.description.contains("open at most 40000.00000000 EMC") == true)
        // Exactly up to the cap is fine.
        #expect(r.f.submit(r.open(r.f.alice, Amount(emc: 40_000))).value != nil)
        #expect(r.f.ledger.escrowHeld(router: r.router.publicKey) == Amount(emc: 100_000))
        #expect(r.f.submit(r.open(r.f.bob, emc("0.00000001"))).failure
                == .escrowCapExceeded(router: r.router.publicKey, cap: Amount(emc: 100_000), held: Amount(emc: 100_000)))
        #expect(r.balance(r.f.bob) == bobBefore)

        // k is a parameter.
        var r2 = RouterFixture { $0.routerEscrowCapMultiple = 3 }
        #expect(r2.f.ledger.escrowCap(router: r2.router.publicKey) == Amount(emc: 300_000))
        #expect(r2.f.submit(r2.open(r2.f.bob, Amount(emc: 300_000))).value != nil)
    }

    @Test("a router at the largest stake and multiple saturates the cap instead of trapping")
    func capSaturates() {
        let r = RouterFixture { $0.routerEscrowCapMultiple = .max }
        #expect(r.f.ledger.escrowCap(router: r.router.publicKey) == Amount(emc: 100_000).multipliedSaturating(UInt64(UInt32.max)))
        var big = RouterFixture(routerStake: Amount(emc: 5_000_000)) { $0.routerEscrowCapMultiple = .max }
        // 5e14 base units × 4.29e9 overflows 64 bits.
        #expect(big.f.ledger.escrowCap(router: big.router.publicKey) == Amount(baseUnits: .max))
        #expect(big.f.submit(big.open(big.f.bob, Amount(emc: 1_000))).value != nil)
    }

    @Test("open is refused for an unknown, retired or non-router node, for 0, and beyond the payer's funds")
    func openRefusals() throws {
        var r = RouterFixture()
        let stranger = testKey(99).publicKey
        #expect(r.f.submit(r.open(r.f.bob, emc("1"), router: stranger)).failure == .unknownNode(nodeKey: stranger))
        let compute = r.computeNode()
        #expect(r.f.submit(r.open(r.f.bob, emc("1"), router: compute.publicKey)).failure
                == .wrongNodeRole(nodeKey: compute.publicKey, role: .compute, expected: .router))
        #expect(r.f.submit(r.open(r.f.bob, .zero)).failure == .zeroAmount(field: "amount"))
        // Carol holds nothing.
        #expect(r.f.submit(r.open(r.f.carol, emc("1"))).failure == .insufficientFunds(balance: .zero))
        // The largest amount is refused as unaffordable, not trapped on.
        #expect(r.f.submit(r.open(r.f.bob, Amount(baseUnits: .max))).failure
                == .escrowCapExceeded(router: r.router.publicKey, cap: Amount(emc: 100_000), held: .zero))
        var wide = RouterFixture { $0.routerEscrowCapMultiple = .max }
        let wideBob = wide.balance(wide.f.bob)
        // The whole balance leaves nothing for the fee.
        #expect(wide.f.submit(wide.open(wide.f.bob, wideBob)).failure == .insufficientFunds(balance: wideBob))
        #expect(wide.f.submit(wide.open(wide.f.bob, Amount(baseUnits: .max))).failure == .insufficientFunds(balance: wideBob))
        #expect(wide.f.submit(wide.open(wide.f.bob, Amount(baseUnits: .max - 5_000))).failure == .insufficientFunds(balance: wideBob))
        #expect(r.escrow(r.f.bob) == nil)
        // A retired router takes no new escrow.
        #expect(r.f.submit(r.f.tx(r.f.alice, .retireNode(nodeKey: r.router.publicKey))).value != nil)
        #expect(r.f.submit(r.open(r.f.bob, emc("1"))).failure == .nodeRetired(nodeKey: r.router.publicKey))
        #expect(r.f.ledger.escrowCap(router: r.router.publicKey) == .zero)
    }

    @Test("withdraw: one transaction; the available balance returns by itself after one epoch plus the challenge window")
    func withdrawAfterDelay() throws {
        var r = RouterFixture { $0.challengeWindowBlocks = 5 }  // epoch 10 blocks
        let delay = r.f.ledger.parameters.escrowWithdrawDelayBlocks
        #expect(delay == 15)
        #expect(r.f.submit(r.open(r.f.bob, emc("50"))).value != nil)
        let afterOpen = r.balance(r.f.bob)
        let requestHeight = r.f.height + 1
        let outcome = try r.f.submit(r.withdraw(r.f.bob)).get()
        let due = requestHeight + delay
        #expect(outcome.effect == .escrowWithdrawalRequested(payer: Account(owner: r.f.bob.publicKey), router: r.router.publicKey, withdrawableAtHeight: due))
        #expect(r.escrow(r.f.bob)?.withdrawableAtHeight == due)
        #expect(r.balance(r.f.bob) == afterOpen.subtracting(r.f.fee)!)
        // A second request while one waits is refused, naming the height.
        #expect(r.f.submit(r.withdraw(r.f.bob)).failure == .escrowWithdrawalPending(router: r.router.publicKey, withdrawableAtHeight: due))
        let waiting = r.balance(r.f.bob)
        // Nothing moves before the due block …
        while r.f.height < due - 1 {
            #expect(r.f.block().events.isEmpty)
            #expect(r.escrow(r.f.bob)?.balance == emc("50"))
        }
        #expect(r.balance(r.f.bob) == waiting)
        // … and at the end of the due block the escrow comes back and is gone.
        let result = r.f.block()
        #expect(r.f.height == due)
        #expect(result.events == [.escrowReturned(payer: Account(owner: r.f.bob.publicKey), router: r.router.publicKey, amount: emc("50"), remaining: .zero)])
        #expect(r.balance(r.f.bob) == waiting.adding(emc("50"))!)
        #expect(r.escrow(r.f.bob) == nil)
        #expect(r.f.ledger.escrowHeld(router: r.router.publicKey) == .zero)
        #expect(r.f.block().events.isEmpty)
        // Withdrawing an escrow that does not exist is refused.
        #expect(r.f.submit(r.withdraw(r.f.bob)).failure == .unknownEscrow(payer: Account(owner: r.f.bob.publicKey), router: r.router.publicKey))
    }

    @Test("a top-up cancels a waiting withdrawal; a new request starts a new delay")
    func topUpCancels() throws {
        var r = RouterFixture { $0.challengeWindowBlocks = 2 }
        #expect(r.f.submit(r.open(r.f.bob, emc("10"))).value != nil)
        let firstDue = r.f.height + 1 + r.f.ledger.parameters.escrowWithdrawDelayBlocks
        #expect(r.f.submit(r.withdraw(r.f.bob)).value != nil)
        #expect(r.f.submit(r.open(r.f.bob, emc("1"))).value != nil)
        #expect(r.escrow(r.f.bob)?.withdrawableAtHeight == nil)
        while r.f.height < firstDue { #expect(r.f.block().events.isEmpty) }
        #expect(r.escrow(r.f.bob)?.balance == emc("11"))
        // Ask again: it returns at its own height.
        let secondDue = r.f.height + 1 + r.f.ledger.parameters.escrowWithdrawDelayBlocks
        #expect(r.f.submit(r.withdraw(r.f.bob)).value != nil)
        var events = [BlockEvent]()
        while r.f.height < secondDue { events += r.f.block().events }
        #expect(events.count == 1)
        #expect(r.escrow(r.f.bob) == nil)
    }

    @Test("a withdrawal returns only what is not pending; the pending part stays for the settlement")
    func pendingStays() throws {
        var r = RouterFixture { $0.challengeWindowBlocks = 1 }
        #expect(r.f.submit(r.open(r.f.bob, emc("30"))).value != nil)
        // A settlement (not yet a transaction) has moved 12 EMC to pending.
        let key = EscrowKey(payer: Account(owner: r.f.bob.publicKey), router: r.router.publicKey)
        r.f.ledger.escrows[key]!.pending = emc("12")
        #expect(r.escrow(r.f.bob)?.available == emc("18"))
        let waiting = r.balance(r.f.bob)
        #expect(r.f.submit(r.withdraw(r.f.bob)).value != nil)
        var events = [BlockEvent]()
        for _ in 0..<20 { events += r.f.block().events }
        #expect(events == [.escrowReturned(payer: key.payer, router: key.router, amount: emc("18"), remaining: emc("12"))])
        #expect(r.balance(r.f.bob) == waiting.subtracting(r.f.fee)!.adding(emc("18"))!)
        let left = try #require(r.escrow(r.f.bob))
        #expect(left.balance == emc("12") && left.pending == emc("12") && left.available == .zero && left.withdrawableAtHeight == nil)
        #expect(r.f.ledger.escrowHeld(router: r.router.publicKey) == emc("12"))
        // With everything pending there is nothing to withdraw.
        #expect(r.f.submit(r.withdraw(r.f.bob)).failure == .escrowNothingAvailable(router: r.router.publicKey, pending: emc("12")))
    }

    // Catches: a charge beyond `available` (a router spending money the payer has withdrawn or that is already
    // pending), a spend that leaves the router's held total (and so its cap) too high, an uncharge that loses money.
    @Test("settlement hooks: charge moves available to pending, spend takes it out, uncharge gives it back")
    func settlementHooks() throws {
        var r = RouterFixture()
        #expect(r.f.submit(r.open(r.f.bob, emc("10"))).value != nil)
        let key = EscrowKey(payer: Account(owner: r.f.bob.publicKey), router: r.router.publicKey)
        let supply = r.f.ledger.totalSupply
        #expect(r.f.ledger.escrowCharge(key, emc("4")) == nil)
        #expect(r.escrow(r.f.bob)?.pending == emc("4") && r.escrow(r.f.bob)?.available == emc("6"))
        let root = r.f.ledger.stateRoot()
        #expect(r.f.ledger.escrowCharge(key, emc("6.00000001"))
                == .escrowInsufficient(payer: key.payer, router: key.router, available: emc("6"), needed: emc("6.00000001")))
        #expect(r.f.ledger.escrowCharge(key, emc("6"), commit: false) == nil)
        #expect(r.f.ledger.stateRoot() == root)
        #expect(r.f.ledger.escrowUncharge(key, emc("1")) == nil)
        #expect(r.escrow(r.f.bob)?.pending == emc("3"))
        #expect(r.f.ledger.escrowSpend(key, emc("3.00000001")) != nil)
        #expect(r.f.ledger.escrowSpend(key, emc("3")) == nil)
        #expect(r.escrow(r.f.bob)?.balance == emc("7") && r.escrow(r.f.bob)?.pending == .zero)
        #expect(r.f.ledger.escrowHeld(router: r.router.publicKey) == emc("7"))
        #expect(r.f.ledger.escrowCharge(key, emc("7")) == nil)
        #expect(r.f.ledger.escrowSpend(key, emc("7")) == nil)
        #expect(r.escrow(r.f.bob) == nil)
        #expect(r.f.ledger.escrowHeld(router: r.router.publicKey) == .zero)
        #expect(r.f.ledger.totalSupply == supply)  // the hooks move money; they never burn or mint
        #expect(r.f.ledger.escrowCharge(key, emc("1")) == .unknownEscrow(payer: key.payer, router: key.router))
    }

    @Test("a payer who put everything in escrow pays the withdrawal fee out of the escrow")
    func feeFromEscrow() throws {
        var r = RouterFixture { $0.challengeWindowBlocks = 1 }
        // Carol gets exactly 5 EMC + two fees, escrows 5 EMC + one fee, and keeps nothing.
        let fee = r.f.fee
        #expect(r.f.submit(r.f.transfer(r.f.alice, to: Account(owner: r.f.carol.publicKey), emc("5").adding(fee)!.adding(fee)!)).value != nil)
        #expect(r.f.submit(r.open(r.f.carol, emc("5").adding(fee)!)).value != nil)
        #expect(r.balance(r.f.carol) == .zero)
        #expect(r.f.submit(r.withdraw(r.f.carol)).value != nil)
        #expect(r.escrow(r.f.carol)?.balance == emc("5"))
        #expect(r.f.ledger.escrowHeld(router: r.router.publicKey) == emc("5"))
        for _ in 0..<20 { r.f.block() }
        #expect(r.balance(r.f.carol) == emc("5"))
        #expect(r.escrow(r.f.carol) == nil)
    }

    @Test("escrow state is in the state root, and the same transactions give the same root")
    func determinism() throws {
        func run() -> (roots: [Hash32], ledger: LedgerState) {
            var r = RouterFixture { $0.challengeWindowBlocks = 2 }
            var roots = [Hash32]()
            let payers = [r.f.bob, r.f.alice]
            for i in 0..<30 {
                var txs = [Transaction]()
                let payer = payers[i % 2]
                if i % 3 == 0 { txs.append(r.open(payer, Amount(baseUnits: UInt64(1_000 + i)))) }
                if i % 7 == 1 { txs.append(r.withdraw(payer)) }
                roots.append(r.f.block(txs).stateRoot)
            }
            return (roots, r.f.ledger)
        }
        let a = run(), b = run()
        #expect(a.roots == b.roots)
        #expect(Set(a.roots).count == a.roots.count)
        // Any change to an escrow moves the root.
        var ledger = a.ledger
        let root = ledger.stateRoot()
        let key = try #require(ledger.escrows.keys.sorted().first)
        ledger.escrows[key]!.pending = Amount(baseUnits: 1)
        #expect(ledger.stateRoot() != root)
        ledger.escrows[key]!.pending = .zero
        #expect(ledger.stateRoot() == root)
        ledger.escrows[key]!.withdrawableAtHeight = 12345
        #expect(ledger.stateRoot() != root)
    }

    // Catches: a held-per-router index that drifts from the escrows (the cap would then be wrong), money created or
    // lost by open, withdraw, the end-of-block return or the settlement hooks, and pending ever exceeding balance.
    @Test("random escrow workload: money is conserved and the per-router index matches the escrows at every block")
    func conservation() throws {
        var r = RouterFixture { $0.challengeWindowBlocks = 3 }
        var rng = SeededRandom(seed: 7)
        let payers = [r.f.alice, r.f.bob, r.f.carol]
        #expect(r.f.submit(r.f.transfer(r.f.alice, to: Account(owner: r.f.carol.publicKey), emc("3"))).value != nil)
        func total(_ ledger: LedgerState) -> UInt64 {
            let accounts = ledger.balances.values.reduce(UInt64(0), +)
            let staked = ledger.stakes.values.reduce(UInt64(0)) { $0 + $1.amount.baseUnits }
            let escrowed = ledger.escrows.values.reduce(UInt64(0)) { $0 + $1.balance.baseUnits }
            return accounts + staked + escrowed
        }
        var spent: UInt64 = 0  // taken out of escrows by the hooks (a settlement would pay it on)
        for _ in 0..<120 {
            var txs = [Transaction]()
            for _ in 0..<Int.random(in: 0...3, using: &rng) {
                let payer = payers.randomElement(using: &rng)!
                txs.append(Bool.random(using: &rng) ? r.open(payer, Amount(baseUnits: UInt64.random(in: 1...200_000_000, using: &rng)))
                                                     : r.withdraw(payer))
            }
            r.f.block(txs)
            // Settlement-like charges and spends in between.
            for key in r.f.ledger.escrows.keys.sorted() where Int.random(in: 0..<4, using: &rng) == 0 {
                let escrow = r.f.ledger.escrows[key]!
                if escrow.available.baseUnits > 0, Bool.random(using: &rng) {
                    _ = r.f.ledger.escrowCharge(key, Amount(baseUnits: UInt64.random(in: 1...escrow.available.baseUnits, using: &rng)))
                } else if escrow.pending.baseUnits > 0 {
                    let amount = UInt64.random(in: 1...escrow.pending.baseUnits, using: &rng)
                    if Bool.random(using: &rng) {
                        #expect(r.f.ledger.escrowSpend(key, Amount(baseUnits: amount)) == nil)
                        spent += amount
                    } else {
                        #expect(r.f.ledger.escrowUncharge(key, Amount(baseUnits: amount)) == nil)
                    }
                }
            }
            let ledger = r.f.ledger
            #expect(total(ledger) + ledger.burned.baseUnits + spent == Amount(emc: 2_100_000_000).baseUnits)
            var held = [PublicKey: UInt64]()
            for e in ledger.escrows.values {
                #expect(e.pending <= e.balance)
                #expect(e.balance > .zero || e.withdrawableAtHeight != nil)
                held[e.router, default: 0] += e.balance.baseUnits
            }
            #expect(ledger.routerEscrowTotals == held.filter { $0.value > 0 })
        }
        #expect(r.f.ledger.escrows.count > 0 || spent > 0)
    }

    // Catches: docs/PROTOCOL.md § 6.9 – 6.12's vectors (what other-language clients build from) drifting from the
    // encoder: a kind tag, field order, the optional subaccount, byte order, or the tx id rule.
    @Test("docs/PROTOCOL.md's escrow and router-fee vectors are what the Swift implementation encodes")
    func documentedVectors() throws {
        let docs = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("docs/PROTOCOL.md")
        let text = try String(contentsOf: docs, encoding: .utf8)
        var vector = [String: String]()
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
            if parts.count == 2, parts[0].hasPrefix("escrow_") || parts[0].hasPrefix("set_router_fee_") { vector[parts[0]] = parts[1] }
        }
        #expect(vector.count == 6, "\(vector.keys.sorted())")
        let sender = try SigningKey(seed: Array(0..<32))
        let router = try SigningKey(seed: Array(64..<96)).publicKey
        func body(_ kind: TransactionKind) -> Transaction {
            Transaction(signing: TransactionBody(chainID: "emc-devnet", createdAtMillis: 1_767_225_600_000, kind: kind), with: sender)
        }
        for (name, tx) in [("escrow_open", body(.escrowOpen(EscrowOpen(router: router, amount: Amount(emc: 50))))),
                           ("escrow_withdraw", body(.escrowWithdraw(EscrowWithdraw(router: router)))),
                           ("set_router_fee", body(.setRouterFee(SetRouterFee(nodeKey: router, feeBps: 250))))] {
            #expect(Hex.encode(tx.bodyBytes) == vector["\(name)_body"], "\(name)")
            #expect(tx.id.hex == vector["\(name)_tx_id"], "\(name)")
            #expect(try Transaction(decoding: tx.encoded).body == tx.body)
        }
    }

    @Test("escrow transactions round-trip through the wire encoding byte for byte")
    func encoding() throws {
        let r = RouterFixture()
        for tx in [r.open(r.f.bob, emc("50")), r.withdraw(r.f.bob),
                   r.f.tx(r.f.bob, .escrowOpen(EscrowOpen(fromSubaccount: Subaccount(index: 3), router: r.router.publicKey, amount: emc("1")))),
                   r.f.tx(r.f.bob, .escrowWithdraw(EscrowWithdraw(subaccount: Subaccount(index: 3), router: r.router.publicKey)))] {
            let decoded = try Transaction(decoding: tx.encoded)
            #expect(decoded.body == tx.body)
            #expect(decoded.bodyBytes == tx.bodyBytes)
        }
        // Kind 8: tag, absent subaccount, router key, amount.
        let body = r.open(r.f.bob, emc("50")).bodyBytes
        let fields = Array(body.suffix(1 + 1 + 32 + 8))
        #expect(fields[0] == 8 && fields[1] == 0)
        #expect(Array(fields[2..<34]) == r.router.publicKey.rawRepresentation)
        #expect(Array(fields[34...]) == [0, 0, 0, 1, 0x2a, 0x05, 0xf2, 0x00])  // 5,000,000,000 base units
        // An all-zero subaccount must be encoded as absent.
        let forged = Array(body.dropLast(41)) + [1] + [UInt8](repeating: 0, count: 32) + r.router.publicKey.rawRepresentation + Array(fields[34...])
        #expect(throws: TransactionDecodingError.self) { try Transaction(bodyBytes: forged, signer: r.f.bob.publicKey, signature: [UInt8](repeating: 0, count: 64)) }
    }
}

extension Amount {
    func multipliedSaturating(_ factor: UInt64) -> Amount {
        let (product, overflow) = baseUnits.multipliedReportingOverflow(by: factor)
        return Amount(baseUnits: overflow ? .max : product)
    }
}
