import EdgeMatrixCore
import EdgeMatrixLedger
@testable import EdgeMatrixNode
import Testing

/// The compute node's pure batch check (`WatchtowerAudit`), on batches built from real signed receipts.
@Suite("Watchtower audit core")
struct WatchtowerAuditTests {
    let router = SigningKey(), node = SigningKey(), other = SigningKey()
    let payer = Account(owner: SigningKey().publicKey)
    static let prices = UnitPrices(perMillionPromptTokens: 1_000_000, perMillionCompletionTokens: 100_000_000)

    func receipt(_ sequence: UInt64, node key: SigningKey? = nil, completion: UInt64 = 10) throws -> Receipt {
        let signer = key ?? node
        let body = ReceiptBody(payer: payer, router: router.publicKey, node: signer.publicKey, sequence: sequence, attempt: 0, app: "llm",
                               model: "m", prices: Self.prices, units: WorkUnits(promptTokens: 5, completionTokens: completion),
                               startedAtMillis: 1, endedAtMillis: 2, requestHash: Hash32.of(Array("\(sequence)".utf8)),
                               responseHash: Hash32.of([3]), status: 200)
        var r = Receipt(signing: body, with: signer)
        try r.countersign(nodeKey: signer.publicKey, routerKey: router)
        return r
    }

    func leaf(_ r: Receipt, amount: UInt64? = nil) throws -> SettlementLeaf {
        SettlementLeaf(key: WatchtowerAudit.key(of: r), receiptBytes: try #require(r.settlementBytes), amount: amount ?? r.body.cost ?? 0)
    }

    /// The batch over `leaves` (any order) and the witnesses the router would serve per pair.
    func settle(_ leaves: [SettlementLeaf], range: ClosedRange<UInt64> = 1...10) throws -> (SettlementBatch, [SettlementPair: [SettlementLeafWitness]]) {
        let sorted = leaves.sorted { $0.key < $1.key }
        let batch = try SettlementBatchBuilder.build(router: router.publicKey, batchNumber: 0, sequenceRange: range, leaves: sorted)
        var served = [SettlementPair: [SettlementLeafWitness]]()
        for pair in Set(sorted.map(\.key.pair)) {
            let pairLeaves = sorted.filter { $0.key.pair == pair }
            let tree = try SettlementBatchBuilder.pairTree(leaves: pairLeaves)
            served[pair] = try pairLeaves.indices.map { try SettlementLeafWitness(tree: tree, leaves: pairLeaves, index: $0) }
        }
        return (batch, served)
    }

    // Catches: a watchtower that reports (and files bonded challenges against) an honest batch.
    @Test("an honest batch that holds every kept receipt gives no finding")
    func clean() throws {
        let kept = try (1...4).map { try receipt($0) }
        let (batch, served) = try settle(try kept.map { try leaf($0) } + [try leaf(try receipt(5, node: other))])
        #expect(WatchtowerAudit.audit(batch: batch, node: node.publicKey, served: served, kept: kept).isEmpty)
    }

    // Catches: an omission that goes unnoticed, or evidence that does not bracket the receipt (the ledger would
    // dismiss it and burn the bond).
    @Test("a kept receipt left out gives an omission with bracketing evidence that the ledger's check upholds", arguments: [1, 3, 5] as [UInt64])
    func omitted(sequence: UInt64) throws {
        let kept = try (1...5).map { try receipt($0) }
        let (batch, served) = try settle(try kept.filter { $0.body.sequence != sequence }.map { try leaf($0) })
        let findings = WatchtowerAudit.audit(batch: batch, node: node.publicKey, served: served, kept: kept)
        try #require(findings.count == 1)
        guard case .omitted(let r, _) = findings[0], case .omission(let bytes, let evidence)? = findings[0].claim else {
            Issue.record("expected an omission, got \(findings)"); return
        }
        #expect(r.body.sequence == sequence)
        let verdict = batch.checkOmission(receiptBytes: bytes, evidence: evidence, verifier: Self.verifier)
        #expect(verdict == .upheld(.receiptOmitted))
    }

    // Catches: a node that cannot claim a receipt whose whole pair the router dropped.
    @Test("a kept receipt of a pair the batch lacks gives a pair_absent omission")
    func pairAbsent() throws {
        let kept = [try receipt(2)]
        let (batch, served) = try settle([try leaf(try receipt(1, node: other))])
        let findings = WatchtowerAudit.audit(batch: batch, node: node.publicKey, served: served, kept: kept)
        #expect(findings == [.omitted(receipt: kept[0], evidence: .pairAbsent)])
    }

    // Catches: an under-counted leaf that passes because the key is present, or an under-count filed as a forged leaf.
    @Test("a leaf committed for less than the kept receipt is worth gives an under-count, upheld as same_key")
    func underCounted() throws {
        let kept = try (1...3).map { try receipt($0) }
        let cost = try #require(kept[1].body.cost)
        let (batch, served) = try settle([try leaf(kept[0]), try leaf(kept[1], amount: cost - 1), try leaf(kept[2])])
        let findings = WatchtowerAudit.audit(batch: batch, node: node.publicKey, served: served, kept: kept)
        // The short leaf is also an invalid leaf (amount ≠ units × prices); both are claims the ledger upholds.
        #expect(findings.map(\.code) == ["invalid_leaf_amount_mismatch", "under_counted"])
        guard case .omission(let bytes, let evidence)? = findings[1].claim else { Issue.record("no omission claim"); return }
        #expect(batch.checkOmission(receiptBytes: bytes, evidence: evidence, verifier: Self.verifier)
                    == .upheld(.receiptUnderCounted(committed: cost - 1, owed: cost)))
    }

    // Catches: a forged leaf (a signature the node never made) that the node does not report.
    @Test("a leaf whose node signature is forged gives an invalid-leaf finding with a leaf claim")
    func forged() throws {
        let kept = try (1...2).map { try receipt($0) }
        var forgedBytes = try #require(try receipt(3).settlementBytes)
        let signatureStart = forgedBytes.count - 128
        forgedBytes[signatureStart] ^= 0xFF
        let forgedLeaf = SettlementLeaf(key: WatchtowerAudit.key(of: try receipt(3)), receiptBytes: forgedBytes, amount: try #require(try receipt(3).body.cost))
        let (batch, served) = try settle(try kept.map { try leaf($0) } + [forgedLeaf])
        let findings = WatchtowerAudit.audit(batch: batch, node: node.publicKey, served: served, kept: kept)
        #expect(findings.map(\.code) == ["invalid_leaf_bad_receipt"])
        guard case .leaf(let entry, _)? = findings.first?.claim else { Issue.record("no leaf claim: \(findings)"); return }
        #expect(entry == 0)
    }

    // Catches: a watchtower that treats withheld leaves as a clean batch, or files an unprovable omission.
    @Test("leaves not served give data_unavailable; a kept receipt missing from a partial page gives an unprovable omission; neither is a claim")
    func unavailable() throws {
        let kept = try (1...3).map { try receipt($0) }
        let (batch, served) = try settle(try kept.prefix(2).map { try leaf($0) })
        let none = WatchtowerAudit.audit(batch: batch, node: node.publicKey, served: [:], kept: kept)
        #expect(none.map(\.code) == ["data_unavailable"])
        #expect(none.allSatisfy { $0.claim == nil })
        var short = served
        short[SettlementPair(payer: payer, node: node.publicKey)]?.removeLast()
        let partial = WatchtowerAudit.audit(batch: batch, node: node.publicKey, served: short, kept: Array(kept.prefix(2)))
        #expect(partial.map(\.code) == ["data_unavailable", "unprovable_omission"])
        #expect(partial.allSatisfy { $0.claim == nil })
    }

    /// The ledger's view, with the receipt's own prices as the registered ones.
    static let verifier = ClosureLeafVerifier { bytes, batch throws(SettlementLeafRejection) in
        guard let r = try? Receipt(settlementBytes: bytes), (try? r.verify(nodeKey: r.body.node, routerKey: batch.router)) != nil,
              let cost = r.body.cost else { throw SettlementLeafRejection(code: "bad_receipt", message: "") }
        return SettlementLeafValue(key: SettlementLeafKey(payer: r.body.payer, node: r.body.node, sequence: r.body.sequence, attempt: r.body.attempt),
                                   amount: cost)
    }
}
