import EdgeMatrixCore
@testable import EdgeMatrixLedger
import Testing

@Suite("State root and determinism")
struct DeterminismTests {
    /// A reproducible mixed workload: transfers (some invalid), bonds, unbonds, registrations, slashing.
    static func workload(seed: UInt64, blocks: Int) -> [(txs: [Transaction], misbehaviour: [Misbehaviour], time: UInt64)] {
        var rng = SeededRandom(seed: seed)
        let f = Fixture()
        let users = [f.alice, f.bob, f.carol, testKey(204)]
        var time = Fixture.t0
        var out = [(txs: [Transaction], misbehaviour: [Misbehaviour], time: UInt64)]()
        var nextNode: UInt8 = 120
        for height in 1...blocks {
            var txs = [Transaction]()
            for _ in 0..<Int.random(in: 0...6, using: &rng) {
                let from = users.randomElement(using: &rng)!
                let to = Account(owner: users.randomElement(using: &rng)!.publicKey,
                                 subaccount: Bool.random(using: &rng) ? Subaccount(index: UInt64.random(in: 1...3, using: &rng)) : nil)
                let kind: TransactionKind
                switch Int.random(in: 0..<10, using: &rng) {
                case 0: kind = .bond(Bond(role: .compute, amount: Amount(emc: UInt64.random(in: 50...500, using: &rng)), lockDays: 30))
                case 1: kind = .unbond(stakeID: UInt64.random(in: 0...12, using: &rng))
                case 2:
                    let node = testKey(nextNode)
                    nextNode &+= 1
                    let statement = NodeRegistrationStatement(chainID: Fixture.chainID, owner: from.publicKey, nodeKey: node.publicKey,
                                                              role: .compute, endpoints: ["https://n\(nextNode).example"],
                                                              stakeID: UInt64.random(in: 4...12, using: &rng))
                    kind = .registerNode(NodeRegistration(statement: statement, nodeKey: node))
                default:
                    kind = .transfer(Transfer(to: to, amount: Amount(baseUnits: UInt64.random(in: 0...5_000_000_000_000, using: &rng))))
                }
                txs.append(Transaction(signing: TransactionBody(chainID: Fixture.chainID, createdAtMillis: time, kind: kind), with: from))
            }
            // Occasionally replay an earlier transaction (a Duplicate).
            if let earlier = out.last?.txs.first, Bool.random(using: &rng) { txs.append(earlier) }
            let misbehaviour = height % 7 == 0
                ? [Misbehaviour(validator: f.nodeKeys[Int(height / 7) % f.nodeKeys.count].publicKey, evidenceID: Hash32.of([UInt8(height)]))]
                : []
            out.append((txs, misbehaviour, time))
            time += UInt64.random(in: 500...1_500, using: &rng)
        }
        return out
    }

    @Test("two independently built ledgers given the same blocks have the same state root at every height")
    func sameBlocksSameRoot() throws {
        let blocks = Self.workload(seed: 42, blocks: 40)
        var a = Fixture().ledger
        // The second ledger goes through a JSON round trip of its genesis, as a validator on another machine would.
        var b = try LedgerState(genesis: Genesis.decode(json: Fixture().genesis.encodedJSON()))
        #expect(a.stateRoot() == b.stateRoot())
        var succeeded = 0
        var roots = Set<Hash32>()
        for (i, block) in blocks.enumerated() {
            let context = BlockContext(height: UInt64(i + 1), timeMillis: block.time)
            let ra = try a.applyBlock(txs: block.txs, misbehaviour: block.misbehaviour, context: context)
            let rb = try b.applyBlock(rawTxs: block.txs.map(\.encoded), misbehaviour: block.misbehaviour, context: context)
            #expect(ra.stateRoot == rb.stateRoot, "diverged at height \(i + 1)")
            #expect(ra.txResults == rb.txResults)
            succeeded += ra.txResults.filter { $0.value != nil }.count
            roots.insert(ra.stateRoot)
        }
        #expect(succeeded > 40)  // the workload really changes state…
        #expect(roots.count == blocks.count)  // …and every block's root differs (height and time are in it)
    }

    @Test("the state root commits to balances: any change moves it, undoing it restores it")
    func rootTracksState() throws {
        var f = Fixture()
        let r0 = f.ledger.stateRoot()
        #expect(f.ledger.stateRoot() == r0)  // stable across calls
        var copy = f.ledger
        _ = copy.apply(f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("0.00000001")), context: BlockContext(height: 1, timeMillis: f.now))
        #expect(copy.stateRoot() != r0)
        #expect(f.ledger.stateRoot() == r0)  // value semantics: the original is untouched
        _ = f.ledger.slash(validator: f.nodeKeys[0].publicKey, fractionBps: 1)
        #expect(f.ledger.stateRoot() != r0)
    }

    @Test("applyBlock refuses a height that does not follow, or time that goes back")
    func blockSequencing() {
        var f = Fixture()
        _ = f.block()
        #expect(throws: BlockError.unexpectedHeight(expected: 2, got: 5)) {
            try f.ledger.applyBlock(txs: [], context: BlockContext(height: 5, timeMillis: f.now))
        }
        #expect(throws: BlockError.timeWentBackwards(previousMillis: Fixture.t0, gotMillis: Fixture.t0 - 1)) {
            try f.ledger.applyBlock(txs: [], context: BlockContext(height: 2, timeMillis: Fixture.t0 - 1))
        }
        #expect(f.ledger.height == 1)
    }

    @Test("undecodable transactions in a block are reported at their position and change nothing")
    func rawBlock() throws {
        var f = Fixture()
        let good = f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("1"))
        let result = try f.ledger.applyBlock(rawTxs: [[1, 2, 3], good.encoded], context: BlockContext(height: 1, timeMillis: f.now))
        #expect(result.txResults[0].failure?.kind == "Malformed")
        #expect(result.txResults[1].value?.location == TxLocation(height: 1, index: 1))
    }
}
