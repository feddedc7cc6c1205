import EdgeMatrixCore
@testable import EdgeMatrixLedger

/// A deterministic key for test actor `n`.
func testKey(_ n: UInt8) -> SigningKey { try! SigningKey(seed: [UInt8](repeating: n, count: 31) + [0xA5]) }

let day: UInt64 = LedgerParameters.millisPerDay
let hour: UInt64 = 3_600_000

/// A devnet with `validatorCount` validators (node keys 1…, owners 101…) and funded users alice (201) and bob (202).
struct Fixture {
    static let chainID = "emc-test"
    static let t0: UInt64 = 1_700_000_000_000

    let nodeKeys: [SigningKey]
    let ownerKeys: [SigningKey]
    let alice = testKey(201)
    let bob = testKey(202)
    let carol = testKey(203)  // unfunded
    let genesis: Genesis
    var ledger: LedgerState
    var height: UInt64 = 0
    var now: UInt64 = Fixture.t0

    init(validatorCount: Int = 4, epochLength: UInt64 = 10, configure: (inout LedgerParameters) -> Void = { _ in }) {
        nodeKeys = (0..<validatorCount).map { testKey(UInt8(1 + $0)) }
        ownerKeys = (0..<validatorCount).map { testKey(UInt8(101 + $0)) }
        var parameters = LedgerParameters.standard
        parameters.epochLengthBlocks = epochLength
        configure(&parameters)
        genesis = Genesis.devnet(chainID: Self.chainID, genesisTimeMillis: Self.t0,
                                 validators: zip(nodeKeys, ownerKeys).map { .init(nodeKey: $0.publicKey, owner: $1.publicKey) },
                                 fundedAccounts: [Account(owner: alice.publicKey), Account(owner: bob.publicKey)],
                                 parameters: parameters)
        ledger = try! LedgerState(genesis: genesis)
    }

    var fee: Amount { ledger.fee }

    func tx(_ key: SigningKey, _ kind: TransactionKind, createdAt: UInt64? = nil, chainID: String = Fixture.chainID) -> Transaction {
        Transaction(signing: TransactionBody(chainID: chainID, createdAtMillis: createdAt ?? now, kind: kind), with: key)
    }

    func transfer(_ from: SigningKey, to: Account, _ amount: Amount, fee: Amount? = nil, memo: [UInt8]? = nil,
                  fromSubaccount: Subaccount? = nil, createdAt: UInt64? = nil) -> Transaction {
        tx(from, .transfer(Transfer(fromSubaccount: fromSubaccount, to: to, amount: amount, fee: fee, memo: memo)), createdAt: createdAt)
    }

    /// Applies one transaction at the current time, in a block of its own (so height and time move forward).
    @discardableResult
    mutating func submit(_ tx: Transaction) -> TxResult { block([tx]).txResults[0] }

    /// Executes a block at `now`, then advances the clock by one second.
    @discardableResult
    mutating func block(_ txs: [Transaction] = [], misbehaviour: [Misbehaviour] = []) -> BlockResult {
        height += 1
        let result = try! ledger.applyBlock(txs: txs, misbehaviour: misbehaviour, context: BlockContext(height: height, timeMillis: now))
        now += 1_000
        return result
    }

    /// Runs empty blocks until the last executed height is a multiple of the epoch length; returns their updates.
    mutating func runToEpochBoundary() -> [StakedValidator] {
        var updates = [StakedValidator]()
        repeat { updates += block().validatorUpdates } while height % ledger.parameters.epochLengthBlocks != 0
        return updates
    }
}

extension Result {
    var failure: Failure? { if case .failure(let e) = self { return e }; return nil }
    var value: Success? { if case .success(let v) = self { return v }; return nil }
}

func emc(_ text: String) -> Amount { try! Amount(parsing: text) }
