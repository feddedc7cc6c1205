import EdgeMatrixCore
import Foundation

// Settlement batches: the rollup of a router's receipts that the ledger settles once per batch (docs/PROTOCOL.md,
// "Settlement batches"). Everything here is pure and deterministic: integers of base units, checked sums, no clock,
// no dictionary order. Receipts are opaque bytes here; what a receipt says (its key and what it is worth) comes
// from a `SettlementLeafVerifier` that the ledger plugs in.

// MARK: - Keys and pairs

/// Who pays whom: a payer account and a compute node (its registry key).
public struct SettlementPair: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let payer: Account
    public let node: PublicKey

    public init(payer: Account, node: PublicKey) {
        self.payer = payer
        self.node = node
    }

    /// By payer (Account order), then node key bytes.
    public static func < (lhs: SettlementPair, rhs: SettlementPair) -> Bool {
        if lhs.payer != rhs.payer { return lhs.payer < rhs.payer }
        return lhs.node.rawRepresentation.lexicographicallyPrecedes(rhs.node.rawRepresentation)
    }

    public var description: String { "\(payer)→\(node.nodeID.short)" }
}

/// The order of leaves in a batch: (payer, node, router sequence number, attempt). Strictly increasing in a batch.
public struct SettlementLeafKey: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let payer: Account
    public let node: PublicKey
    public let sequence: UInt64
    public let attempt: UInt32

    public init(payer: Account, node: PublicKey, sequence: UInt64, attempt: UInt32) {
        self.payer = payer
        self.node = node
        self.sequence = sequence
        self.attempt = attempt
    }

    public var pair: SettlementPair { SettlementPair(payer: payer, node: node) }

    public static func < (lhs: SettlementLeafKey, rhs: SettlementLeafKey) -> Bool {
        if lhs.payer != rhs.payer || lhs.node != rhs.node { return lhs.pair < rhs.pair }
        return (lhs.sequence, lhs.attempt) < (rhs.sequence, rhs.attempt)
    }

    public var description: String { "\(pair)#\(sequence).\(attempt)" }
}

extension SettlementLeafKey: CanonicalCodable {
    /// payer (Account) ‖ node (32) ‖ sequence u64 ‖ attempt u32.
    public func encode(to writer: inout ByteWriter) {
        payer.encode(to: &writer)
        node.encode(to: &writer)
        writer.write(sequence)
        writer.write(attempt)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        payer = try Account(from: &reader)
        node = try PublicKey(from: &reader)
        sequence = try reader.readUInt64()
        attempt = try reader.readUInt32()
    }
}

/// One leaf as the router holds it: the receipt's key, its bytes (what the leaf hash covers) and its amount.
public struct SettlementLeaf: Hashable, Sendable {
    public let key: SettlementLeafKey
    public let receiptBytes: [UInt8]
    public let amount: UInt64

    public init(key: SettlementLeafKey, receiptBytes: [UInt8], amount: UInt64) {
        self.key = key
        self.receiptBytes = receiptBytes
        self.amount = amount
    }
}

// MARK: - Errors

/// Why a batch could not be built or decoded. `code` is stable.
public enum SettlementError: Error, Hashable, Sendable, CustomStringConvertible {
    case badSequenceRange(first: UInt64, last: UInt64)
    case tooManyEntries(count: Int, limit: Int)
    case entriesOutOfOrder(index: Int)
    case emptyPair(index: Int)
    case pairTooLarge(index: Int, count: UInt64)
    case amountOverflow
    case receiptCountOverflow
    case leavesOutOfOrder(previous: SettlementLeafKey, next: SettlementLeafKey)
    case duplicateLeaf(SettlementLeafKey)
    case leafOutsideRange(sequence: UInt64, first: UInt64, last: UInt64)
    case receiptTooLarge(size: Int, limit: Int)
    case emptyReceipt
    case mixedPairs(index: Int)
    case noLeaves
    case unknownEntry(index: Int)
    case merkle(MerkleSumError)

    public var code: String {
        switch self {
        case .badSequenceRange: "settlement_bad_sequence_range"
        case .tooManyEntries: "settlement_too_many_entries"
        case .entriesOutOfOrder: "settlement_entries_out_of_order"
        case .emptyPair: "settlement_empty_pair"
        case .pairTooLarge: "settlement_pair_too_large"
        case .amountOverflow: "settlement_amount_overflow"
        case .receiptCountOverflow: "settlement_receipt_count_overflow"
        case .leavesOutOfOrder: "settlement_leaves_out_of_order"
        case .duplicateLeaf: "settlement_duplicate_leaf"
        case .leafOutsideRange: "settlement_leaf_outside_range"
        case .receiptTooLarge: "settlement_receipt_too_large"
        case .emptyReceipt: "settlement_empty_receipt"
        case .mixedPairs: "settlement_mixed_pairs"
        case .noLeaves: "settlement_no_leaves"
        case .unknownEntry: "settlement_unknown_entry"
        case .merkle(let inner): inner.code
        }
    }

    public var description: String {
        switch self {
        case .badSequenceRange(let first, let last): "sequence range \(first)...\(last) is empty (first > last)"
        case .tooManyEntries(let count, let limit): "\(count) pair entries exceed the limit of \(limit) per batch"
        case .entriesOutOfOrder(let index): "pair entry \(index) is not after entry \(index - 1) in (payer, node) order"
        case .emptyPair(let index): "pair entry \(index) counts no receipts"
        case .pairTooLarge(let index, let count): "pair entry \(index) counts \(count) receipts, more than \(MerkleSumTree.maxLeafCount)"
        case .amountOverflow: "the amounts add up to more than UInt64.max base units"
        case .receiptCountOverflow: "the receipt counts add up to more than UInt64.max"
        case .leavesOutOfOrder(let previous, let next): "leaf \(next) comes after \(previous) but is not greater in (payer, node, sequence, attempt)"
        case .duplicateLeaf(let key): "two leaves have the key \(key)"
        case .leafOutsideRange(let sequence, let first, let last): "sequence \(sequence) is outside the batch's range \(first)...\(last)"
        case .receiptTooLarge(let size, let limit): "a receipt of \(size) bytes exceeds the limit of \(limit)"
        case .emptyReceipt: "a leaf has no receipt bytes"
        case .mixedPairs(let index): "leaf \(index) belongs to another (payer, node) pair than the first leaf"
        case .noLeaves: "no leaves"
        case .unknownEntry(let index): "the batch has no pair entry \(index)"
        case .merkle(let inner): inner.description
        }
    }
}

// MARK: - Pair entries and the batch

/// What the `settle` transaction says about one (payer, node) pair: the amount, the number of receipts and the root
/// of the pair's Merkle-sum tree over those receipts.
public struct SettlementPairEntry: Hashable, Sendable {
    public let payer: Account
    public let node: PublicKey
    public let amount: UInt64
    public let count: UInt64
    public let pairRoot: Hash32

    public init(payer: Account, node: PublicKey, amount: UInt64, count: UInt64, pairRoot: Hash32) {
        self.payer = payer
        self.node = node
        self.amount = amount
        self.count = count
        self.pairRoot = pairRoot
    }

    public var pair: SettlementPair { SettlementPair(payer: payer, node: node) }

    /// The pair tree's root as a proof must reach it: (pairRoot, amount).
    public var pairRootNode: MerkleSumNode { MerkleSumNode(hash: pairRoot, sum: amount) }

    /// The entry's leaf in the batch's top tree: H(0x02 ‖ payer ‖ node ‖ pairRoot ‖ amount u64 ‖ count u64), carrying
    /// `amount`. The hash binds the amount and count to the pair's leaves; the sum binds it to the batch total.
    public var topLeaf: MerkleSumNode {
        var writer = ByteWriter(capacity: 160)
        writer.write(UInt8(0x02))
        payer.encode(to: &writer)
        node.encode(to: &writer)
        pairRoot.encode(to: &writer)
        writer.write(amount)
        writer.write(count)
        return MerkleSumNode(hash: Hash32.of(writer.bytes), sum: amount)
    }
}

extension SettlementPairEntry: CanonicalCodable {
    /// payer (Account: 33 or 65 bytes) ‖ node (32) ‖ amount u64 ‖ count u64 ‖ pairRoot (32).
    public func encode(to writer: inout ByteWriter) {
        payer.encode(to: &writer)
        node.encode(to: &writer)
        writer.write(amount)
        writer.write(count)
        pairRoot.encode(to: &writer)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        payer = try Account(from: &reader)
        node = try PublicKey(from: &reader)
        amount = try reader.readUInt64()
        count = try reader.readUInt64()
        pairRoot = try Hash32(from: &reader)
    }

    /// The smallest encoding: default subaccount.
    static let minimumEncodedSize = 33 + 32 + 8 + 8 + 32
}

/// A router's settlement batch as the `settle` transaction carries it. The ledger builds the top of the tree from the
/// entries itself (`root`), so nothing about the root is taken on trust.
///
/// Invariants, checked by `init` (and so by decoding): first ≤ last, at most `maxEntries` entries in strictly
/// increasing (payer, node) order, every count in 1...2^32, the amounts and counts add up without overflow.
public struct SettlementBatch: Hashable, Sendable {
    public static let version: UInt8 = 1
    /// At most this many (payer, node) pairs per batch: 7,000 entries of at most 145 bytes keep a `settle`
    /// transaction under 1 MiB (`TransactionLimits.maxSettleTransactionBytes`). A router with more pairs in an
    /// epoch closes more than one batch.
    public static let maxEntries = 7_000
    /// A leaf's receipt bytes are at most this long.
    public static let maxReceiptBytes = 64 * 1024

    public let router: PublicKey
    /// The router's batch number: 0, 1, 2, … with no gap.
    public let batchNumber: UInt64
    /// The router sequence numbers this batch covers, contiguous; the next batch starts at `lastSequence + 1`.
    public let firstSequence: UInt64
    public let lastSequence: UInt64
    public let entries: [SettlementPairEntry]

    /// The top tree's root over `entries` (its sum is the batch total). Computed here, never decoded.
    public let root: MerkleSumNode
    /// Σ count.
    public let receiptCount: UInt64

    public init(router: PublicKey, batchNumber: UInt64, firstSequence: UInt64, lastSequence: UInt64,
                entries: [SettlementPairEntry]) throws(SettlementError) {
        guard firstSequence <= lastSequence else { throw .badSequenceRange(first: firstSequence, last: lastSequence) }
        guard entries.count <= Self.maxEntries else { throw .tooManyEntries(count: entries.count, limit: Self.maxEntries) }
        var receipts: UInt64 = 0
        var total: UInt64 = 0
        for (index, entry) in entries.enumerated() {
            if index > 0, !(entries[index - 1].pair < entry.pair) { throw .entriesOutOfOrder(index: index) }
            guard entry.count >= 1 else { throw .emptyPair(index: index) }
            guard entry.count <= MerkleSumTree.maxLeafCount else { throw .pairTooLarge(index: index, count: entry.count) }
            let (newTotal, amountOverflow) = total.addingReportingOverflow(entry.amount)
            guard !amountOverflow else { throw .amountOverflow }
            let (newReceipts, countOverflow) = receipts.addingReportingOverflow(entry.count)
            guard !countOverflow else { throw .receiptCountOverflow }
            total = newTotal
            receipts = newReceipts
        }
        let top: MerkleSumTree
        do { top = try MerkleSumTree(leafNodes: entries.map(\.topLeaf)) } catch { throw .merkle(error) }
        self.router = router
        self.batchNumber = batchNumber
        self.firstSequence = firstSequence
        self.lastSequence = lastSequence
        self.entries = entries
        self.root = top.root
        self.receiptCount = receipts
    }

    public var sequenceRange: ClosedRange<UInt64> { firstSequence...lastSequence }
    /// Σ amount, in base units.
    public var total: UInt64 { root.sum }

    /// H(0x03 ‖ router ‖ batchNumber ‖ first ‖ last ‖ root hash ‖ total): names the batch in challenges and state.
    public var commitment: Hash32 {
        var writer = ByteWriter(capacity: 128)
        writer.write(UInt8(0x03))
        router.encode(to: &writer)
        writer.write(batchNumber)
        writer.write(firstSequence)
        writer.write(lastSequence)
        root.encode(to: &writer)
        return Hash32.of(writer.bytes)
    }

    /// The entry for a pair, by binary search (entries are sorted).
    public func entryIndex(for pair: SettlementPair) -> Int? {
        var low = 0, high = entries.count
        while low < high {
            let mid = low + (high - low) / 2
            let candidate = entries[mid].pair
            if candidate == pair { return mid }
            if candidate < pair { low = mid + 1 } else { high = mid }
        }
        return nil
    }

    /// Proof that entry `index` is in the top tree (for parties that hold the batch root only).
    public func entryProof(at index: Int) throws(SettlementError) -> MerkleSumProof {
        guard entries.indices.contains(index) else { throw .unknownEntry(index: index) }
        do { return try MerkleSumTree(leafNodes: entries.map(\.topLeaf)).proof(at: index) } catch { throw .merkle(error) }
    }
}

extension SettlementBatch: CanonicalCodable {
    /// version u8 ‖ router (32) ‖ batchNumber u64 ‖ first u64 ‖ last u64 ‖ entry count u32 ‖ entries. The root is
    /// not encoded.
    public func encode(to writer: inout ByteWriter) {
        writer.write(Self.version)
        router.encode(to: &writer)
        writer.write(batchNumber)
        writer.write(firstSequence)
        writer.write(lastSequence)
        writer.write(UInt32(truncatingIfNeeded: entries.count))
        for entry in entries { entry.encode(to: &writer) }
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let version = try reader.readUInt8()
        guard version == Self.version else { throw .invalidValue("settlement batch version \(version)") }
        let router = try PublicKey(from: &reader)
        let batchNumber = try reader.readUInt64()
        let first = try reader.readUInt64()
        let last = try reader.readUInt64()
        let count = Int(try reader.readUInt32())
        guard count <= Self.maxEntries else { throw .lengthTooLarge(count, limit: Self.maxEntries) }
        // Refuse a count that the remaining bytes cannot hold before reserving room for it.
        guard count <= reader.remaining / SettlementPairEntry.minimumEncodedSize else {
            throw .truncated(needed: count * SettlementPairEntry.minimumEncodedSize, available: reader.remaining)
        }
        var entries = [SettlementPairEntry]()
        entries.reserveCapacity(count)
        for _ in 0..<count { entries.append(try SettlementPairEntry(from: &reader)) }
        do {
            try self.init(router: router, batchNumber: batchNumber, firstSequence: first, lastSequence: last, entries: entries)
        } catch { throw .invalidValue("settlement batch: \(error.description)") }
    }
}

// MARK: - Building

/// Builds a batch from leaves given in strictly increasing key order, one pair tree at a time: memory is
/// O(pairs + log(leaves)), not O(leaves). A refused `append` changes nothing.
public struct SettlementBatchBuilder: Sendable {
    public let router: PublicKey
    public let batchNumber: UInt64
    public let firstSequence: UInt64
    public let lastSequence: UInt64

    private var entries: [SettlementPairEntry] = []
    private var lastKey: SettlementLeafKey?
    private var current = MerkleSumAccumulator()
    private var total: UInt64 = 0

    public init(router: PublicKey, batchNumber: UInt64, sequenceRange: ClosedRange<UInt64>) {
        self.router = router
        self.batchNumber = batchNumber
        firstSequence = sequenceRange.lowerBound
        lastSequence = sequenceRange.upperBound
    }

    public var leafCount: UInt64 { entries.reduce(0) { $0 &+ $1.count } &+ current.leafCount }

    public mutating func append<D: DataProtocol>(key: SettlementLeafKey, receiptBytes: D, amount: UInt64) throws(SettlementError) {
        guard !receiptBytes.isEmpty else { throw .emptyReceipt }
        guard receiptBytes.count <= SettlementBatch.maxReceiptBytes else {
            throw .receiptTooLarge(size: receiptBytes.count, limit: SettlementBatch.maxReceiptBytes)
        }
        guard key.sequence >= firstSequence, key.sequence <= lastSequence else {
            throw .leafOutsideRange(sequence: key.sequence, first: firstSequence, last: lastSequence)
        }
        let newPair: Bool
        if let lastKey {
            guard key != lastKey else { throw .duplicateLeaf(key) }
            guard lastKey < key else { throw .leavesOutOfOrder(previous: lastKey, next: key) }
            newPair = lastKey.payer != key.payer || lastKey.node != key.node
        } else {
            newPair = true
        }
        let (newTotal, overflow) = total.addingReportingOverflow(amount)
        guard !overflow else { throw .amountOverflow }
        if newPair {
            // The open pair (if any) becomes an entry, and the new one will be another.
            let pairs = entries.count + (lastKey == nil ? 0 : 1) + 1
            guard pairs <= SettlementBatch.maxEntries else { throw .tooManyEntries(count: pairs, limit: SettlementBatch.maxEntries) }
        } else {
            guard current.leafCount < MerkleSumTree.maxLeafCount else {
                throw .pairTooLarge(index: entries.count, count: current.leafCount + 1)
            }
        }
        // All checks passed: nothing below can fail (the batch total bounds every sum).
        if newPair, let lastKey {
            entries.append(try Self.entry(for: lastKey.pair, current))
            current = MerkleSumAccumulator()
        }
        do { try current.append(leafBytes: receiptBytes, amount: amount) } catch { throw .merkle(error) }
        total = newTotal
        lastKey = key
    }

    public mutating func append(_ leaf: SettlementLeaf) throws(SettlementError) {
        try append(key: leaf.key, receiptBytes: leaf.receiptBytes, amount: leaf.amount)
    }

    /// The batch over everything appended so far.
    public func build() throws(SettlementError) -> SettlementBatch {
        var all = entries
        if let lastKey { all.append(try Self.entry(for: lastKey.pair, current)) }
        return try SettlementBatch(router: router, batchNumber: batchNumber, firstSequence: firstSequence,
                                   lastSequence: lastSequence, entries: all)
    }

    private static func entry(for pair: SettlementPair, _ tree: MerkleSumAccumulator) throws(SettlementError) -> SettlementPairEntry {
        let root: MerkleSumNode
        do { root = try tree.root } catch { throw .merkle(error) }
        return SettlementPairEntry(payer: pair.payer, node: pair.node, amount: root.sum, count: tree.leafCount, pairRoot: root.hash)
    }

    /// Convenience: a whole batch from leaves in key order.
    public static func build(router: PublicKey, batchNumber: UInt64, sequenceRange: ClosedRange<UInt64>,
                             leaves: [SettlementLeaf]) throws(SettlementError) -> SettlementBatch {
        var builder = SettlementBatchBuilder(router: router, batchNumber: batchNumber, sequenceRange: sequenceRange)
        for leaf in leaves { try builder.append(leaf) }
        return try builder.build()
    }

    /// The full tree of one pair's leaves (strictly increasing keys, one pair), to hand out inclusion proofs.
    public static func pairTree(leaves: [SettlementLeaf]) throws(SettlementError) -> MerkleSumTree {
        guard let first = leaves.first else { throw .noLeaves }
        var total: UInt64 = 0
        for (index, leaf) in leaves.enumerated() {
            guard leaf.key.payer == first.key.payer, leaf.key.node == first.key.node else { throw .mixedPairs(index: index) }
            if index > 0 {
                let previous = leaves[index - 1].key
                guard previous != leaf.key else { throw .duplicateLeaf(leaf.key) }
                guard previous < leaf.key else { throw .leavesOutOfOrder(previous: previous, next: leaf.key) }
            }
            let (sum, overflow) = total.addingReportingOverflow(leaf.amount)
            guard !overflow else { throw .amountOverflow }
            total = sum
        }
        do { return try MerkleSumTree(leaves: leaves.map { (bytes: $0.receiptBytes, amount: $0.amount) }) } catch { throw .merkle(error) }
    }
}

// MARK: - Proofs

/// A leaf with its inclusion proof in its pair tree: the unit of evidence in challenges and in the router's
/// data-availability answers.
public struct SettlementLeafWitness: Hashable, Sendable {
    public let receiptBytes: [UInt8]
    public let amount: UInt64
    public let proof: MerkleSumProof

    public init(receiptBytes: [UInt8], amount: UInt64, proof: MerkleSumProof) {
        self.receiptBytes = receiptBytes
        self.amount = amount
        self.proof = proof
    }

    public init(tree: MerkleSumTree, leaves: [SettlementLeaf], index: Int) throws(SettlementError) {
        guard leaves.indices.contains(index) else { throw .merkle(.indexOutOfRange(index: UInt64(max(0, index)), leafCount: UInt64(leaves.count))) }
        do { proof = try tree.proof(at: index) } catch { throw .merkle(error) }
        receiptBytes = leaves[index].receiptBytes
        amount = leaves[index].amount
    }

    /// Throws unless this leaf is at `proof.index` of `entry`'s pair tree (the proof's tree size must be the entry's
    /// count, and it must reach the entry's root and amount).
    public func verify(in entry: SettlementPairEntry) throws(MerkleSumError) {
        guard proof.leafCount == entry.count else { throw .indexOutOfRange(index: proof.index, leafCount: entry.count) }
        try proof.verify(leafBytes: receiptBytes, amount: amount, root: entry.pairRootNode)
    }
}

extension SettlementLeafWitness: CanonicalCodable {
    /// receipt bytes (u32-prefixed, ≤ 64 KiB) ‖ amount u64 ‖ proof.
    public func encode(to writer: inout ByteWriter) {
        writer.write(bytes: receiptBytes)
        writer.write(amount)
        proof.encode(to: &writer)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let length = Int(try reader.readUInt32())
        guard length <= SettlementBatch.maxReceiptBytes else { throw .lengthTooLarge(length, limit: SettlementBatch.maxReceiptBytes) }
        receiptBytes = try reader.readRaw(count: length)
        amount = try reader.readUInt64()
        proof = try MerkleSumProof(from: &reader)
    }
}

/// The full proof that a receipt is in a batch, for parties that hold only the batch's root: the pair entry, its
/// proof in the top tree, and the leaf's proof in the pair tree.
public struct SettlementReceiptProof: Hashable, Sendable {
    public let entry: SettlementPairEntry
    public let entryProof: MerkleSumProof
    public let leafProof: MerkleSumProof

    public init(entry: SettlementPairEntry, entryProof: MerkleSumProof, leafProof: MerkleSumProof) {
        self.entry = entry
        self.entryProof = entryProof
        self.leafProof = leafProof
    }

    /// Throws unless the receipt with `amount` is in the pair tree of `entry`, and `entry` is in the top tree whose
    /// root is `batchRoot`.
    public func verify(receiptBytes: [UInt8], amount: UInt64, batchRoot: MerkleSumNode) throws(MerkleSumError) {
        guard leafProof.leafCount == entry.count else { throw .indexOutOfRange(index: leafProof.index, leafCount: entry.count) }
        try leafProof.verify(leafBytes: receiptBytes, amount: amount, root: entry.pairRootNode)
        let top = entry.topLeaf
        try entryProof.verify(leafHash: top.hash, amount: top.sum, root: batchRoot)
    }
}

extension SettlementReceiptProof: CanonicalCodable {
    public func encode(to writer: inout ByteWriter) {
        entry.encode(to: &writer)
        entryProof.encode(to: &writer)
        leafProof.encode(to: &writer)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        entry = try SettlementPairEntry(from: &reader)
        entryProof = try MerkleSumProof(from: &reader)
        leafProof = try MerkleSumProof(from: &reader)
    }
}

// MARK: - Leaf validity hook

/// What a leaf's receipt says, once decoded and checked: its key and what it is worth in base units.
public struct SettlementLeafValue: Hashable, Sendable {
    public let key: SettlementLeafKey
    public let amount: UInt64

    public init(key: SettlementLeafKey, amount: UInt64) {
        self.key = key
        self.amount = amount
    }
}

/// Why a receipt is not a valid leaf of a batch (bad node signature, wrong router, unknown node, unregistered price,
/// malformed bytes, …). `code` must be stable: it ends up in the verdict.
public struct SettlementLeafRejection: Error, Hashable, Sendable, CustomStringConvertible {
    public let code: String
    public let message: String

    public init(code: String, message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code): \(message)" }
}

/// The ledger's hook for leaf validity: decode the receipt in a leaf, check its signatures against the registry and
/// the batch's router, and compute its amount from its units and the prices in force. Must be deterministic (same
/// bytes, same ledger state → same answer).
public protocol SettlementLeafVerifier: Sendable {
    func verifyLeaf(_ receiptBytes: [UInt8], batch: SettlementBatch) throws(SettlementLeafRejection) -> SettlementLeafValue
}

/// A `SettlementLeafVerifier` from a closure.
public struct ClosureLeafVerifier: SettlementLeafVerifier {
    private let body: @Sendable ([UInt8], SettlementBatch) throws(SettlementLeafRejection) -> SettlementLeafValue

    public init(_ body: @escaping @Sendable ([UInt8], SettlementBatch) throws(SettlementLeafRejection) -> SettlementLeafValue) {
        self.body = body
    }

    public func verifyLeaf(_ receiptBytes: [UInt8], batch: SettlementBatch) throws(SettlementLeafRejection) -> SettlementLeafValue {
        try body(receiptBytes, batch)
    }
}

// MARK: - Challenges

/// A proven fault of a batch: the challenge is upheld.
public enum SettlementFault: Error, Hashable, Sendable, CustomStringConvertible {
    /// (a) The leaf's receipt is not valid (the verifier's code).
    case invalidReceipt(code: String)
    /// (a) The leaf's receipt names another payer or node than its pair entry.
    case leafInWrongPair
    /// (a) The leaf's sequence number is outside the batch's range.
    case sequenceOutOfRange(UInt64)
    /// (a) The leaf's committed amount is not what its receipt is worth.
    case amountMismatch(committed: UInt64, computed: UInt64)
    /// (a) Two leaves bill the same request twice: the same (sequence, attempt), or one sequence for two payers.
    case duplicateSequence(UInt64)
    /// (b) A parent commits a child's sum that its children do not add up to (or the root's sum is not the entry's amount).
    case sumMismatch(committed: UInt64, actual: UInt64)
    /// (b) A node's children add up to more than UInt64.max.
    case sumOverflow
    /// (e) Two adjacent leaves are not strictly increasing in (payer, node, sequence, attempt).
    case leavesOutOfOrder
    /// (c) A receipt the router countersigned for this batch's range is not in the batch.
    case receiptOmitted
    /// (c) The batch holds the receipt's key with less than the receipt is worth.
    case receiptUnderCounted(committed: UInt64, owed: UInt64)

    public var code: String {
        switch self {
        case .invalidReceipt: "fault_invalid_receipt"
        case .leafInWrongPair: "fault_leaf_in_wrong_pair"
        case .sequenceOutOfRange: "fault_sequence_out_of_range"
        case .amountMismatch: "fault_amount_mismatch"
        case .duplicateSequence: "fault_duplicate_sequence"
        case .sumMismatch: "fault_sum_mismatch"
        case .sumOverflow: "fault_sum_overflow"
        case .leavesOutOfOrder: "fault_leaves_out_of_order"
        case .receiptOmitted: "fault_receipt_omitted"
        case .receiptUnderCounted: "fault_receipt_under_counted"
        }
    }

    public var description: String {
        switch self {
        case .invalidReceipt(let code): "a leaf's receipt is invalid (\(code))"
        case .leafInWrongPair: "a leaf's receipt names another payer or node than its pair entry"
        case .sequenceOutOfRange(let sequence): "a leaf's sequence \(sequence) is outside the batch's range"
        case .amountMismatch(let committed, let computed): "a leaf commits \(committed) base units for a receipt worth \(computed)"
        case .duplicateSequence(let sequence): "sequence \(sequence) is billed twice"
        case .sumMismatch(let committed, let actual): "a committed sum of \(committed) base units is really \(actual)"
        case .sumOverflow: "a node's children add up to more than UInt64.max"
        case .leavesOutOfOrder: "adjacent leaves are not strictly increasing in (payer, node, sequence, attempt)"
        case .receiptOmitted: "a countersigned receipt in the batch's range was left out"
        case .receiptUnderCounted(let committed, let owed): "the receipt is counted for \(committed) base units instead of \(owed)"
        }
    }
}

/// Why a challenge proves nothing: it is dismissed (and the challenger's bond burned).
public enum ChallengeDismissal: Hashable, Sendable, CustomStringConvertible {
    case unknownEntry(index: Int)
    /// A witness does not prove its leaf is where it says (the Merkle error).
    case badWitness(MerkleSumError)
    case notAdjacent
    case emptyPath
    /// A preimage on the path is not a child of the next one, or the top does not hash to the pair root.
    case brokenPath(at: Int)
    case sameLeaf
    /// The challenger's own receipt is not valid (the verifier's code).
    case receiptInvalid(code: String)
    case receiptOutsideBatch
    case pairPresent
    case notBracketed
    case keyMismatch
    /// The checked leaves, sums or order are all right.
    case noFault

    public var code: String {
        switch self {
        case .unknownEntry: "dismissed_unknown_entry"
        case .badWitness: "dismissed_bad_witness"
        case .notAdjacent: "dismissed_not_adjacent"
        case .emptyPath: "dismissed_empty_path"
        case .brokenPath: "dismissed_broken_path"
        case .sameLeaf: "dismissed_same_leaf"
        case .receiptInvalid: "dismissed_receipt_invalid"
        case .receiptOutsideBatch: "dismissed_receipt_outside_batch"
        case .pairPresent: "dismissed_pair_present"
        case .notBracketed: "dismissed_not_bracketed"
        case .keyMismatch: "dismissed_key_mismatch"
        case .noFault: "dismissed_no_fault"
        }
    }

    public var description: String {
        switch self {
        case .unknownEntry(let index): "the batch has no pair entry \(index)"
        case .badWitness(let error): "a witness does not verify: \(error.description)"
        case .notAdjacent: "the two leaves are not adjacent in the pair tree"
        case .emptyPath: "the path has no preimages"
        case .brokenPath(let at): "preimage \(at) of the path does not lead to the pair root"
        case .sameLeaf: "both witnesses are the same leaf"
        case .receiptInvalid(let code): "the challenger's receipt is invalid (\(code))"
        case .receiptOutsideBatch: "the receipt's sequence is outside the batch's range"
        case .pairPresent: "the batch has an entry for the receipt's pair; bracket the receipt between leaves instead"
        case .notBracketed: "the receipt's key does not fall where the witnesses say"
        case .keyMismatch: "the witness's key is not the receipt's key"
        case .noFault: "no fault: the batch is right on this point"
        }
    }
}

/// The outcome of checking a challenge.
public enum ChallengeVerdict: Error, Hashable, Sendable, CustomStringConvertible {
    case upheld(SettlementFault)
    case dismissed(ChallengeDismissal)

    public var code: String {
        switch self {
        case .upheld(let fault): fault.code
        case .dismissed(let why): why.code
        }
    }

    public var isUpheld: Bool { if case .upheld = self { true } else { false } }

    public var description: String {
        switch self {
        case .upheld(let fault): "upheld: \(fault)"
        case .dismissed(let why): "dismissed: \(why)"
        }
    }
}

/// How a challenger shows that a receipt was left out (challenge (c)).
public enum OmissionEvidence: Hashable, Sendable {
    /// The batch has no entry for the receipt's (payer, node) pair (the ledger checks this from the entries).
    case pairAbsent
    /// Leaves at indices i and i+1 whose keys bracket the receipt's key.
    case between(SettlementLeafWitness, SettlementLeafWitness)
    /// The first leaf (index 0), whose key is above the receipt's.
    case beforeFirst(SettlementLeafWitness)
    /// The last leaf (index count−1), whose key is below the receipt's.
    case afterLast(SettlementLeafWitness)
    /// The leaf with the receipt's very key, committed for less than the receipt is worth.
    case sameKey(SettlementLeafWitness)
}

extension OmissionEvidence: CanonicalCodable {
    /// u8 tag (0 pairAbsent, 1 between, 2 beforeFirst, 3 afterLast, 4 sameKey) ‖ its witnesses.
    public func encode(to writer: inout ByteWriter) {
        switch self {
        case .pairAbsent: writer.write(UInt8(0))
        case .between(let low, let high):
            writer.write(UInt8(1))
            low.encode(to: &writer)
            high.encode(to: &writer)
        case .beforeFirst(let first):
            writer.write(UInt8(2))
            first.encode(to: &writer)
        case .afterLast(let last):
            writer.write(UInt8(3))
            last.encode(to: &writer)
        case .sameKey(let witness):
            writer.write(UInt8(4))
            witness.encode(to: &writer)
        }
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        switch try reader.readUInt8() {
        case 0: self = .pairAbsent
        case 1: self = .between(try SettlementLeafWitness(from: &reader), try SettlementLeafWitness(from: &reader))
        case 2: self = .beforeFirst(try SettlementLeafWitness(from: &reader))
        case 3: self = .afterLast(try SettlementLeafWitness(from: &reader))
        case 4: self = .sameKey(try SettlementLeafWitness(from: &reader))
        case let tag: throw .invalidValue("omission evidence tag \(tag)")
        }
    }
}

/// The pure fraud-proof checks the ledger runs on a `settle` batch. Each is deterministic and never traps; a witness
/// that does not verify dismisses the challenge before anything else is judged.
extension SettlementBatch {
    private func entry(_ index: Int) -> SettlementPairEntry? { entries.indices.contains(index) ? entries[index] : nil }

    /// Decodes a leaf that is proven in the batch; an invalid receipt is itself a fault.
    private func value(of witness: SettlementLeafWitness, verifier: some SettlementLeafVerifier) -> Result<SettlementLeafValue, SettlementFault> {
        do throws(SettlementLeafRejection) {
            return .success(try verifier.verifyLeaf(witness.receiptBytes, batch: self))
        } catch {
            return .failure(.invalidReceipt(code: error.code))
        }
    }

    /// (a) A leaf whose receipt is invalid, names another pair, lies outside the sequence range, or is committed for
    /// another amount than it is worth. (A sequence settled by an earlier batch is outside this one's range: the
    /// ledger only accepts a batch whose range starts right after the router's previous one.)
    public func checkLeaf(entryIndex: Int, witness: SettlementLeafWitness, verifier: some SettlementLeafVerifier) -> ChallengeVerdict {
        guard let entry = entry(entryIndex) else { return .dismissed(.unknownEntry(index: entryIndex)) }
        do { try witness.verify(in: entry) } catch { return .dismissed(.badWitness(error)) }
        let value: SettlementLeafValue
        switch self.value(of: witness, verifier: verifier) {
        case .failure(let fault): return .upheld(fault)
        case .success(let decoded): value = decoded
        }
        guard value.key.pair == entry.pair else { return .upheld(.leafInWrongPair) }
        guard sequenceRange.contains(value.key.sequence) else { return .upheld(.sequenceOutOfRange(value.key.sequence)) }
        guard value.amount == witness.amount else { return .upheld(.amountMismatch(committed: witness.amount, computed: value.amount)) }
        return .dismissed(.noFault)
    }

    /// (a) Two leaves of the batch (any pairs) that bill one request twice: the same (sequence, attempt), or the same
    /// sequence for two payers. (One sequence at two nodes under one payer is a failover, with distinct attempts.)
    public func checkDuplicateSequence(first: (entryIndex: Int, witness: SettlementLeafWitness),
                                       second: (entryIndex: Int, witness: SettlementLeafWitness),
                                       verifier: some SettlementLeafVerifier) -> ChallengeVerdict {
        guard let firstEntry = entry(first.entryIndex) else { return .dismissed(.unknownEntry(index: first.entryIndex)) }
        guard let secondEntry = entry(second.entryIndex) else { return .dismissed(.unknownEntry(index: second.entryIndex)) }
        guard first.entryIndex != second.entryIndex || first.witness.proof.index != second.witness.proof.index else {
            return .dismissed(.sameLeaf)
        }
        do {
            try first.witness.verify(in: firstEntry)
            try second.witness.verify(in: secondEntry)
        } catch { return .dismissed(.badWitness(error)) }
        let a: SettlementLeafValue, b: SettlementLeafValue
        switch (value(of: first.witness, verifier: verifier), value(of: second.witness, verifier: verifier)) {
        case (.failure(let fault), _), (_, .failure(let fault)): return .upheld(fault)
        case (.success(let x), .success(let y)): (a, b) = (x, y)
        }
        guard a.key.sequence == b.key.sequence else { return .dismissed(.noFault) }
        if a.key.attempt == b.key.attempt || a.key.payer != b.key.payer { return .upheld(.duplicateSequence(a.key.sequence)) }
        return .dismissed(.noFault)
    }

    /// (b) A sum that does not add up: `path` holds the preimages (children) of inner nodes of entry `entryIndex`'s
    /// pair tree, bottom up, each a child of the next and the last hashing to the pair root. Upheld when a parent
    /// commits a child's sum other than what the child's own children add up to, when children overflow, or when the
    /// root's children do not add up to the entry's amount. (A node's sum is fixed by its preimage, so a hash that
    /// appears on both sides of a parent needs no side.)
    public func checkSums(entryIndex: Int, path: [MerkleSumPreimage]) -> ChallengeVerdict {
        guard let entry = entry(entryIndex) else { return .dismissed(.unknownEntry(index: entryIndex)) }
        guard !path.isEmpty else { return .dismissed(.emptyPath) }
        guard path.count <= MerkleSumProof.maxSiblings else { return .dismissed(.brokenPath(at: MerkleSumProof.maxSiblings)) }
        // First the path must be real: every preimage a child of the next, the top the pair root.
        let hashes = path.map(\.hash)
        for k in 0..<(path.count - 1) where path[k + 1].left.hash != hashes[k] && path[k + 1].right.hash != hashes[k] {
            return .dismissed(.brokenPath(at: k))
        }
        guard hashes[path.count - 1] == entry.pairRoot else { return .dismissed(.brokenPath(at: path.count - 1)) }
        // Then every committed sum must be what the children add up to.
        for k in 0..<path.count {
            guard let actual = path[k].sum else { return .upheld(.sumOverflow) }
            if k + 1 < path.count {
                let parent = path[k + 1]
                for side in [parent.left, parent.right] where side.hash == hashes[k] && side.sum != actual {
                    return .upheld(.sumMismatch(committed: side.sum, actual: actual))
                }
            } else if actual != entry.amount {
                return .upheld(.sumMismatch(committed: entry.amount, actual: actual))
            }
        }
        return .dismissed(.noFault)
    }

    /// (e) Two adjacent leaves (indices i and i+1 of one pair tree) whose keys are not strictly increasing.
    public func checkOrder(entryIndex: Int, left: SettlementLeafWitness, right: SettlementLeafWitness,
                           verifier: some SettlementLeafVerifier) -> ChallengeVerdict {
        guard let entry = entry(entryIndex) else { return .dismissed(.unknownEntry(index: entryIndex)) }
        guard left.proof.index < UInt64.max, right.proof.index == left.proof.index + 1 else { return .dismissed(.notAdjacent) }
        do {
            try left.verify(in: entry)
            try right.verify(in: entry)
        } catch { return .dismissed(.badWitness(error)) }
        switch (value(of: left, verifier: verifier), value(of: right, verifier: verifier)) {
        case (.failure(let fault), _), (_, .failure(let fault)): return .upheld(fault)
        case (.success(let a), .success(let b)):
            guard a.key.pair == entry.pair, b.key.pair == entry.pair else { return .upheld(.leafInWrongPair) }
            return a.key < b.key ? .dismissed(.noFault) : .upheld(.leavesOutOfOrder)
        }
    }

    /// (c) A receipt that the router countersigned for this batch's range, left out or under-counted. `receiptBytes`
    /// is the challenger's receipt (the verifier checks the router's countersignature and computes its worth).
    public func checkOmission(receiptBytes: [UInt8], evidence: OmissionEvidence, verifier: some SettlementLeafVerifier) -> ChallengeVerdict {
        let receipt: SettlementLeafValue
        do throws(SettlementLeafRejection) {
            receipt = try verifier.verifyLeaf(receiptBytes, batch: self)
        } catch {
            return .dismissed(.receiptInvalid(code: error.code))
        }
        guard sequenceRange.contains(receipt.key.sequence) else { return .dismissed(.receiptOutsideBatch) }
        guard let entryIndex = entryIndex(for: receipt.key.pair) else { return .upheld(.receiptOmitted) }
        let entry = entries[entryIndex]

        /// Verifies a witness at an expected index (nil: any) and decodes its key; a fault found on the way is upheld.
        func proven(_ witness: SettlementLeafWitness, at index: UInt64?) -> Result<SettlementLeafValue, ChallengeVerdict> {
            if let index, witness.proof.index != index { return .failure(.dismissed(.notAdjacent)) }
            do { try witness.verify(in: entry) } catch { return .failure(.dismissed(.badWitness(error))) }
            switch value(of: witness, verifier: verifier) {
            case .failure(let fault): return .failure(.upheld(fault))
            case .success(let value):
                return value.key.pair == entry.pair ? .success(value) : .failure(.upheld(.leafInWrongPair))
            }
        }

        switch evidence {
        case .pairAbsent:
            return .dismissed(.pairPresent)
        case .beforeFirst(let first):
            switch proven(first, at: 0) {
            case .failure(let verdict): return verdict
            case .success(let value): return receipt.key < value.key ? .upheld(.receiptOmitted) : .dismissed(.notBracketed)
            }
        case .afterLast(let last):
            switch proven(last, at: entry.count - 1) {
            case .failure(let verdict): return verdict
            case .success(let value): return value.key < receipt.key ? .upheld(.receiptOmitted) : .dismissed(.notBracketed)
            }
        case .between(let low, let high):
            guard low.proof.index < UInt64.max else { return .dismissed(.notAdjacent) }
            let a: SettlementLeafValue, b: SettlementLeafValue
            switch proven(low, at: nil) {
            case .failure(let verdict): return verdict
            case .success(let value): a = value
            }
            switch proven(high, at: low.proof.index + 1) {
            case .failure(let verdict): return verdict
            case .success(let value): b = value
            }
            guard a.key < b.key else { return .upheld(.leavesOutOfOrder) }
            return a.key < receipt.key && receipt.key < b.key ? .upheld(.receiptOmitted) : .dismissed(.notBracketed)
        case .sameKey(let witness):
            switch proven(witness, at: nil) {
            case .failure(let verdict): return verdict
            case .success(let value):
                guard value.key == receipt.key else { return .dismissed(.keyMismatch) }
                return witness.amount < receipt.amount
                    ? .upheld(.receiptUnderCounted(committed: witness.amount, owed: receipt.amount)) : .dismissed(.noFault)
            }
        }
    }
}

// MARK: - Watchtower

/// What a watchtower finds when it rebuilds a pair's tree from the leaves the router served.
public enum PairAudit: Hashable, Sendable, CustomStringConvertible {
    case consistent
    /// The batch has no entry for the pair although leaves were served for it.
    case pairMissing
    case noLeaves
    case leafInWrongPair(index: Int)
    case leavesOutOfOrder(index: Int)
    case leafOutsideRange(index: Int)
    case countMismatch(committed: UInt64, served: UInt64)
    case amountMismatch(committed: UInt64, served: UInt64)
    /// Same count and amount, another root: the served leaves are not the committed ones (or a committed sum is wrong).
    case rootMismatch
    case sumOverflow

    public var code: String {
        switch self {
        case .consistent: "audit_consistent"
        case .pairMissing: "audit_pair_missing"
        case .noLeaves: "audit_no_leaves"
        case .leafInWrongPair: "audit_leaf_in_wrong_pair"
        case .leavesOutOfOrder: "audit_leaves_out_of_order"
        case .leafOutsideRange: "audit_leaf_outside_range"
        case .countMismatch: "audit_count_mismatch"
        case .amountMismatch: "audit_amount_mismatch"
        case .rootMismatch: "audit_root_mismatch"
        case .sumOverflow: "audit_sum_overflow"
        }
    }

    public var description: String { code }
}

extension SettlementBatch {
    /// Rebuilds one pair's root from all its leaves (as the router served them, in order) and compares it with the
    /// pair's entry. O(leaves) hashing, O(log leaves) memory.
    public func auditPair(_ pair: SettlementPair, leaves: some Collection<SettlementLeaf>) -> PairAudit {
        guard !leaves.isEmpty else { return .noLeaves }
        var accumulator = MerkleSumAccumulator()
        var previous: SettlementLeafKey?
        for (index, leaf) in leaves.enumerated() {
            guard leaf.key.pair == pair else { return .leafInWrongPair(index: index) }
            if let previous, !(previous < leaf.key) { return .leavesOutOfOrder(index: index) }
            guard sequenceRange.contains(leaf.key.sequence) else { return .leafOutsideRange(index: index) }
            do { try accumulator.append(leafBytes: leaf.receiptBytes, amount: leaf.amount) } catch { return .sumOverflow }
            previous = leaf.key
        }
        guard let index = entryIndex(for: pair) else { return .pairMissing }
        let entry = entries[index]
        guard accumulator.leafCount == entry.count else { return .countMismatch(committed: entry.count, served: accumulator.leafCount) }
        guard accumulator.total == entry.amount else { return .amountMismatch(committed: entry.amount, served: accumulator.total) }
        guard let root = try? accumulator.root, root.hash == entry.pairRoot else { return .rootMismatch }
        return .consistent
    }
}
