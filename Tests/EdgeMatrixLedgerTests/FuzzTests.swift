import EdgeMatrixCore
@testable import EdgeMatrixLedger
import Testing

@Suite("Fuzzing: hostile bytes never crash and never change state")
struct FuzzTests {
    @Test("random byte strings into the decoder and apply", arguments: [1, 2, 3] as [UInt64])
    func randomBytes(seed: UInt64) {
        var rng = SeededRandom(seed: seed)
        var f = Fixture()
        let root = f.ledger.stateRoot()
        let context = BlockContext(height: 1, timeMillis: f.now)
        let valid = f.transfer(f.alice, to: Account(owner: f.bob.publicKey), emc("1")).encoded
        var decoded = 0
        for i in 0..<3_000 {
            var bytes: [UInt8]
            switch i % 3 {
            case 0: bytes = rng.bytes(Int.random(in: 0...300, using: &rng))
            case 1:
                // Plausible prefixes: a valid envelope header followed by noise, so decoding gets deep.
                bytes = Array(valid.prefix(Int.random(in: 0...valid.count, using: &rng))) + rng.bytes(Int.random(in: 0...64, using: &rng))
            default:
                // Length fields set to huge values.
                bytes = valid
                let at = Int.random(in: 0..<bytes.count - 4, using: &rng)
                for k in 0..<4 { bytes[at + k] = 0xFF }
            }
            if (try? Transaction(decoding: bytes)) != nil { decoded += 1 }
            #expect(f.ledger.apply(bytes: bytes, context: context).value == nil, "seed \(seed) case \(i) was accepted")
            if let body = try? TransactionBody(canonicalBytes: bytes) { _ = body.canonicalBytes }
        }
        #expect(f.ledger.stateRoot() == root, "seed \(seed) changed the state")
        #expect(decoded < 3_000)
    }

    @Test("every random mutation of a valid signed transaction is rejected and changes nothing", arguments: [11, 12] as [UInt64])
    func mutations(seed: UInt64) throws {
        var rng = SeededRandom(seed: seed)
        var f = Fixture()
        let context = BlockContext(height: 1, timeMillis: f.now)
        let node = testKey(90)
        let samples: [Transaction] = [
            f.transfer(f.alice, to: Account(owner: f.bob.publicKey, subaccount: Subaccount(index: 9)), emc("2.5"), fee: f.fee, memo: Array("memo".utf8)),
            f.tx(f.alice, .bond(Bond(role: .compute, amount: Amount(emc: 200), lockDays: 90))),
            f.tx(f.alice, .registerNode(NodeRegistration(statement: NodeRegistrationStatement(
                chainID: Fixture.chainID, owner: f.alice.publicKey, nodeKey: node.publicKey, role: .validator,
                endpoints: ["https://a.example"], stakeID: 0), nodeKey: node))),
        ]
        let root = f.ledger.stateRoot()
        for sample in samples {
            let wire = sample.encoded
            for _ in 0..<700 {
                var bytes = wire
                let flips = Int.random(in: 1...3, using: &rng)
                for _ in 0..<flips {
                    let at = Int.random(in: 0..<bytes.count, using: &rng)
                    bytes[at] ^= UInt8.random(in: 1...255, using: &rng)
                }
                guard bytes != wire else { continue }
                #expect(f.ledger.apply(bytes: bytes, context: context).value == nil, "seed \(seed): accepted a mutated transaction")
            }
        }
        #expect(f.ledger.stateRoot() == root)
        // The untouched transfer still goes through: the rejections above were about the mutations.
        #expect(f.ledger.apply(bytes: samples[0].encoded, context: context).value != nil)
    }

    @Test("decoding errors are clear")
    func clearErrors() {
        #expect(throws: TransactionDecodingError.self) { try Transaction(decoding: []) }
        do { _ = try Transaction(decoding: [2]) } catch {
            #expect(error.description.contains("envelope version 2"))
        }
        var f = Fixture()
        let result = f.ledger.apply(bytes: [1, 0, 0, 0, 5, 1, 2], context: BlockContext(height: 1, timeMillis: f.now))
        #expect(result.failure?.description.contains("truncated") == true)
        #expect(throws: TransactionDecodingError.tooLarge(bytes: 2 << 20, limit: TransactionLimits.maxSettleTransactionBytes)) {
            try Transaction(decoding: [UInt8](repeating: 1, count: 2 << 20))
        }
    }
}
