import EdgeMatrixCore
import EdgeMatrixLedger
import PropertyBased
import Testing

/// Settlement batches: building one from ordered leaves, the top tree the ledger computes itself, the canonical
/// encoding under hostile bytes, the watchtower's audit, and each fraud-proof check with the fault it catches.
@Suite("Settlement batches")
struct SettlementBatchTests {
    static let router = testKey(50).publicKey
    static let otherRouter = testKey(51).publicKey
    static let payers = [Account(owner: testKey(60).publicKey), Account(owner: testKey(60).publicKey, subaccount: Subaccount(index: 1)),
                         Account(owner: testKey(61).publicKey)].sorted()
    static let nodes = [testKey(70).publicKey, testKey(71).publicKey, testKey(72).publicKey]
        .sorted { $0.rawRepresentation.lexicographicallyPrecedes($1.rawRepresentation) }

    // MARK: Synthetic receipts and their verifier

    /// A stand-in receipt: key ‖ router ‖ amount it is worth ‖ validity flag (0 valid; else "bad signature") ‖ padding.
    static func receipt(_ key: SettlementLeafKey, worth amount: UInt64, router: PublicKey = router, flag: UInt8 = 0,
                        padding: [UInt8] = []) -> [UInt8] {
        var writer = ByteWriter()
        key.encode(to: &writer)
        router.encode(to: &writer)
        writer.write(amount)
        writer.write(flag)
        writer.write(bytes: padding)
        return writer.bytes
    }

    /// The ledger's hook as the tests plug it: decode, check the router and the "signature", return key and worth.
    static let verifier = ClosureLeafVerifier { bytes, batch throws(SettlementLeafRejection) in
        var reader = ByteReader(bytes)
        do {
            let key = try SettlementLeafKey(from: &reader)
            let router = try PublicKey(from: &reader)
            let amount = try reader.readUInt64()
            let flag = try reader.readUInt8()
            _ = try reader.readBytes()
            try reader.expectEnd()
            guard router == batch.router else { throw SettlementLeafRejection(code: "wrong_router", message: "") }
            guard flag == 0 else { throw SettlementLeafRejection(code: "bad_node_signature", message: "") }
            return SettlementLeafValue(key: key, amount: amount)
        } catch let rejection as SettlementLeafRejection {
            throw rejection
        } catch {
            throw SettlementLeafRejection(code: "malformed", message: "\(error)")
        }
    }

    /// Honest leaves from a seed: every pair of the fixture gets 0...maxPerPair receipts, sequences unique in 1...10_000.
    static func leaves(seed: UInt64, maxPerPair: Int = 12) -> [SettlementLeaf] {
        var random = SeededRandom(seed: seed)
        var sequences = Array(UInt64(1)...UInt64(10_000)).shuffled(using: &random)
        var result = [SettlementLeaf]()
        for payer in payers {
            for node in nodes {
                let count = Int.random(in: 0...maxPerPair, using: &random)
                let keys = (0..<count).map { _ in
                    SettlementLeafKey(payer: payer, node: node, sequence: sequences.removeLast(), attempt: UInt32.random(in: 0...2, using: &random))
                }.sorted()
                for key in keys {
                    let amount = UInt64.random(in: 0...1_000_000_000, using: &random)
                    result.append(SettlementLeaf(key: key, receiptBytes: receipt(key, worth: amount, padding: random.bytes(Int.random(in: 0...8, using: &random))),
                                                 amount: amount))
                }
            }
        }
        return result
    }

    static func build(_ leaves: [SettlementLeaf], range: ClosedRange<UInt64> = 1...10_000, number: UInt64 = 3) throws -> SettlementBatch {
        try SettlementBatchBuilder.build(router: router, batchNumber: number, sequenceRange: range, leaves: leaves)
    }

    static func pairLeaves(_ leaves: [SettlementLeaf], _ pair: SettlementPair) -> [SettlementLeaf] { leaves.filter { $0.key.pair == pair } }

    /// A batch from hand-made pair trees (a router that builds its trees wrongly).
    static func batch(trees: [(pair: SettlementPair, root: MerkleSumNode, count: UInt64)], range: ClosedRange<UInt64> = 1...10_000) throws -> SettlementBatch {
        try SettlementBatch(router: router, batchNumber: 0, firstSequence: range.lowerBound, lastSequence: range.upperBound,
                            entries: trees.sorted { $0.pair < $1.pair }.map {
                                SettlementPairEntry(payer: $0.pair.payer, node: $0.pair.node, amount: $0.root.sum, count: $0.count, pairRoot: $0.root.hash)
                            })
    }

    static func key(_ sequence: UInt64, payer: Int = 0, node: Int = 0, attempt: UInt32 = 0) -> SettlementLeafKey {
        SettlementLeafKey(payer: payers[payer], node: nodes[node], sequence: sequence, attempt: attempt)
    }

    static func leaf(_ key: SettlementLeafKey, _ amount: UInt64, committed: UInt64? = nil, flag: UInt8 = 0, router: PublicKey = router) -> SettlementLeaf {
        SettlementLeaf(key: key, receiptBytes: receipt(key, worth: amount, router: router, flag: flag), amount: committed ?? amount)
    }

    // MARK: Building

    // Catches: grouping leaves into the wrong pair, a pair root that is not the pair's own Merkle-sum root, a count or
    // amount that is not what the leaves say, and a root taken from anywhere but the entries.
    @Test("one entry per (payer, node) pair with the pair tree's root, amount and count; the root is the top tree over them")
    func buildGroupsByPair() async {
        await propertyCheck(count: 40, input: Gen.uint64()) { seed in
            let leaves = Self.leaves(seed: seed)
            guard let batch = try? Self.build(leaves) else { Issue.record("build failed"); return }
            let pairs = Array(Set(leaves.map(\.key.pair))).sorted()
            #expect(batch.entries.map(\.pair) == pairs)
            for entry in batch.entries {
                let own = Self.pairLeaves(leaves, entry.pair)
                let tree = try? SettlementBatchBuilder.pairTree(leaves: own)
                #expect(tree?.root == entry.pairRootNode)
                #expect(entry.count == UInt64(own.count))
                #expect(entry.amount == own.reduce(0) { $0 + $1.amount })
            }
            #expect(batch.total == leaves.reduce(0) { $0 + $1.amount })
            #expect(batch.receiptCount == UInt64(leaves.count))
            #expect(batch.root == (try? MerkleSumTree(leafNodes: batch.entries.map(\.topLeaf)))?.root)
            // Decoding recomputes the same root.
            #expect((try? SettlementBatch(canonicalBytes: batch.canonicalBytes)) == batch)
        }
    }

    // Catches: a builder that accepts disorder, duplicates, sequences outside the range, empty or huge receipts, or
    // wrapping totals, and one that is left changed by a refused leaf.
    @Test("disorder, duplicates, out-of-range sequences, bad sizes and overflow are typed errors that change nothing")
    func builderRefusals() throws {
        var builder = SettlementBatchBuilder(router: Self.router, batchNumber: 0, sequenceRange: 10...20)
        try builder.append(Self.leaf(Self.key(12), 5))
        try builder.append(Self.leaf(Self.key(12, attempt: 1), UInt64.max - 10))
        let before = try builder.build()
        #expect(throws: SettlementError.duplicateLeaf(Self.key(12, attempt: 1))) { try builder.append(Self.leaf(Self.key(12, attempt: 1), 1)) }
        #expect(throws: SettlementError.leavesOutOfOrder(previous: Self.key(12, attempt: 1), next: Self.key(11))) {
            try builder.append(Self.leaf(Self.key(11), 1))
        }
        // A lower payer after a higher one is disorder too, even with a higher sequence.
        try builder.append(Self.leaf(Self.key(13, payer: 1), 1))
        #expect(throws: SettlementError.self) { try builder.append(Self.leaf(Self.key(19, payer: 0), 1)) }
        #expect(throws: SettlementError.leafOutsideRange(sequence: 21, first: 10, last: 20)) { try builder.append(Self.leaf(Self.key(21, payer: 2), 1)) }
        #expect(throws: SettlementError.leafOutsideRange(sequence: 9, first: 10, last: 20)) { try builder.append(Self.leaf(Self.key(9, payer: 2), 1)) }
        #expect(throws: SettlementError.amountOverflow) { try builder.append(Self.leaf(Self.key(14, payer: 2), 10)) }
        #expect(throws: SettlementError.emptyReceipt) { try builder.append(key: Self.key(14, payer: 2), receiptBytes: [UInt8](), amount: 1) }
        #expect(throws: SettlementError.receiptTooLarge(size: 65_537, limit: 65_536)) {
            try builder.append(key: Self.key(14, payer: 2), receiptBytes: [UInt8](repeating: 1, count: 65_537), amount: 1)
        }
        // Only the one valid leaf changed the batch.
        var expected = SettlementBatchBuilder(router: Self.router, batchNumber: 0, sequenceRange: 10...20)
        try expected.append(Self.leaf(Self.key(12), 5))
        try expected.append(Self.leaf(Self.key(12, attempt: 1), UInt64.max - 10))
        try expected.append(Self.leaf(Self.key(13, payer: 1), 1))
        #expect(try builder.build() == expected.build())
        #expect(try builder.build() != before)
        #expect(throws: SettlementError.noLeaves) { try SettlementBatchBuilder.pairTree(leaves: []) }
        #expect(throws: SettlementError.mixedPairs(index: 1)) {
            try SettlementBatchBuilder.pairTree(leaves: [Self.leaf(Self.key(1), 1), Self.leaf(Self.key(2, node: 1), 1)])
        }
    }

    // Catches: a proof that does not bind the entry to the batch root, or the leaf to the entry; a top tree that does
    // not commit to an entry's amount, count or pair root.
    @Test("every receipt's full proof verifies against the batch root; changing an entry's amount, count or root changes the root")
    func fullProofsAndTopBinding() async {
        await propertyCheck(count: 25, input: Gen.uint64(), Gen.int(in: 0...2)) { seed, field in
            let leaves = Self.leaves(seed: seed, maxPerPair: 9)
            guard let batch = try? Self.build(leaves), !batch.entries.isEmpty else { return }
            for (entryIndex, entry) in batch.entries.enumerated() {
                let own = Self.pairLeaves(leaves, entry.pair)
                guard let tree = try? SettlementBatchBuilder.pairTree(leaves: own), let entryProof = try? batch.entryProof(at: entryIndex) else {
                    Issue.record("proof failed"); return
                }
                for index in own.indices {
                    guard let leafProof = try? tree.proof(at: index) else { Issue.record("proof failed"); return }
                    let proof = SettlementReceiptProof(entry: entry, entryProof: entryProof, leafProof: leafProof)
                    #expect(throws: Never.self) { try proof.verify(receiptBytes: own[index].receiptBytes, amount: own[index].amount, batchRoot: batch.root) }
                    #expect((try? SettlementReceiptProof(canonicalBytes: proof.canonicalBytes)) == proof)
                    // A proof for a leaf claimed at another amount fails.
                    #expect(throws: MerkleSumError.self) {
                        try proof.verify(receiptBytes: own[index].receiptBytes, amount: own[index].amount + 1, batchRoot: batch.root)
                    }
                }
                // Change one field of this entry: the root the ledger computes changes, and the old proof no longer verifies.
                let changed = SettlementPairEntry(payer: entry.payer, node: entry.node, amount: entry.amount + (field == 0 ? 1 : 0),
                                                  count: entry.count + (field == 1 ? 1 : 0),
                                                  pairRoot: field == 2 ? Hash32.of(entry.pairRoot.bytes) : entry.pairRoot)
                var entries = batch.entries
                entries[entryIndex] = changed
                guard let other = try? SettlementBatch(router: batch.router, batchNumber: batch.batchNumber, firstSequence: batch.firstSequence,
                                                       lastSequence: batch.lastSequence, entries: entries) else { Issue.record("rebuild"); return }
                #expect(other.root.hash != batch.root.hash)
                #expect(other.commitment != batch.commitment)
                let top = changed.topLeaf
                #expect(throws: MerkleSumError.self) { try entryProof.verify(leafHash: top.hash, amount: top.sum, root: batch.root) }
            }
        }
    }

    // MARK: Encoding

    // Catches: a decoder that traps on hostile input, allocates from a claimed count, trusts a root, or accepts a
    // second encoding of one batch.
    @Test("hostile batch bytes never trap: random, mutated, truncated, counts at their maximum")
    func hostileBytes() async throws {
        let batch = try Self.build(Self.leaves(seed: 11, maxPerPair: 3))
        let valid = batch.canonicalBytes
        await propertyCheck(count: 400, input: Gen.uint8().array(of: 0...400)) { bytes in
            if let decoded = try? SettlementBatch(canonicalBytes: bytes) { #expect(decoded.canonicalBytes == bytes) }
        }
        await propertyCheck(count: 600, input: Gen.int(in: 0...100_000), Gen.uint8(), Gen.int(in: 0...2)) { position, value, kind in
            var bytes = valid
            let at = position % bytes.count
            switch kind {
            case 0: bytes[at] ^= value | 1
            case 1: bytes = Array(bytes.prefix(at))
            default: bytes.insert(value, at: at)
            }
            if let decoded = try? SettlementBatch(canonicalBytes: bytes) { #expect(decoded.canonicalBytes == bytes) }
        }
        // Header with entry counts at u32.max, just past the limit, and at the limit with no bytes behind it.
        func header(first: UInt64 = 1, last: UInt64 = 2, count: UInt32) -> [UInt8] {
            var writer = ByteWriter()
            writer.write(SettlementBatch.version)
            Self.router.encode(to: &writer)
            writer.write(UInt64(0)); writer.write(first); writer.write(last); writer.write(count)
            return writer.bytes
        }
        for count in [UInt32.max, UInt32(SettlementBatch.maxEntries + 1), UInt32(SettlementBatch.maxEntries)] {
            #expect(throws: DecodingError.self) { try SettlementBatch(canonicalBytes: header(count: count)) }
        }
        #expect(try SettlementBatch(canonicalBytes: header(count: 0)).entries.isEmpty)
        #expect(try SettlementBatch(canonicalBytes: header(count: 0)).root == MerkleSumTree.emptyRoot)
        // first > last would make a ClosedRange trap: it is refused instead.
        #expect(throws: DecodingError.self) { try SettlementBatch(canonicalBytes: header(first: 5, last: 4, count: 0)) }

        // Entries out of order, empty, or over UInt64.max in total are refused.
        let a = SettlementPairEntry(payer: Self.payers[0], node: Self.nodes[0], amount: UInt64.max, count: 1, pairRoot: Hash32.of([1]))
        let b = SettlementPairEntry(payer: Self.payers[1], node: Self.nodes[0], amount: 1, count: 1, pairRoot: Hash32.of([2]))
        let empty = SettlementPairEntry(payer: Self.payers[1], node: Self.nodes[0], amount: 0, count: 0, pairRoot: Hash32.of([2]))
        let huge = SettlementPairEntry(payer: Self.payers[1], node: Self.nodes[0], amount: 0, count: (1 << 32) + 1, pairRoot: Hash32.of([2]))
        func make(_ entries: [SettlementPairEntry]) throws(SettlementError) -> SettlementBatch {
            try SettlementBatch(router: Self.router, batchNumber: 0, firstSequence: 1, lastSequence: 1, entries: entries)
        }
        #expect(throws: SettlementError.amountOverflow) { try make([a, b]) }
        #expect(throws: SettlementError.entriesOutOfOrder(index: 1)) { try make([b, a]) }
        #expect(throws: SettlementError.entriesOutOfOrder(index: 1)) { try make([b, b]) }
        #expect(throws: SettlementError.emptyPair(index: 0)) { try make([empty]) }
        #expect(throws: SettlementError.pairTooLarge(index: 0, count: (1 << 32) + 1)) { try make([huge]) }
        #expect(throws: SettlementError.badSequenceRange(first: 2, last: 1)) {
            try SettlementBatch(router: Self.router, batchNumber: 0, firstSequence: 2, lastSequence: 1, entries: [])
        }
        // The same faults arrive as bytes: refused by decoding, never trusted.
        var writer = ByteWriter()
        writer.write(SettlementBatch.version); Self.router.encode(to: &writer)
        writer.write(UInt64(0)); writer.write(UInt64(1)); writer.write(UInt64(1)); writer.write(UInt32(2))
        b.encode(to: &writer); a.encode(to: &writer)
        #expect(throws: DecodingError.self) { try SettlementBatch(canonicalBytes: writer.bytes) }
    }

    // Catches: a batch over the size target (the settle transaction must stay ≤ 1 MB at 1,000 pairs).
    @Test("1,000 pair entries encode in under 150 KB")
    func size() throws {
        var entries = [SettlementPairEntry]()
        for i in 0..<1_000 {
            let payer = Account(owner: Self.router, subaccount: Subaccount(index: UInt64(i + 1)))
            let root = Hash32.of([UInt8(truncatingIfNeeded: i)])
            entries.append(SettlementPairEntry(payer: payer, node: Self.nodes[0], amount: UInt64(i), count: 1_000, pairRoot: root))
        }
        entries.sort { $0.pair < $1.pair }
        let batch = try SettlementBatch(router: Self.router, batchNumber: 0, firstSequence: 0, lastSequence: 999_999, entries: entries)
        #expect(batch.canonicalBytes.count < 150_000)
    }

    // MARK: Challenges

    // (a) Catches: a router that inflates a leaf, includes an invalid receipt, files a leaf under another pair, or
    // bills a sequence outside the batch's range; and a checker that convicts on an unproven or honest leaf.
    @Test("(a) leaf validity: inflated, invalid, misfiled or out-of-range leaves are upheld; honest ones and bad witnesses dismissed")
    func leafValidity() throws {
        let honest = Self.leaf(Self.key(5), 100)
        let inflated = Self.leaf(Self.key(6), 100, committed: 150)
        let forged = Self.leaf(Self.key(7), 100, flag: 1)
        let misfiled = SettlementLeaf(key: Self.key(8), receiptBytes: Self.receipt(Self.key(8, node: 1), worth: 10), amount: 10)
        let outOfRange = SettlementLeaf(key: Self.key(9), receiptBytes: Self.receipt(Self.key(500), worth: 10), amount: 10)
        let foreign = Self.leaf(Self.key(10), 10, router: Self.otherRouter)
        let leaves = [honest, inflated, forged, misfiled, outOfRange, foreign]
        let batch = try Self.build(leaves, range: 1...100)
        let tree = try SettlementBatchBuilder.pairTree(leaves: leaves)
        func witness(_ i: Int) throws -> SettlementLeafWitness { try SettlementLeafWitness(tree: tree, leaves: leaves, index: i) }

        #expect(batch.checkLeaf(entryIndex: 0, witness: try witness(0), verifier: Self.verifier) == .dismissed(.noFault))
        #expect(batch.checkLeaf(entryIndex: 0, witness: try witness(1), verifier: Self.verifier) == .upheld(.amountMismatch(committed: 150, computed: 100)))
        #expect(batch.checkLeaf(entryIndex: 0, witness: try witness(2), verifier: Self.verifier) == .upheld(.invalidReceipt(code: "bad_node_signature")))
        #expect(batch.checkLeaf(entryIndex: 0, witness: try witness(3), verifier: Self.verifier) == .upheld(.leafInWrongPair))
        #expect(batch.checkLeaf(entryIndex: 0, witness: try witness(4), verifier: Self.verifier) == .upheld(.sequenceOutOfRange(500)))
        #expect(batch.checkLeaf(entryIndex: 0, witness: try witness(5), verifier: Self.verifier) == .upheld(.invalidReceipt(code: "wrong_router")))
        // A witness that is not in the batch proves nothing: another amount, another size, an unknown entry.
        let w = try witness(1)
        let lowered = SettlementLeafWitness(receiptBytes: w.receiptBytes, amount: 100, proof: w.proof)
        #expect(batch.checkLeaf(entryIndex: 0, witness: lowered, verifier: Self.verifier).code == "dismissed_bad_witness")
        let resized = SettlementLeafWitness(receiptBytes: w.receiptBytes, amount: w.amount,
                                            proof: try MerkleSumProof(index: 1, leafCount: 7, siblings: w.proof.siblings))
        #expect(batch.checkLeaf(entryIndex: 0, witness: resized, verifier: Self.verifier).code == "dismissed_bad_witness")
        #expect(batch.checkLeaf(entryIndex: 1, witness: w, verifier: Self.verifier) == .dismissed(.unknownEntry(index: 1)))
        #expect(batch.checkLeaf(entryIndex: -1, witness: w, verifier: Self.verifier) == .dismissed(.unknownEntry(index: -1)))
        // The witness's encoding round-trips.
        #expect(try SettlementLeafWitness(canonicalBytes: w.canonicalBytes) == w)
    }

    // (a) Catches: one request billed twice, to two payers or twice at one attempt; and convicting a legitimate
    // failover (one sequence, two nodes, two attempts, one payer).
    @Test("(a) a sequence billed twice is upheld; a failover to another node is not")
    func duplicateSequence() throws {
        let leaves = [Self.leaf(Self.key(5, payer: 0, node: 0), 10), Self.leaf(Self.key(5, payer: 0, node: 1, attempt: 1), 10),
                      Self.leaf(Self.key(5, payer: 1, node: 0, attempt: 2), 10), Self.leaf(Self.key(6, payer: 2, node: 0), 10),
                      Self.leaf(Self.key(6, payer: 2, node: 1), 10)]
        let batch = try Self.build(leaves, range: 1...10)
        func witness(_ i: Int) throws -> (entryIndex: Int, witness: SettlementLeafWitness) {
            let pair = leaves[i].key.pair
            let own = Self.pairLeaves(leaves, pair)
            let index = own.firstIndex(of: leaves[i])!
            return (batch.entryIndex(for: pair)!, try SettlementLeafWitness(tree: try SettlementBatchBuilder.pairTree(leaves: own), leaves: own, index: index))
        }
        #expect(batch.checkDuplicateSequence(first: try witness(0), second: try witness(1), verifier: Self.verifier) == .dismissed(.noFault))
        #expect(batch.checkDuplicateSequence(first: try witness(0), second: try witness(2), verifier: Self.verifier) == .upheld(.duplicateSequence(5)))
        #expect(batch.checkDuplicateSequence(first: try witness(3), second: try witness(4), verifier: Self.verifier) == .upheld(.duplicateSequence(6)))
        #expect(batch.checkDuplicateSequence(first: try witness(0), second: try witness(3), verifier: Self.verifier) == .dismissed(.noFault))
        #expect(batch.checkDuplicateSequence(first: try witness(0), second: try witness(0), verifier: Self.verifier) == .dismissed(.sameLeaf))
    }

    // (b) Catches: a router that passes up a sum other than its children's (to inflate or deflate a pair), or claims an
    // entry amount its root's children do not add up to; and a checker that convicts on a path that is not in the tree.
    @Test("(b) a committed sum that does not add up along a path is upheld; honest and forged paths are dismissed")
    func brokenSums() throws {
        let leaves = (1...4).map { Self.leaf(Self.key(UInt64($0)), UInt64($0) * 100) }
        let nodes = leaves.map { MerkleSumNode(hash: MerkleSumTree.leafHash($0.receiptBytes), sum: $0.amount) }
        let left = try MerkleSumTree.parent(nodes[0], nodes[1]), right = try MerkleSumTree.parent(nodes[2], nodes[3])
        let pair = leaves[0].key.pair

        // Honest: both paths dismissed.
        let honest = try Self.batch(trees: [(pair, try MerkleSumTree.parent(left, right), 4)])
        let honestPath = [MerkleSumPreimage(left: nodes[0], right: nodes[1]), MerkleSumPreimage(left: left, right: right)]
        #expect(honest.checkSums(entryIndex: 0, path: honestPath) == .dismissed(.noFault))
        #expect(honest.checkSums(entryIndex: 0, path: [honestPath[1]]) == .dismissed(.noFault))
        #expect(try SettlementBatchBuilder.pairTree(leaves: leaves).preimagePath(at: 0) == honestPath)

        // The router passes the left node up with 50 extra base units: the root's hash commits the false sum.
        let inflatedLeft = MerkleSumNode(hash: left.hash, sum: left.sum + 50)
        let cheatRoot = try MerkleSumTree.parent(inflatedLeft, right)
        let cheat = try Self.batch(trees: [(pair, cheatRoot, 4)])
        let cheatPath = [MerkleSumPreimage(left: nodes[0], right: nodes[1]), MerkleSumPreimage(left: inflatedLeft, right: right)]
        #expect(cheat.checkSums(entryIndex: 0, path: cheatPath) == .upheld(.sumMismatch(committed: left.sum + 50, actual: left.sum)))
        // The root's preimage alone is consistent with the entry: only the full path shows the fault.
        #expect(cheat.checkSums(entryIndex: 0, path: [cheatPath[1]]) == .dismissed(.noFault))
        // A watchtower holding the real leaves sees the mismatch at once.
        #expect(cheat.auditPair(pair, leaves: leaves) == .amountMismatch(committed: left.sum + 50 + right.sum, served: 1_000))

        // The entry claims more than the root's children add up to.
        let overclaim = try Self.batch(trees: [(pair, MerkleSumNode(hash: honest.entries[0].pairRoot, sum: 1_001), 4)])
        #expect(overclaim.checkSums(entryIndex: 0, path: [honestPath[1]]) == .upheld(.sumMismatch(committed: 1_001, actual: 1_000)))

        // Children that overflow.
        let big = MerkleSumNode(hash: Hash32.of([1]), sum: UInt64.max), one = MerkleSumNode(hash: Hash32.of([2]), sum: 1)
        let overflowing = MerkleSumPreimage(left: big, right: one)
        let overflowBatch = try Self.batch(trees: [(pair, MerkleSumNode(hash: overflowing.hash, sum: 0), 2)])
        #expect(overflowBatch.checkSums(entryIndex: 0, path: [overflowing]) == .upheld(.sumOverflow))

        // Forged paths prove nothing: a preimage that is no child of the next, a top that is not the pair root.
        let forged = [MerkleSumPreimage(left: nodes[0], right: MerkleSumNode(hash: nodes[1].hash, sum: 7)), cheatPath[1]]
        #expect(cheat.checkSums(entryIndex: 0, path: forged) == .dismissed(.brokenPath(at: 0)))
        #expect(honest.checkSums(entryIndex: 0, path: cheatPath) == .dismissed(.brokenPath(at: 1)))
        #expect(honest.checkSums(entryIndex: 0, path: []) == .dismissed(.emptyPath))
        #expect(honest.checkSums(entryIndex: 3, path: honestPath) == .dismissed(.unknownEntry(index: 3)))
    }

    // (e) Catches: a router that reorders or repeats leaves (which would also let it hide a receipt from (c)); and a
    // checker that accepts leaves that are not adjacent.
    @Test("(e) adjacent leaves out of order are upheld; ordered or non-adjacent ones dismissed")
    func order() throws {
        let sorted = (1...5).map { Self.leaf(Self.key(UInt64($0) * 10), UInt64($0)) }
        var swapped = sorted
        swapped.swapAt(1, 3)  // keys 10, 40, 30, 20, 50
        let tree = try MerkleSumTree(leaves: swapped.map { (bytes: $0.receiptBytes, amount: $0.amount) })
        let batch = try Self.batch(trees: [(sorted[0].key.pair, tree.root, 5)], range: 1...100)
        func witness(_ i: Int) throws -> SettlementLeafWitness { try SettlementLeafWitness(tree: tree, leaves: swapped, index: i) }
        #expect(batch.checkOrder(entryIndex: 0, left: try witness(0), right: try witness(1), verifier: Self.verifier) == .dismissed(.noFault))
        #expect(batch.checkOrder(entryIndex: 0, left: try witness(1), right: try witness(2), verifier: Self.verifier) == .upheld(.leavesOutOfOrder))
        #expect(batch.checkOrder(entryIndex: 0, left: try witness(2), right: try witness(3), verifier: Self.verifier) == .upheld(.leavesOutOfOrder))
        #expect(batch.checkOrder(entryIndex: 0, left: try witness(1), right: try witness(3), verifier: Self.verifier) == .dismissed(.notAdjacent))
        #expect(batch.checkOrder(entryIndex: 0, left: try witness(1), right: try witness(0), verifier: Self.verifier) == .dismissed(.notAdjacent))
        // A repeated key is out of order too.
        let repeated = [sorted[0], sorted[0]]
        let repeatedTree = try MerkleSumTree(leaves: repeated.map { (bytes: $0.receiptBytes, amount: $0.amount) })
        let repeatedBatch = try Self.batch(trees: [(sorted[0].key.pair, repeatedTree.root, 2)], range: 1...100)
        #expect(repeatedBatch.checkOrder(entryIndex: 0, left: try SettlementLeafWitness(tree: repeatedTree, leaves: repeated, index: 0),
                                         right: try SettlementLeafWitness(tree: repeatedTree, leaves: repeated, index: 1),
                                         verifier: Self.verifier) == .upheld(.leavesOutOfOrder))
        // The watchtower finds it from the served leaves as well.
        #expect(batch.auditPair(sorted[0].key.pair, leaves: swapped) == .leavesOutOfOrder(index: 2))
    }

    // (c) Catches: a router that drops a countersigned receipt (inside a pair, before its first or after its last
    // leaf, or a whole pair) or under-counts it; and convicting a router for a receipt it did include, one from
    // another batch's range, or a forged one.
    @Test("(c) an omitted or under-counted receipt is upheld from adjacent leaves; included, foreign or forged ones are dismissed")
    func omission() throws {
        let all = [10, 20, 30, 40, 50].map { Self.leaf(Self.key(UInt64($0)), UInt64($0)) }
        let kept = [all[1], all[3]]  // the router drops 10, 30 and 50
        let batch = try Self.build(kept, range: 1...100)
        let tree = try SettlementBatchBuilder.pairTree(leaves: kept)
        func witness(_ i: Int) throws -> SettlementLeafWitness { try SettlementLeafWitness(tree: tree, leaves: kept, index: i) }
        let v = Self.verifier

        #expect(batch.checkOmission(receiptBytes: all[2].receiptBytes, evidence: .between(try witness(0), try witness(1)), verifier: v)
            == .upheld(.receiptOmitted))
        #expect(batch.checkOmission(receiptBytes: all[0].receiptBytes, evidence: .beforeFirst(try witness(0)), verifier: v) == .upheld(.receiptOmitted))
        #expect(batch.checkOmission(receiptBytes: all[4].receiptBytes, evidence: .afterLast(try witness(1)), verifier: v) == .upheld(.receiptOmitted))
        // Wrong bracket: the receipt is not between these leaves, or the "first" is not first.
        #expect(batch.checkOmission(receiptBytes: all[4].receiptBytes, evidence: .between(try witness(0), try witness(1)), verifier: v)
            == .dismissed(.notBracketed))
        #expect(batch.checkOmission(receiptBytes: all[0].receiptBytes, evidence: .beforeFirst(try witness(1)), verifier: v) == .dismissed(.notAdjacent))
        #expect(batch.checkOmission(receiptBytes: all[4].receiptBytes, evidence: .afterLast(try witness(0)), verifier: v) == .dismissed(.notAdjacent))
        // An included receipt is not omitted.
        #expect(batch.checkOmission(receiptBytes: all[1].receiptBytes, evidence: .between(try witness(0), try witness(1)), verifier: v)
            == .dismissed(.notBracketed))
        #expect(batch.checkOmission(receiptBytes: all[1].receiptBytes, evidence: .sameKey(try witness(0)), verifier: v) == .dismissed(.noFault))
        // A whole pair left out.
        let otherPair = Self.leaf(Self.key(60, payer: 1), 5)
        #expect(batch.checkOmission(receiptBytes: otherPair.receiptBytes, evidence: .pairAbsent, verifier: v) == .upheld(.receiptOmitted))
        #expect(batch.checkOmission(receiptBytes: all[0].receiptBytes, evidence: .pairAbsent, verifier: v) == .dismissed(.pairPresent))
        // Another batch's range, a forged receipt, a receipt for another router.
        let late = Self.leaf(Self.key(101), 5)
        #expect(batch.checkOmission(receiptBytes: late.receiptBytes, evidence: .afterLast(try witness(1)), verifier: v) == .dismissed(.receiptOutsideBatch))
        let forged = Self.leaf(Self.key(35), 5, flag: 1)
        #expect(batch.checkOmission(receiptBytes: forged.receiptBytes, evidence: .between(try witness(0), try witness(1)), verifier: v)
            == .dismissed(.receiptInvalid(code: "bad_node_signature")))
        #expect(batch.checkOmission(receiptBytes: [1, 2, 3], evidence: .pairAbsent, verifier: v) == .dismissed(.receiptInvalid(code: "malformed")))

        // Under-counted: the router commits the node's receipt key with a receipt worth less.
        let owed = Self.leaf(Self.key(20), 200)
        let under = [Self.leaf(Self.key(20), 20)]
        let underBatch = try Self.build(under, range: 1...100)
        let underTree = try SettlementBatchBuilder.pairTree(leaves: under)
        #expect(underBatch.checkOmission(receiptBytes: owed.receiptBytes, evidence: .sameKey(try SettlementLeafWitness(tree: underTree, leaves: under, index: 0)),
                                         verifier: v) == .upheld(.receiptUnderCounted(committed: 20, owed: 200)))
        #expect(underBatch.checkOmission(receiptBytes: Self.leaf(Self.key(21), 200).receiptBytes,
                                         evidence: .sameKey(try SettlementLeafWitness(tree: underTree, leaves: under, index: 0)), verifier: v)
            == .dismissed(.keyMismatch))
    }

    // Catches: a checker that convicts an honest router (and so would burn its stake on a bogus challenge), and one
    // that misses a single inflated leaf anywhere in a random batch.
    @Test("on random honest batches every leaf, adjacent pair and sum path is dismissed; one inflated leaf is upheld")
    func honestBatchesAreNeverConvicted() async {
        await propertyCheck(count: 15, input: Gen.uint64(), Gen.int(in: 0...10_000)) { seed, pick in
            let leaves = Self.leaves(seed: seed, maxPerPair: 7)
            guard let batch = try? Self.build(leaves), !leaves.isEmpty else { return }
            for (entryIndex, entry) in batch.entries.enumerated() {
                let own = Self.pairLeaves(leaves, entry.pair)
                guard let tree = try? SettlementBatchBuilder.pairTree(leaves: own) else { Issue.record("tree"); return }
                let witnesses = own.indices.compactMap { try? SettlementLeafWitness(tree: tree, leaves: own, index: $0) }
                #expect(witnesses.count == own.count)
                for (index, witness) in witnesses.enumerated() {
                    #expect(batch.checkLeaf(entryIndex: entryIndex, witness: witness, verifier: Self.verifier) == .dismissed(.noFault))
                    if index + 1 < witnesses.count {
                        #expect(batch.checkOrder(entryIndex: entryIndex, left: witness, right: witnesses[index + 1], verifier: Self.verifier)
                            == .dismissed(.noFault))
                    }
                    if let path = tree.preimagePath(at: index), !path.isEmpty {
                        #expect(batch.checkSums(entryIndex: entryIndex, path: path) == .dismissed(.noFault))
                    }
                    // An included receipt is never "omitted".
                    #expect(!batch.checkOmission(receiptBytes: witness.receiptBytes, evidence: .sameKey(witness), verifier: Self.verifier).isUpheld)
                }
                if let first = witnesses.first, let last = witnesses.last {
                    #expect(!batch.checkOmission(receiptBytes: own[0].receiptBytes, evidence: .beforeFirst(first), verifier: Self.verifier).isUpheld)
                    #expect(!batch.checkOmission(receiptBytes: own[own.count - 1].receiptBytes, evidence: .afterLast(last), verifier: Self.verifier).isUpheld)
                }
            }
            // Inflate one leaf by one base unit: its (a) challenge is upheld.
            var cheated = leaves
            let victim = pick % leaves.count
            cheated[victim] = SettlementLeaf(key: leaves[victim].key, receiptBytes: leaves[victim].receiptBytes, amount: leaves[victim].amount + 1)
            guard let cheat = try? Self.build(cheated), let entryIndex = cheat.entryIndex(for: leaves[victim].key.pair) else { Issue.record("cheat"); return }
            let own = Self.pairLeaves(cheated, leaves[victim].key.pair)
            guard let tree = try? SettlementBatchBuilder.pairTree(leaves: own), let index = own.firstIndex(of: cheated[victim]),
                  let witness = try? SettlementLeafWitness(tree: tree, leaves: own, index: index) else { Issue.record("witness"); return }
            #expect(cheat.checkLeaf(entryIndex: entryIndex, witness: witness, verifier: Self.verifier)
                == .upheld(.amountMismatch(committed: leaves[victim].amount + 1, computed: leaves[victim].amount)))
        }
    }

    // Catches: challenge evidence that does not survive its encoding, or whose decoder traps on hostile bytes.
    @Test("challenge evidence round-trips through its encoding; hostile evidence bytes never trap")
    func evidenceEncoding() async throws {
        let leaves = (1...3).map { Self.leaf(Self.key(UInt64($0)), UInt64($0)) }
        let tree = try SettlementBatchBuilder.pairTree(leaves: leaves)
        let w0 = try SettlementLeafWitness(tree: tree, leaves: leaves, index: 0), w1 = try SettlementLeafWitness(tree: tree, leaves: leaves, index: 1)
        let samples: [OmissionEvidence] = [.pairAbsent, .between(w0, w1), .beforeFirst(w0), .afterLast(w1), .sameKey(w1)]
        for evidence in samples { #expect(try OmissionEvidence(canonicalBytes: evidence.canonicalBytes) == evidence) }
        let path = try #require(tree.preimagePath(at: 2))
        for preimage in path { #expect(try MerkleSumPreimage(canonicalBytes: preimage.canonicalBytes) == preimage) }
        let encoded = samples.map(\.canonicalBytes)
        await propertyCheck(count: 500, input: Gen.int(in: 0...4), Gen.int(in: 0...100_000), Gen.uint8(), Gen.int(in: 0...2)) { which, position, value, kind in
            var bytes = encoded[which]
            let at = position % max(1, bytes.count)
            switch kind {
            case 0 where !bytes.isEmpty: bytes[at] ^= value | 1
            case 1: bytes = Array(bytes.prefix(at))
            default: bytes.insert(value, at: min(at, bytes.count))
            }
            if let decoded = try? OmissionEvidence(canonicalBytes: bytes) { #expect(decoded.canonicalBytes == bytes) }
        }
        // A receipt length past 64 KiB is refused before reading it.
        var writer = ByteWriter()
        writer.write(UInt8(4)); writer.write(UInt32(SettlementBatch.maxReceiptBytes + 1))
        #expect(throws: DecodingError.self) { try OmissionEvidence(canonicalBytes: writer.bytes) }
    }

    // Catches: a watchtower check that passes a batch whose pair root, count or amount is not what the served leaves
    // give (a dropped, altered or invented leaf), or a pair the batch does not have.
    @Test("watchtower audit: consistent for the real leaves; a dropped, altered or extra leaf or a missing pair is found")
    func audit() throws {
        let leaves = Self.leaves(seed: 5, maxPerPair: 6)
        let batch = try Self.build(leaves)
        for entry in batch.entries { #expect(batch.auditPair(entry.pair, leaves: Self.pairLeaves(leaves, entry.pair)) == .consistent) }
        let entry = try #require(batch.entries.first { $0.count >= 2 })
        var own = Self.pairLeaves(leaves, entry.pair)
        #expect(batch.auditPair(entry.pair, leaves: own.dropLast()) == .countMismatch(committed: entry.count, served: entry.count - 1))
        let last = own.removeLast()
        own.append(SettlementLeaf(key: last.key, receiptBytes: last.receiptBytes + [0], amount: last.amount))
        #expect(batch.auditPair(entry.pair, leaves: own) == .rootMismatch)
        own[own.count - 1] = SettlementLeaf(key: last.key, receiptBytes: last.receiptBytes, amount: last.amount + 1)
        #expect(batch.auditPair(entry.pair, leaves: own) == .amountMismatch(committed: entry.amount, served: entry.amount + 1))
        #expect(batch.auditPair(entry.pair, leaves: [SettlementLeaf]()) == .noLeaves)
        let stranger = SettlementPair(payer: Account(owner: testKey(99).publicKey), node: Self.nodes[0])
        #expect(batch.auditPair(stranger, leaves: [Self.leaf(SettlementLeafKey(payer: stranger.payer, node: stranger.node, sequence: 1, attempt: 0), 1)])
            == .pairMissing)
    }
}
