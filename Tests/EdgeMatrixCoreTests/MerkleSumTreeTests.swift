import EdgeMatrixCore
import PropertyBased
import Testing

/// The settlement rollup's Merkle-sum tree: its exact hashing rule, proofs, promotion of odd nodes, overflow, and that
/// any single change to a leaf, a sum, the order or a proof entry is caught.
@Suite("Merkle-sum tree")
struct MerkleSumTreeTests {
    /// `count` leaves of 1...40 random bytes with amounts below 2^40 (so sums never overflow), from a seed.
    static func leaves(count: Int, seed: UInt64) -> [(bytes: [UInt8], amount: UInt64)] {
        var random = SeededRandom(seed: seed)
        return (0..<count).map { _ in
            (bytes: random.bytes(Int.random(in: 1...40, using: &random)), amount: UInt64.random(in: 0..<(1 << 40), using: &random))
        }
    }

    /// The rule written out by hand, independent of the implementation's packing: H(0x01 ‖ h ‖ s_be ‖ h ‖ s_be).
    static func inner(_ l: MerkleSumNode, _ r: MerkleSumNode) -> MerkleSumNode {
        func be(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64($0))) } }
        return MerkleSumNode(hash: Hash32.of([0x01] + l.hash.bytes + be(l.sum) + r.hash.bytes + be(r.sum)), sum: l.sum + r.sum)
    }

    static func leaf(_ bytes: [UInt8], _ amount: UInt64) -> MerkleSumNode { MerkleSumNode(hash: Hash32.of([0x00] + bytes), sum: amount) }

    // Catches: a wrong domain prefix, little-endian or missing sums in the inner hash, and duplicating the odd node
    // (Bitcoin style) instead of promoting it.
    @Test("the root of 1, 2, 3 and 5 leaves is exactly the documented rule, odd nodes promoted")
    func exactRule() throws {
        let a = Self.leaf([1], 10), b = Self.leaf([2, 2], 20), c = Self.leaf([3], 30), d = Self.leaf([4], 40), e = Self.leaf([5], 50)
        let data: [(bytes: [UInt8], amount: UInt64)] = [([1], 10), ([2, 2], 20), ([3], 30), ([4], 40), ([5], 50)]
        #expect(try MerkleSumTree(leaves: Array(data.prefix(1))).root == a)
        #expect(try MerkleSumTree(leaves: Array(data.prefix(2))).root == Self.inner(a, b))
        #expect(try MerkleSumTree(leaves: Array(data.prefix(3))).root == Self.inner(Self.inner(a, b), c))
        #expect(try MerkleSumTree(leaves: data).root == Self.inner(Self.inner(Self.inner(a, b), Self.inner(c, d)), e))
        #expect(MerkleSumTree.leafHash([3]) == c.hash)
        // The root's hash alone does not fix the total a proof is checked against: a claimed total above what the
        // leaves add up to is refused (an entry that over-claims its pair's amount has no valid leaf proofs).
        let three = try MerkleSumTree(leaves: Array(data.prefix(3)))
        #expect(throws: MerkleSumError.sumMismatch(expected: 61, got: 60)) {
            try three.proof(at: 1).verify(leafBytes: [2, 2], amount: 20, root: MerkleSumNode(hash: three.root.hash, sum: 61))
        }
        #expect(MerkleSumTree.innerHash(left: a, right: b) == Self.inner(a, b).hash)
        // The empty tree.
        let empty = try MerkleSumTree(leafNodes: [])
        #expect(empty.root == MerkleSumTree.emptyRoot)
        #expect(throws: MerkleSumError.indexOutOfRange(index: 0, leafCount: 0)) { try empty.proof(at: 0) }
        #expect(try MerkleSumAccumulator().root == MerkleSumTree.emptyRoot)
    }

    // Catches: any drift from the test vector in docs/PROTOCOL.md ("Settlement batches"), computed there independently
    // (Python hashlib): hashing rule, sum width and byte order, proof encoding.
    @Test("the documented test vector: root and proof of three leaves")
    func documentedVector() throws {
        let tree = try MerkleSumTree(leaves: [(bytes: [0x01], amount: 10), (bytes: [0x02, 0x02], amount: 20), (bytes: [0x03], amount: 30)])
        #expect(tree.root.hash.hex == "85976b57e08a04e7542d397397fb20452a140c7917792222dbdff7aee30c72d9")
        #expect(tree.root.sum == 60)
        let proof = try tree.proof(at: 2)
        #expect(Hex.encode(proof.canonicalBytes) == "0000000000000002000000000000000301"
            + "18e2e7932ed7b29e61d005a781058143605cae5e2c0bcf77933b629043ffee2c000000000000001e")
    }

    // Catches: a proof whose shape does not match the tree's (wrong side, an entry for a promoted level), a root sum
    // that is not the total, and a streaming accumulator that promotes differently from the full tree.
    @Test("every leaf's proof verifies against the root and the total; the accumulator gives the same root")
    func everyProofVerifies() async {
        await propertyCheck(count: 60, input: Gen.int(in: 1...70), Gen.uint64()) { count, seed in
            let data = Self.leaves(count: count, seed: seed)
            guard let tree = try? MerkleSumTree(leaves: data) else { Issue.record("build failed"); return }
            #expect(tree.root.sum == data.reduce(0) { $0 + $1.amount })
            #expect(tree.leafCount == count)
            var accumulator = MerkleSumAccumulator()
            for leaf in data { #expect(throws: Never.self) { try accumulator.append(leafBytes: leaf.bytes, amount: leaf.amount) } }
            #expect((try? accumulator.root) == tree.root)
            #expect(accumulator.total == tree.root.sum)
            for (index, leaf) in data.enumerated() {
                #expect(throws: Never.self) {
                    let proof = try tree.proof(at: index)
                    try proof.verify(leafBytes: leaf.bytes, amount: leaf.amount, root: tree.root)
                    // The encoded proof decodes to the same proof (canonical).
                    #expect(try MerkleSumProof(canonicalBytes: proof.canonicalBytes) == proof)
                }
            }
        }
    }

    // Catches: a verifier that ignores the leaf bytes, its amount, a sibling's hash or sum, or the position (index, and
    // tree size where it changes the path) that the proof claims.
    @Test("any single change to a leaf byte, its amount, a sibling hash or sum, the index or the size is caught")
    func singleChangesAreCaught() async {
        await propertyCheck(count: 150, input: Gen.int(in: 2...64), Gen.uint64(), Gen.int(in: 0...10_000), Gen.int(in: 0...5)) {
            count, seed, pick, kind in
            let data = Self.leaves(count: count, seed: seed)
            guard let tree = try? MerkleSumTree(leaves: data), let proof = try? tree.proof(at: pick % count) else {
                Issue.record("build failed"); return
            }
            let index = pick % count
            var bytes = data[index].bytes
            var amount = data[index].amount
            var siblings = proof.siblings
            var position = proof.index
            var size = proof.leafCount
            switch kind {
            case 0: bytes[pick % bytes.count] ^= 0x01
            case 1: amount ^= 1 << UInt64(pick % 40)
            case 2:
                let s = siblings[pick % siblings.count]
                var raw = s.hash.bytes
                raw[pick % 32] ^= 0x80
                siblings[pick % siblings.count] = MerkleSumNode(hash: Hash32(bytes: raw)!, sum: s.sum)
            case 3:
                let s = siblings[pick % siblings.count]
                siblings[pick % siblings.count] = MerkleSumNode(hash: s.hash, sum: s.sum ^ (1 << UInt64(pick % 40)))
            case 4: position = (position + 1) % UInt64(count)  // another leaf's position
            default: size += 1  // another tree size
            }
            // A changed position or size may need another number of entries: then the proof is refused outright.
            guard let forged = try? MerkleSumProof(index: position, leafCount: size, siblings: siblings) else { return }
            if kind == 5 {
                // The root does not commit to the size (the pair entry's count does, and witnesses must match it):
                // another size is harmless only when it gives the very same path, i.e. the same sides.
                let sides = { (i: UInt64, n: UInt64) in MerkleSumTree.shape(index: i, leafCount: n)?.compactMap { $0 } }
                if sides(position, size) == sides(proof.index, proof.leafCount) { return }
            }
            #expect(throws: MerkleSumError.self) { try forged.verify(leafBytes: bytes, amount: amount, root: tree.root) }
        }
    }

    // Catches: a tree whose root does not depend on the order of its leaves.
    @Test("swapping two distinct leaves changes the root")
    func orderMatters() async {
        await propertyCheck(count: 80, input: Gen.int(in: 2...40), Gen.uint64(), Gen.int(in: 0...10_000), Gen.int(in: 1...10_000)) {
            count, seed, i, offset in
            var data = Self.leaves(count: count, seed: seed)
            let a = i % count, b = (a + offset % (count - 1) + 1) % count
            guard data[a].bytes != data[b].bytes || data[a].amount != data[b].amount else { return }
            let before = try? MerkleSumTree(leaves: data).root
            data.swapAt(a, b)
            #expect(before != (try? MerkleSumTree(leaves: data).root))
        }
    }

    // Catches: a promoted node that gets a proof entry (or a duplicated sibling), which would make the last leaf of
    // an odd tree unprovable or provable at two sizes.
    @Test("odd trees: the promoted last leaf's proof skips the promoted levels")
    func oddTrees() throws {
        for count in [3, 5, 7, 9, 11, 13, 15, 17, 33, 63, 65, 99, 1_001] {
            let data = Self.leaves(count: count, seed: UInt64(count))
            let tree = try MerkleSumTree(leaves: data)
            let last = try tree.proof(at: count - 1)
            let shape = try #require(MerkleSumTree.shape(index: UInt64(count - 1), leafCount: UInt64(count)))
            #expect(last.siblings.count == shape.compactMap { $0 }.count)
            #expect(last.siblings.count < shape.count, "the last leaf of \(count) is promoted at least once")
            try last.verify(leafBytes: data[count - 1].bytes, amount: data[count - 1].amount, root: tree.root)
            // The same siblings with one more (duplicated) entry are refused.
            #expect(throws: MerkleSumError.self) {
                try MerkleSumProof(index: last.index, leafCount: last.leafCount, siblings: last.siblings + [tree.leaf(at: count - 1)!])
            }
        }
        #expect(MerkleSumTree.shape(index: (1 << 32) - 1, leafCount: 1 << 32)?.count == 32)
        #expect(MerkleSumTree.shape(index: 0, leafCount: (1 << 32) + 1) == nil)
        #expect(MerkleSumTree.shape(index: 5, leafCount: 5) == nil)
    }

    // Catches: wrapping (&+) or trapping sums; an accumulator that is left half-updated by a refused leaf.
    @Test("sums past UInt64.max are a typed error in the tree, the accumulator and proof verification")
    func overflow() throws {
        #expect(throws: MerkleSumError.sumOverflow) { try MerkleSumTree(leaves: [(bytes: [1], amount: UInt64.max), (bytes: [2], amount: 1)]) }
        #expect(throws: MerkleSumError.sumOverflow) {
            try MerkleSumTree(leaves: [(bytes: [1], amount: UInt64.max - 1), (bytes: [2], amount: 1), (bytes: [3], amount: 1)])
        }
        // Exactly UInt64.max is fine.
        let full = try MerkleSumTree(leaves: [(bytes: [1], amount: UInt64.max - 5), (bytes: [2], amount: 5)])
        #expect(full.root.sum == UInt64.max)

        var accumulator = MerkleSumAccumulator()
        try accumulator.append(leafBytes: [1], amount: UInt64.max - 1)
        let before = try accumulator.root
        #expect(throws: MerkleSumError.sumOverflow) { try accumulator.append(leafBytes: [2], amount: 2) }
        #expect(try accumulator.root == before)
        #expect(accumulator.leafCount == 1)

        // A proof whose sibling sum would overflow the path is refused, not wrapped.
        let proof = try MerkleSumProof(index: 0, leafCount: 2, siblings: [MerkleSumNode(hash: Hash32.of([9]), sum: UInt64.max)])
        #expect(throws: MerkleSumError.sumOverflow) { try proof.root(leafHash: MerkleSumTree.leafHash([1]), amount: 1) }
        // Wrapping would have given this root; it must not verify.
        let wrapped = MerkleSumNode(hash: MerkleSumTree.innerHash(left: Self.leaf([1], 1), right: MerkleSumNode(hash: Hash32.of([9]), sum: UInt64.max)),
                                    sum: 0)
        #expect(throws: MerkleSumError.sumOverflow) { try proof.verify(leafBytes: [1], amount: 1, root: wrapped) }
    }

    // Catches: a bloated proof encoding (the target is ≤ 2 KB for one leaf of a 1,000-leaf pair tree).
    @Test("a proof for one leaf of a 1,000-leaf tree is 417 bytes")
    func proofSize() throws {
        let data = Self.leaves(count: 1_000, seed: 7)
        let tree = try MerkleSumTree(leaves: data)
        for index in [0, 499, 999] {
            let bytes = try tree.proof(at: index).canonicalBytes
            #expect(bytes.count <= 8 + 8 + 1 + 10 * 40)
            #expect(bytes.count < 2_048)
        }
    }

    // Catches: a proof decoder that traps, allocates from a hostile count, or accepts a second encoding.
    @Test("hostile proof bytes never trap, and what decodes is canonical")
    func hostileProofBytes() async throws {
        let tree = try MerkleSumTree(leaves: Self.leaves(count: 37, seed: 3))
        let valid = try tree.proof(at: 36).canonicalBytes
        await propertyCheck(count: 500, input: Gen.uint8().array(of: 0...200)) { bytes in
            if let proof = try? MerkleSumProof(canonicalBytes: bytes) { #expect(proof.canonicalBytes == bytes) }
        }
        await propertyCheck(count: 500, input: Gen.int(in: 0...10_000), Gen.uint8(), Gen.int(in: 0...2)) { position, value, kind in
            var bytes = valid
            let at = position % bytes.count
            switch kind {
            case 0: bytes[at] ^= value | 1
            case 1: bytes = Array(bytes.prefix(at))
            default: bytes.insert(value, at: at)
            }
            if let proof = try? MerkleSumProof(canonicalBytes: bytes) { #expect(proof.canonicalBytes == bytes) }
        }
        // Counts at their limits: 255 siblings, index ≥ size, size 0, size past 2^32.
        var refused = [[UInt8]]()
        var writer = ByteWriter()
        writer.write(UInt64(0)); writer.write(UInt64(2)); writer.write(UInt8(255))
        refused.append(writer.bytes)
        for (index, size) in [(UInt64(5), UInt64(5)), (0, 0), (0, (1 << 32) + 1), (UInt64.max, UInt64.max)] {
            var w = ByteWriter()
            w.write(index); w.write(size); w.write(UInt8(0))
            refused.append(w.bytes)
        }
        for bytes in refused { #expect(throws: DecodingError.self) { try MerkleSumProof(canonicalBytes: bytes) } }
    }
}
