/// A binary Merkle tree over SHA-256 in the style of RFC 6962: leaves are hashed with a 0x00 prefix and
/// inner nodes with 0x01, so a leaf can never be passed off as an inner node. An odd node is promoted as is.
public enum MerkleTree {
    public static func leafHash(_ data: [UInt8]) -> Hash32 { Hash32.of([0x00] + data) }

    static func nodeHash(_ left: Hash32, _ right: Hash32) -> Hash32 { Hash32.of([0x01] + left.bytes + right.bytes) }

    /// Root over already-hashed leaves, in order. The empty tree's root is SHA-256 of nothing.
    public static func root(leafHashes: [Hash32]) -> Hash32 {
        guard !leafHashes.isEmpty else { return Hash32.of([UInt8]()) }
        var level = leafHashes
        while level.count > 1 {
            var next = [Hash32]()
            next.reserveCapacity((level.count + 1) / 2)
            var i = 0
            while i < level.count {
                next.append(i + 1 < level.count ? nodeHash(level[i], level[i + 1]) : level[i])
                i += 2
            }
            level = next
        }
        return level[0]
    }

    public static func root(leaves: [[UInt8]]) -> Hash32 { root(leafHashes: leaves.map(leafHash)) }

    /// One step of an inclusion proof: the sibling hash and whether it sits on the left.
    public struct ProofStep: Hashable, Sendable, Codable {
        public var sibling: Hash32
        public var siblingIsLeft: Bool
    }

    /// Inclusion proof for the leaf at `index`.
    public static func proof(leafHashes: [Hash32], index: Int) -> [ProofStep]? {
        guard leafHashes.indices.contains(index) else { return nil }
        var steps = [ProofStep]()
        var level = leafHashes
        var position = index
        while level.count > 1 {
            let sibling = position ^ 1
            if sibling < level.count {
                steps.append(ProofStep(sibling: level[sibling], siblingIsLeft: sibling < position))
            }
            var next = [Hash32]()
            var i = 0
            while i < level.count {
                next.append(i + 1 < level.count ? nodeHash(level[i], level[i + 1]) : level[i])
                i += 2
            }
            level = next
            position /= 2
        }
        return steps
    }

    public static func verify(leafHash: Hash32, proof: [ProofStep], root: Hash32) -> Bool {
        var current = leafHash
        for step in proof {
            current = step.siblingIsLeft ? nodeHash(step.sibling, current) : nodeHash(current, step.sibling)
        }
        return current == root
    }
}
