import Crypto
import Foundation

/// Why a Merkle-sum tree could not be built or a proof did not verify. `code` is stable (APIs, logs, tests).
public enum MerkleSumError: Error, Hashable, Sendable, CustomStringConvertible {
    /// A sum over leaves exceeded UInt64.max base units.
    case sumOverflow
    case tooManyLeaves(count: UInt64, limit: UInt64)
    case emptyTree
    case indexOutOfRange(index: UInt64, leafCount: UInt64)
    /// The proof has a different number of sibling entries than the tree shape for (index, leafCount) requires.
    case proofLength(expected: Int, got: Int)
    /// The recomputed root hash differs from the expected one.
    case rootMismatch
    /// The recomputed total differs from the expected one.
    case sumMismatch(expected: UInt64, got: UInt64)

    public var code: String {
        switch self {
        case .sumOverflow: "merkle_sum_overflow"
        case .tooManyLeaves: "merkle_too_many_leaves"
        case .emptyTree: "merkle_empty_tree"
        case .indexOutOfRange: "merkle_index_out_of_range"
        case .proofLength: "merkle_proof_length"
        case .rootMismatch: "merkle_root_mismatch"
        case .sumMismatch: "merkle_sum_mismatch"
        }
    }

    public var description: String {
        switch self {
        case .sumOverflow: "the amounts add up to more than UInt64.max base units"
        case .tooManyLeaves(let count, let limit): "\(count) leaves exceed the limit of \(limit)"
        case .emptyTree: "the tree has no leaves"
        case .indexOutOfRange(let index, let count): "leaf index \(index) is outside a tree of \(count) leaves"
        case .proofLength(let expected, let got): "the proof has \(got) entries; a leaf at this position needs \(expected)"
        case .rootMismatch: "the proof does not lead to the expected root hash"
        case .sumMismatch(let expected, let got): "the proof adds up to \(got) base units, not the expected \(expected)"
        }
    }
}

/// A node of a Merkle-sum tree: its hash and the sum of the amounts of the leaves under it.
public struct MerkleSumNode: Hashable, Sendable, CustomStringConvertible {
    public let hash: Hash32
    public let sum: UInt64

    public init(hash: Hash32, sum: UInt64) {
        self.hash = hash
        self.sum = sum
    }

    public var description: String { "\(hash.hex.prefix(16))…/\(sum)" }
}

extension MerkleSumNode: CanonicalCodable {
    /// hash (32 raw bytes) ‖ sum (8 bytes big-endian).
    public func encode(to writer: inout ByteWriter) {
        hash.encode(to: &writer)
        writer.write(sum)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        hash = try Hash32(from: &reader)
        sum = try reader.readUInt64()
    }
}

/// The preimage of an inner node: its two children. Hashing it gives the inner node's hash; its sum is the sum of
/// the children's (checked).
public struct MerkleSumPreimage: Hashable, Sendable {
    public let left: MerkleSumNode
    public let right: MerkleSumNode

    public init(left: MerkleSumNode, right: MerkleSumNode) {
        self.left = left
        self.right = right
    }

    public var hash: Hash32 { MerkleSumTree.innerHash(left: left, right: right) }

    /// left.sum + right.sum, or nil on overflow.
    public var sum: UInt64? {
        let (total, overflow) = left.sum.addingReportingOverflow(right.sum)
        return overflow ? nil : total
    }
}

extension MerkleSumPreimage: CanonicalCodable {
    public func encode(to writer: inout ByteWriter) {
        left.encode(to: &writer)
        right.encode(to: &writer)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        left = try MerkleSumNode(from: &reader)
        right = try MerkleSumNode(from: &reader)
    }
}

/// 32 digest bytes held inline in four words, so that building a tree of a million leaves does not allocate a
/// million arrays. Native byte order in, native byte order out: only ever round-trips bytes.
@usableFromInline
struct InlineDigest: Hashable, Sendable {
    var w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64

    init(_ digest: SHA256.Digest) {
        (w0, w1, w2, w3) = digest.withUnsafeBytes { raw in
            (raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self), raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self),
             raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self), raw.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
        }
    }

    init(_ hash: Hash32) {
        (w0, w1, w2, w3) = hash.bytes.withUnsafeBytes { raw in
            (raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self), raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self),
             raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self), raw.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
        }
    }

    var hash32: Hash32 {
        var copy = self
        return withUnsafeBytes(of: &copy) { Hash32(uncheckedBytes: Array($0)) }
    }

    /// Writes the 32 bytes at `offset` of `buffer`.
    func store(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) {
        buffer.storeBytes(of: w0, toByteOffset: offset, as: UInt64.self)
        buffer.storeBytes(of: w1, toByteOffset: offset + 8, as: UInt64.self)
        buffer.storeBytes(of: w2, toByteOffset: offset + 16, as: UInt64.self)
        buffer.storeBytes(of: w3, toByteOffset: offset + 24, as: UInt64.self)
    }
}

/// A node while a tree is being built: inline digest plus sum.
@usableFromInline
struct PackedSumNode: Hashable, Sendable {
    var digest: InlineDigest
    var sum: UInt64

    init(digest: InlineDigest, sum: UInt64) {
        self.digest = digest
        self.sum = sum
    }

    init(_ node: MerkleSumNode) { self.init(digest: InlineDigest(node.hash), sum: node.sum) }

    var node: MerkleSumNode { MerkleSumNode(hash: digest.hash32, sum: sum) }

    /// H(0x01 ‖ h_left ‖ sum_left ‖ h_right ‖ sum_right), sum = sum_left + sum_right (checked).
    static func parent(_ left: PackedSumNode, _ right: PackedSumNode) throws(MerkleSumError) -> PackedSumNode {
        let (sum, overflow) = left.sum.addingReportingOverflow(right.sum)
        guard !overflow else { throw .sumOverflow }
        let digest = withUnsafeTemporaryAllocation(byteCount: 81, alignment: 8) { buffer in
            buffer.storeBytes(of: 0x01, toByteOffset: 0, as: UInt8.self)
            left.digest.store(into: buffer, at: 1)
            buffer.storeBytes(of: left.sum.bigEndian, toByteOffset: 33, as: UInt64.self)
            right.digest.store(into: buffer, at: 41)
            buffer.storeBytes(of: right.sum.bigEndian, toByteOffset: 73, as: UInt64.self)
            var hasher = SHA256()
            hasher.update(bufferPointer: UnsafeRawBufferPointer(buffer))
            return hasher.finalize()
        }
        return PackedSumNode(digest: InlineDigest(digest), sum: sum)
    }
}

/// A binary Merkle-sum tree over SHA-256, the settlement rollup's tree.
///
/// - leaf = H(0x00 ‖ leaf bytes), carrying its amount (base units);
/// - inner node = H(0x01 ‖ h_left ‖ sum_left ‖ h_right ‖ sum_right), sums as 8 bytes big-endian, so every sum a
///   proof uses is committed by the hash above it; an inner node's sum is sum_left + sum_right, checked for overflow;
/// - levels pair nodes (0,1), (2,3), …; an odd last node is promoted to the next level as it is (not duplicated);
/// - the empty tree's root is (SHA-256 of nothing, 0).
///
/// The tree keeps every level, so that it can hand out inclusion proofs. For a root alone use
/// `MerkleSumAccumulator`, which needs O(log n) memory and gives the same root.
public struct MerkleSumTree: Sendable {
    /// At most 2^32 leaves: proofs then have at most 32 entries.
    public static let maxLeafCount: UInt64 = 1 << 32

    public static let emptyRoot = MerkleSumNode(hash: Hash32.of([UInt8]()), sum: 0)

    /// levels[0] are the leaves, the last level holds the root alone.
    private let levels: [[PackedSumNode]]

    public var leafCount: Int { levels[0].count }
    public var root: MerkleSumNode { levels[0].isEmpty ? Self.emptyRoot : levels[levels.count - 1][0].node }

    /// Builds over (leaf bytes, amount) pairs in the given order.
    public init<D: DataProtocol>(leaves: [(bytes: D, amount: UInt64)]) throws(MerkleSumError) {
        try self.init(packed: leaves.map { PackedSumNode(digest: Self.leafDigest($0.bytes), sum: $0.amount) })
    }

    /// Builds over already-hashed leaves (hash = `leafHash(bytes)`, sum = the leaf's amount), in order.
    public init(leafNodes: [MerkleSumNode]) throws(MerkleSumError) {
        try self.init(packed: leafNodes.map(PackedSumNode.init))
    }

    init(packed leaves: [PackedSumNode]) throws(MerkleSumError) {
        guard UInt64(leaves.count) <= Self.maxLeafCount else {
            throw .tooManyLeaves(count: UInt64(leaves.count), limit: Self.maxLeafCount)
        }
        var levels = [leaves]
        var level = leaves
        while level.count > 1 {
            var next = [PackedSumNode]()
            next.reserveCapacity((level.count + 1) / 2)
            var i = 0
            while i < level.count {
                next.append(i + 1 < level.count ? try PackedSumNode.parent(level[i], level[i + 1]) : level[i])
                i += 2
            }
            levels.append(next)
            level = next
        }
        self.levels = levels
    }

    /// The leaf at `index`: (leaf hash, amount).
    public func leaf(at index: Int) -> MerkleSumNode? { levels[0].indices.contains(index) ? levels[0][index].node : nil }

    /// Inclusion proof for the leaf at `index`: its siblings from the bottom up. Promoted levels add no entry.
    public func proof(at index: Int) throws(MerkleSumError) -> MerkleSumProof {
        guard levels[0].indices.contains(index) else { throw .indexOutOfRange(index: UInt64(max(0, index)), leafCount: UInt64(leafCount)) }
        var siblings = [MerkleSumNode]()
        var position = index
        for level in levels.dropLast() {
            let sibling = position ^ 1
            if sibling < level.count { siblings.append(level[sibling].node) }
            position /= 2
        }
        return MerkleSumProof(uncheckedIndex: UInt64(index), leafCount: UInt64(leafCount), siblings: siblings)
    }

    /// The preimages (children) of every inner node above the leaf at `index`, bottom up: what a challenger posts to
    /// show that a sum along the path does not add up.
    public func preimagePath(at index: Int) -> [MerkleSumPreimage]? {
        guard levels[0].indices.contains(index) else { return nil }
        var path = [MerkleSumPreimage]()
        var position = index
        for level in levels.dropLast() {
            let sibling = position ^ 1
            if sibling < level.count {
                let left = level[min(position, sibling)], right = level[max(position, sibling)]
                path.append(MerkleSumPreimage(left: left.node, right: right.node))
            }
            position /= 2
        }
        return path
    }

    // MARK: Hashing

    static func leafDigest<D: DataProtocol>(_ bytes: D) -> InlineDigest {
        var hasher = SHA256()
        withUnsafeBytes(of: UInt8(0x00)) { hasher.update(bufferPointer: $0) }
        hasher.update(data: bytes)
        return InlineDigest(hasher.finalize())
    }

    /// H(0x00 ‖ bytes).
    public static func leafHash<D: DataProtocol>(_ bytes: D) -> Hash32 { leafDigest(bytes).hash32 }

    /// H(0x01 ‖ h_left ‖ sum_left ‖ h_right ‖ sum_right).
    public static func innerHash(left: MerkleSumNode, right: MerkleSumNode) -> Hash32 {
        var writer = ByteWriter(capacity: 81)
        writer.write(UInt8(0x01))
        left.encode(to: &writer)
        right.encode(to: &writer)
        return Hash32.of(writer.bytes)
    }

    /// The parent of two nodes; the sum is checked.
    public static func parent(_ left: MerkleSumNode, _ right: MerkleSumNode) throws(MerkleSumError) -> MerkleSumNode {
        let (sum, overflow) = left.sum.addingReportingOverflow(right.sum)
        guard !overflow else { throw .sumOverflow }
        return MerkleSumNode(hash: innerHash(left: left, right: right), sum: sum)
    }

    /// For each level a leaf at `index` of a `leafCount`-leaf tree passes on its way up: whether its sibling sits on
    /// the left, or nil where it is promoted (no sibling). Nil when the position does not exist.
    public static func shape(index: UInt64, leafCount: UInt64) -> [Bool?]? {
        guard leafCount >= 1, leafCount <= maxLeafCount, index < leafCount else { return nil }
        var steps = [Bool?]()
        var position = index, size = leafCount
        while size > 1 {
            if position & 1 == 1 { steps.append(true) } else if position + 1 < size { steps.append(false) } else { steps.append(nil) }
            position >>= 1
            size = (size + 1) >> 1
        }
        return steps
    }
}

/// Computes a Merkle-sum root from leaves appended one at a time, with one pending node per level (O(log n) memory).
/// Gives exactly `MerkleSumTree`'s root: a node waits at its level for a right sibling; at the end a lone node is
/// promoted and joins the next pending node above it as its right child.
public struct MerkleSumAccumulator: Sendable {
    /// pending[k]: a node at level k waiting for its right sibling.
    private var pending: [PackedSumNode?] = []
    public private(set) var leafCount: UInt64 = 0
    public private(set) var total: UInt64 = 0

    public init() {}

    /// The nodes waiting for a right sibling, by level (nil: none at that level): with `leafCount` and `total`,
    /// all the state there is (the ledger commits to it while a data answer arrives in chunks).
    public var frontier: [MerkleSumNode?] { pending.map { $0?.node } }

    public mutating func append<D: DataProtocol>(leafBytes: D, amount: UInt64) throws(MerkleSumError) {
        try append(PackedSumNode(digest: MerkleSumTree.leafDigest(leafBytes), sum: amount))
    }

    public mutating func append(leaf: MerkleSumNode) throws(MerkleSumError) { try append(PackedSumNode(leaf)) }

    mutating func append(_ leaf: PackedSumNode) throws(MerkleSumError) {
        guard leafCount < MerkleSumTree.maxLeafCount else {
            throw .tooManyLeaves(count: leafCount + 1, limit: MerkleSumTree.maxLeafCount)
        }
        // Every inner sum is at most the total, so checking the total first means no inner sum can overflow
        // and a failed append leaves the accumulator unchanged.
        let (newTotal, overflow) = total.addingReportingOverflow(leaf.sum)
        guard !overflow else { throw .sumOverflow }
        var carry = leaf
        var level = 0
        while true {
            if level == pending.count { pending.append(carry); break }
            guard let left = pending[level] else { pending[level] = carry; break }
            carry = try PackedSumNode.parent(left, carry)
            pending[level] = nil
            level += 1
        }
        total = newTotal
        leafCount += 1
    }

    /// The root over the leaves so far (the empty root when there are none).
    public var root: MerkleSumNode {
        get throws(MerkleSumError) {
            var carry: PackedSumNode?
            for node in pending {
                guard let node else { continue }
                if let right = carry { carry = try PackedSumNode.parent(node, right) } else { carry = node }
            }
            return carry?.node ?? MerkleSumTree.emptyRoot
        }
    }
}

/// An inclusion proof: the leaf's position, the tree's size and the siblings from the bottom up. The sides follow
/// from (index, leafCount), so a proof also proves the leaf's position, which makes "leaves i and i+1 are
/// adjacent" provable. Encoded: index u64 ‖ leafCount u64 ‖ entries u8 ‖ entries × (hash 32 ‖ sum u64) (417 bytes for
/// one leaf of a 1,000-leaf tree).
public struct MerkleSumProof: Hashable, Sendable {
    public static let maxSiblings = 32

    public let index: UInt64
    public let leafCount: UInt64
    public let siblings: [MerkleSumNode]

    /// Checks that the siblings fit the shape of (index, leafCount).
    public init(index: UInt64, leafCount: UInt64, siblings: [MerkleSumNode]) throws(MerkleSumError) {
        guard leafCount >= 1 else { throw .emptyTree }
        guard leafCount <= MerkleSumTree.maxLeafCount else { throw .tooManyLeaves(count: leafCount, limit: MerkleSumTree.maxLeafCount) }
        guard index < leafCount else { throw .indexOutOfRange(index: index, leafCount: leafCount) }
        let expected = MerkleSumTree.shape(index: index, leafCount: leafCount)?.compactMap { $0 }.count ?? 0
        guard siblings.count == expected else { throw .proofLength(expected: expected, got: siblings.count) }
        self.init(uncheckedIndex: index, leafCount: leafCount, siblings: siblings)
    }

    init(uncheckedIndex index: UInt64, leafCount: UInt64, siblings: [MerkleSumNode]) {
        self.index = index
        self.leafCount = leafCount
        self.siblings = siblings
    }

    /// Recomputes the root from the leaf (hash = `MerkleSumTree.leafHash(bytes)`, amount), checking every sum.
    public func root(leafHash: Hash32, amount: UInt64) throws(MerkleSumError) -> MerkleSumNode {
        guard let shape = MerkleSumTree.shape(index: index, leafCount: leafCount) else {
            throw .indexOutOfRange(index: index, leafCount: leafCount)
        }
        let expected = shape.compactMap { $0 }.count
        guard siblings.count == expected else { throw .proofLength(expected: expected, got: siblings.count) }
        var current = PackedSumNode(digest: InlineDigest(leafHash), sum: amount)
        var next = 0
        for step in shape {
            guard let siblingIsLeft = step else { continue }
            let sibling = PackedSumNode(siblings[next])
            next += 1
            current = siblingIsLeft ? try PackedSumNode.parent(sibling, current) : try PackedSumNode.parent(current, sibling)
        }
        return current.node
    }

    /// Throws unless the leaf leads to exactly `root` (hash and sum).
    public func verify(leafHash: Hash32, amount: UInt64, root expected: MerkleSumNode) throws(MerkleSumError) {
        let computed = try root(leafHash: leafHash, amount: amount)
        guard computed.hash == expected.hash else { throw .rootMismatch }
        guard computed.sum == expected.sum else { throw .sumMismatch(expected: expected.sum, got: computed.sum) }
    }

    /// Same, from the leaf's bytes.
    public func verify<D: DataProtocol>(leafBytes: D, amount: UInt64, root expected: MerkleSumNode) throws(MerkleSumError) {
        try verify(leafHash: MerkleSumTree.leafHash(leafBytes), amount: amount, root: expected)
    }
}

extension MerkleSumProof: CanonicalCodable {
    public func encode(to writer: inout ByteWriter) {
        writer.write(index)
        writer.write(leafCount)
        writer.write(UInt8(truncatingIfNeeded: siblings.count))
        for sibling in siblings { sibling.encode(to: &writer) }
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let index = try reader.readUInt64()
        let leafCount = try reader.readUInt64()
        let count = Int(try reader.readUInt8())
        guard count <= Self.maxSiblings else { throw .invalidValue("merkle proof with \(count) entries (at most \(Self.maxSiblings))") }
        var siblings = [MerkleSumNode]()
        siblings.reserveCapacity(count)
        for _ in 0..<count { siblings.append(try MerkleSumNode(from: &reader)) }
        do { try self.init(index: index, leafCount: leafCount, siblings: siblings) } catch {
            throw .invalidValue("merkle proof: \(error.description)")
        }
    }
}
