import EdgeMatrixCore
@testable import EdgeMatrixLedger
import Testing

@Suite("ICRC-1 transfers")
struct TransferTests {
    @Test("a transfer moves the amount, burns the fee and lowers the total supply by it")
    func transferBurnsFee() throws {
        var f = Fixture()
        let alice = Account(owner: f.alice.publicKey), carol = Account(owner: f.carol.publicKey)
        let before = f.ledger.balance(of: alice)
        let outcome = try f.submit(f.transfer(f.alice, to: carol, emc("12.5"))).get()
        #expect(f.ledger.balance(of: carol).description == "12.50000000")
        #expect(f.ledger.balance(of: alice) == Amount(baseUnits: before.baseUnits - emc("12.5").baseUnits - f.fee.baseUnits))
        #expect(outcome.fee == f.fee && f.fee.description == "0.00010000")
        #expect(f.ledger.totalSupply == Amount(baseUnits: Amount(emc: 2_100_000_000).baseUnits - f.fee.baseUnits))
        #expect(f.ledger.burned == f.fee)
        #expect(outcome.location == TxLocation(height: 1, index: 0))
        #expect(f.ledger.location(ofTransaction: outcome.id) == outcome.location)
    }

    @Test("queries: name, symbol, decimals, fee, metadata and minting account")
    func queries() {
        let ledger = Fixture().ledger
        #expect(ledger.symbol == "EMC" && ledger.decimals == 8 && ledger.name == "EdgeMatrix Coin")
        #expect(ledger.fee == Amount(baseUnits: 10_000))
        #expect(ledger.mintingAccount == Account.minting)
        let metadata = ledger.metadata
        #expect(metadata.map(\.key) == metadata.map(\.key).sorted())
        #expect(metadata.first { $0.key == "icrc1:symbol" }?.value == .text("EMC"))
        #expect(metadata.first { $0.key == "icrc1:decimals" }?.value == .nat(8))
        #expect(metadata.first { $0.key == "icrc1:fee" }?.value == .nat(10_000))
    }

    @Test("BadFee carries the expected fee; an omitted fee means the ledger fee")
    func badFee() {
        var f = Fixture()
        let root = f.ledger.stateRoot()
        let tx = f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("1"), fee: emc("0.001"))
        #expect(f.ledger.apply(tx, context: BlockContext(height: 1, timeMillis: f.now)).failure == .badFee(expectedFee: emc("0.0001")))
        #expect(f.ledger.stateRoot() == root)
        #expect(f.submit(f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("1"), fee: emc("0.0001"))).value != nil)
        #expect(f.submit(f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("1"))).value != nil)
    }

    @Test("InsufficientFunds carries the balance, counting amount plus fee")
    func insufficientFunds() {
        var f = Fixture()
        let carol = Account(owner: f.carol.publicKey)
        _ = f.submit(f.transfer(f.alice, to: carol, emc("5")))
        let root = f.ledger.stateRoot()
        // 5 EMC cannot pay 5 EMC plus the fee.
        let result = f.ledger.apply(f.transfer(f.carol, to: Account(owner: f.bob.publicKey), emc("5")),
                                    context: BlockContext(height: 2, timeMillis: f.now))
        #expect(result.failure == .insufficientFunds(balance: emc("5")))
        #expect(f.ledger.stateRoot() == root)
        #expect(f.submit(f.transfer(f.carol, to: Account(owner: f.bob.publicKey), emc("4.9999"))).value != nil)
        #expect(f.ledger.balance(of: carol) == .zero)
    }

    @Test("TooOld: created_at_time before the 24 h window plus drift")
    func tooOld() {
        var f = Fixture()
        f.now += 2 * day
        let window = f.ledger.parameters.dedupWindowMillis + f.ledger.parameters.permittedDriftMillis
        let old = f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("1"), createdAt: f.now - window - 1)
        #expect(f.submit(old).failure == .tooOld)
        let justInside = f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("1"), createdAt: f.now - window)
        #expect(f.submit(justInside).value != nil)
    }

    @Test("CreatedInFuture carries the ledger time; the permitted drift is allowed")
    func createdInFuture() {
        var f = Fixture()
        let drift = f.ledger.parameters.permittedDriftMillis
        let ledgerTime = f.now
        let future = f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("1"), createdAt: ledgerTime + drift + 1)
        #expect(f.submit(future).failure == .createdInFuture(ledgerTime: ledgerTime))
        let withinDrift = f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("1"), createdAt: f.now + drift)
        #expect(f.submit(withinDrift).value != nil)
    }

    @Test("Duplicate names the original's block and index, inside the window; TooOld after it")
    func duplicateAcrossTheWindow() {
        var f = Fixture()
        let createdAt = f.now
        let tx = f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("3"), memo: Array("invoice 7".utf8), createdAt: createdAt)
        let first = f.block([f.transfer(f.bob, to: Account(owner: f.alice.publicKey), emc("1")), tx])
        let original = first.txResults[1].value!.location
        #expect(original == TxLocation(height: 1, index: 1))
        let bobAfterFirst = f.ledger.balance(of: Account(owner: f.bob.publicKey))

        // The same transaction, even signed again, is a duplicate.
        let resigned = f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("3"), memo: Array("invoice 7".utf8), createdAt: createdAt)
        #expect(f.submit(tx).failure == .duplicate(duplicateOf: original))
        f.now += 23 * hour
        #expect(f.submit(resigned).failure == .duplicate(duplicateOf: original))
        #expect(f.ledger.balance(of: Account(owner: f.bob.publicKey)) == bobAfterFirst)

        // After the window (plus drift) it can only be TooOld, and its dedup record is gone.
        f.now = createdAt + f.ledger.parameters.dedupWindowMillis + f.ledger.parameters.permittedDriftMillis + 2 * 60_000
        _ = f.block()
        #expect(f.ledger.location(ofTransaction: tx.id) == nil)
        #expect(f.submit(tx).failure == .tooOld)

        // A different memo is a different transaction.
        let other = f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("3"), memo: Array("invoice 8".utf8))
        #expect(f.submit(other).value != nil)
    }

    @Test("GenericError for a memo over 32 bytes, with a message saying the limit")
    func genericErrorMemo() {
        var f = Fixture()
        let root = f.ledger.stateRoot()
        let tx = f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("1"), memo: [UInt8](repeating: 7, count: 33))
        let error = f.ledger.apply(tx, context: BlockContext(height: 1, timeMillis: f.now)).failure
        #expect(error == .genericError(code: LedgerError.GenericCode.memoTooLong, message: "memo is 33 bytes; the limit is 32"))
        #expect(error?.kind == "GenericError")
        #expect(f.ledger.stateRoot() == root)
        #expect(f.submit(f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("1"), memo: [UInt8](repeating: 7, count: 32))).value != nil)
    }

    @Test("a transfer to the minting account is a burn: no fee, at least the fee in amount")
    func burn() {
        var f = Fixture()
        let supply = f.ledger.totalSupply
        #expect(f.submit(f.transfer(f.alice, to: .minting, emc("1"), fee: f.fee)).failure == .badFee(expectedFee: .zero))
        #expect(f.submit(f.transfer(f.alice, to: .minting, emc("0.00005"))).failure == .badBurn(minBurnAmount: f.fee))
        #expect(f.submit(f.transfer(f.alice, to: .minting, emc("100"))).value?.effect == .burned(from: Account(owner: f.alice.publicKey), amount: emc("100")))
        #expect(f.ledger.totalSupply == Amount(baseUnits: supply.baseUnits - emc("100").baseUnits))
        #expect(f.ledger.balance(of: .minting) == .zero)
    }

    @Test("subaccounts are separate balances of one owner")
    func subaccounts() {
        var f = Fixture()
        let savings = Subaccount(index: 1)
        let aliceSavings = Account(owner: f.alice.publicKey, subaccount: savings)
        #expect(f.submit(f.transfer(f.alice, to: aliceSavings, emc("10"))).value != nil)
        #expect(f.ledger.balance(of: aliceSavings) == emc("10"))
        #expect(f.submit(f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("10"), fromSubaccount: savings)).failure
                == .insufficientFunds(balance: emc("10")))
        #expect(f.submit(f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("9"), fromSubaccount: savings)).value != nil)
        #expect(f.ledger.balance(of: aliceSavings) == emc("0.9999"))
        #expect(f.ledger.balances(ownedBy: f.alice.publicKey).map(\.account) == [Account(owner: f.alice.publicKey), aliceSavings])
    }

    @Test("a bad signature or another chain's transaction is refused and changes nothing")
    func signatureAndChain() throws {
        var f = Fixture()
        let root = f.ledger.stateRoot()
        let good = f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("1"))
        // Bob's key claiming Alice's signature.
        let forged = try Transaction(bodyBytes: good.bodyBytes, signer: f.bob.publicKey, signature: good.signature)
        let context = BlockContext(height: 1, timeMillis: f.now)
        #expect(f.ledger.apply(forged, context: context).failure == .badSignature)
        let otherChain = f.tx(f.alice, .transfer(Transfer(to: Account(owner: f.bob.publicKey), amount: emc("1"))), chainID: "emc-main")
        #expect(f.ledger.apply(otherChain, context: context).failure == .wrongChain(expected: "emc-test", got: "emc-main"))
        #expect(f.ledger.stateRoot() == root)
        #expect(f.ledger.check(good, context: context) == nil)
        #expect(f.ledger.stateRoot() == root)  // check is a dry run
    }

    @Test("protocol pool accounts cannot be spent by anyone")
    func poolsAreUnspendable() throws {
        var f = Fixture()
        let pool = Pool.transactionMining.account
        let body = TransactionBody(chainID: Fixture.chainID, createdAtMillis: f.now,
                                   kind: .transfer(Transfer(fromSubaccount: pool.subaccount, to: Account(owner: f.alice.publicKey), amount: emc("1"))))
        let attempt = try Transaction(bodyBytes: body.canonicalBytes, signer: Account.protocolOwner, signature: f.alice.sign(body.canonicalBytes, domain: .transaction))
        #expect(f.submit(attempt).failure == .badSignature)
        #expect(f.ledger.balance(of: pool) == Amount(emc: 378_000_000))
    }

    @Test("every error explains itself")
    func errorMessages() {
        #expect(LedgerError.badFee(expectedFee: emc("0.0001")).description.contains("0.00010000 EMC"))
        #expect(LedgerError.insufficientFunds(balance: emc("5")).description.contains("5.00000000 EMC"))
        #expect(LedgerError.duplicate(duplicateOf: TxLocation(height: 9, index: 2)).description.contains("block 9 tx 2"))
        #expect(LedgerError.tooOld.description.contains("sign the transaction again"))
    }
}
