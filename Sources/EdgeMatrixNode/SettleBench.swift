import EdgeMatrixCore
import EdgeMatrixLedger
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Figures of `emc bench settle`: one router's settlement batch over synthetic receipts.
public struct SettleBenchResult: Sendable, CustomStringConvertible {
    public var receipts: Int
    public var pairs: Int
    public var receiptBytes: Int
    public var generateSeconds: Double
    /// Building the batch: hashing every receipt, one pair tree per (payer, node), the entries.
    public var buildSeconds: Double
    /// Peak resident memory of the process before the build (the synthetic receipts) and after it, in bytes.
    public var residentBeforeBuild: Int
    public var peakResident: Int
    /// The encoded `SettlementBatch`: what the `settle` transaction carries.
    public var batchBytes: Int
    /// Decoding the batch alone: check its entries, rebuild the top tree (median of runs).
    public var applySeconds: Double
    /// The validator's apply of the whole `settle` transaction (decode, signature, checks, escrow charges) to a
    /// ledger holding the router, the nodes and the payers' escrows (median of runs), and its encoded size.
    public var ledgerApplySeconds: Double
    public var settleTxBytes: Int
    /// Proof for one leaf in its pair tree, and the full proof (entry + its proof in the top tree + the leaf proof).
    public var leafProofBytes: Int
    public var fullProofBytes: Int
    /// A watchtower at one compute node (`WatchtowerAudit`): verify every served leaf of that node (proof against the
    /// entry, both signatures, amount = units × prices) and compare with its kept receipts. That node's receipts are
    /// real signed receipts.
    public var auditNodeLeaves: Int
    public var auditNodeSeconds: Double
    /// Rebuild every pair tree of that node from its leaves and compare (hashing only).
    public var watchtowerNodeLeaves: Int
    public var watchtowerNodePairs: Int
    public var watchtowerNodeSeconds: Double
    /// The same for every pair of the batch (every leaf).
    public var watchtowerAllSeconds: Double

    public var description: String {
        func ms(_ s: Double) -> String { String(format: "%.1f ms", s * 1_000) }
        func mb(_ b: Int) -> String { String(format: "%.1f MB", Double(b) / 1_000_000) }
        return """
            settlement batch: \(receipts) receipts of \(receiptBytes) bytes over \(pairs) (payer, node) pairs
              generate receipts      \(ms(generateSeconds))
              batch build            \(ms(buildSeconds))   (target ≤ 5 s)
              peak memory            \(mb(peakResident)) (\(mb(residentBeforeBuild)) before the build, synthetic receipts included)
              settle batch size      \(batchBytes) bytes = \(mb(batchBytes))   (target ≤ 1 MB)
              batch decode           \(ms(applySeconds))   (decode, check entries, rebuild top tree)
              validator apply        \(ms(ledgerApplySeconds))   (the \(settleTxBytes)-byte settle transaction on a ledger; target ≤ 100 ms)
              proof for one leaf     \(leafProofBytes) bytes in its pair tree; \(fullProofBytes) bytes with entry and top-tree proof (target ≤ 2 KB)
              watchtower audit       \(ms(auditNodeSeconds)) for one node's \(auditNodeLeaves) leaves in \(watchtowerNodePairs) pairs (proofs, signatures, amounts, kept receipts)
              watchtower, one node   \(ms(watchtowerNodeSeconds)) for \(watchtowerNodeLeaves) leaves in \(watchtowerNodePairs) pairs (rebuild pair trees)
              watchtower, all pairs  \(ms(watchtowerAllSeconds)) for \(receipts) leaves
            """
    }
}

public enum SettleBenchError: Error, CustomStringConvertible {
    case invalid(String)
    case check(String)

    public var description: String {
        switch self {
        case .invalid(let why): "invalid benchmark parameters: \(why)"
        case .check(let why): "benchmark self-check failed: \(why)"
        }
    }
}

public enum SettleBench {
    /// Peak resident set size of this process, in bytes (getrusage; kilobytes on Linux, bytes on Darwin).
    public static func peakResidentBytes() -> Int {
        var usage = rusage()
        #if canImport(Darwin)
        guard getrusage(RUSAGE_SELF, &usage) == 0 else { return 0 }
        return Int(usage.ru_maxrss)
        #else
        guard getrusage(RUSAGE_SELF.rawValue, &usage) == 0 else { return 0 }
        return Int(usage.ru_maxrss) * 1_024
        #endif
    }

    static func seconds(_ duration: Duration) -> Double {
        let (s, attoseconds) = duration.components
        return Double(s) + Double(attoseconds) / 1e18
    }

    /// Synthetic receipts (random bytes, no signatures) over `pairs` pairs of √pairs payers × √pairs nodes, keys in
    /// batch order; leaf j of pair p has sequence j·pairs + p + 1 (the ledger's first), so sequences are unique and the range contiguous.
    public static func run(receipts: Int, pairs: Int, receiptSize: Int = 300, seed: UInt64 = 1,
                           progress: (String) -> Void = { _ in }) throws -> SettleBenchResult {
        guard receipts >= 1, receipts <= 10_000_000 else { throw SettleBenchError.invalid("receipts must be 1...10000000") }
        guard pairs >= 1, pairs <= min(receipts, SettlementBatch.maxEntries) else {
            throw SettleBenchError.invalid("pairs must be 1...min(receipts, \(SettlementBatch.maxEntries))")
        }
        guard receiptSize >= 8, receiptSize <= SettlementBatch.maxReceiptBytes else {
            throw SettleBenchError.invalid("receipt size must be 8...\(SettlementBatch.maxReceiptBytes)")
        }
        var random = SeededRandom(seed: seed)
        let clock = ContinuousClock()

        // Keys: payers × nodes, the first `pairs` combinations in (payer, node) order.
        var payerCount = 1
        while payerCount * payerCount < pairs { payerCount += 1 }
        let nodeCount = (pairs + payerCount - 1) / payerCount
        func signingKey() throws -> SigningKey { try SigningKey(seed: (0..<4).flatMap { _ in withUnsafeBytes(of: random.next()) { Array($0) } }) }
        func key() throws -> PublicKey { try signingKey().publicKey }
        let payerKeys = try (0..<payerCount).map { _ in try signingKey() }.sorted { Account(owner: $0.publicKey) < Account(owner: $1.publicKey) }
        let payers = payerKeys.map { Account(owner: $0.publicKey) }
        let nodeKeys = try (0..<nodeCount).map { _ in try signingKey() }
            .sorted { $0.publicKey.rawRepresentation.lexicographicallyPrecedes($1.publicKey.rawRepresentation) }
        let nodes = nodeKeys.map(\.publicKey)
        let routerKey = try signingKey()
        let pairList = (0..<pairs).map { SettlementPair(payer: payers[$0 / nodeCount], node: nodes[$0 % nodeCount]) }
        let perPair = (0..<pairs).map { receipts / pairs + ($0 < receipts % pairs ? 1 : 0) }
        func firstLeafIndex(_ p: Int) -> Int { p * (receipts / pairs) + min(p, receipts % pairs) }

        // Receipt bytes in one buffer; amounts up to 1 EMC each.
        let generateStart = clock.now
        var buffer = [UInt8](repeating: 0, count: receipts * receiptSize)
        buffer.withUnsafeMutableBytes { raw in
            var offset = 0
            while offset + 8 <= raw.count {
                raw.storeBytes(of: random.next(), toByteOffset: offset, as: UInt64.self)
                offset += 8
            }
        }
        var amounts = (0..<receipts).map { _ in UInt64.random(in: 1...100_000_000, using: &random) }
        // The watched node's leaves are real receipts, signed by it and countersigned by the router.
        let prices = UnitPrices(perMillionPromptTokens: 1_000_000, perMillionCompletionTokens: 100_000_000)
        var real = [Int: [UInt8]]()
        var kept = [Receipt]()
        for p in 0..<pairs where pairList[p].node == nodes[0] {
            for j in 0..<perPair[p] {
                let body = ReceiptBody(payer: pairList[p].payer, router: routerKey.publicKey, node: nodes[0], sequence: UInt64(j * pairs + p) + 1,
                                       attempt: 0, app: "llm", model: "m", prices: prices,
                                       units: WorkUnits(promptTokens: UInt64(100 + j % 50), completionTokens: UInt64(200 + j % 70)),
                                       startedAtMillis: 1, endedAtMillis: 2, requestHash: Hash32.of(withUnsafeBytes(of: random.next()) { Array($0) }),
                                       responseHash: Hash32.of([3]), status: 200)
                var receipt = Receipt(signing: body, with: nodeKeys[0])
                try receipt.countersign(nodeKey: nodes[0], routerKey: routerKey)
                guard let bytes = receipt.settlementBytes, let cost = body.cost else { throw SettleBenchError.check("a receipt does not countersign") }
                real[firstLeafIndex(p) + j] = bytes
                amounts[firstLeafIndex(p) + j] = cost
                kept.append(receipt)
            }
        }
        let generateSeconds = seconds(clock.now - generateStart)
        let lastSequence = UInt64((perPair[0] - 1) * pairs + pairs - 1)
        progress("generated \(receipts) receipts (\(buffer.count / 1_000_000) MB) in \(String(format: "%.2f", generateSeconds)) s; building...")

        /// Leaf i (global order) of pair p, the j-th of that pair.
        func bytes(_ i: Int) -> ArraySlice<UInt8> { real[i].map { $0[...] } ?? buffer[(i * receiptSize)..<((i + 1) * receiptSize)] }
        func leafKey(pair p: Int, index j: Int) -> SettlementLeafKey {
            SettlementLeafKey(payer: pairList[p].payer, node: pairList[p].node, sequence: UInt64(j * pairs + p) + 1, attempt: 0)
        }
        var firstLeaf = [Int]()
        var running = 0
        for count in perPair { firstLeaf.append(running); running += count }

        // Build.
        let residentBeforeBuild = peakResidentBytes()
        let buildStart = clock.now
        var builder = SettlementBatchBuilder(router: routerKey.publicKey, batchNumber: 0, sequenceRange: 1...(lastSequence + 1))
        for p in 0..<pairs {
            for j in 0..<perPair[p] {
                let i = firstLeaf[p] + j
                try builder.append(key: leafKey(pair: p, index: j), receiptBytes: bytes(i), amount: amounts[i])
            }
        }
        let batch = try builder.build()
        let buildSeconds = seconds(clock.now - buildStart)
        let peakResident = peakResidentBytes()
        guard batch.receiptCount == UInt64(receipts), batch.entries.count == pairs else {
            throw SettleBenchError.check("the batch counts \(batch.receiptCount) receipts in \(batch.entries.count) pairs")
        }
        progress("built in \(String(format: "%.2f", buildSeconds)) s; measuring apply, proofs and the watchtower...")

        // The ledger's apply: decode (checks every entry and rebuilds the top tree).
        let encoded = batch.canonicalBytes
        var applyRuns = [Double]()
        for _ in 0..<7 {
            let start = clock.now
            let decoded = try SettlementBatch(canonicalBytes: encoded)
            applyRuns.append(seconds(clock.now - start))
            guard decoded.root == batch.root else { throw SettleBenchError.check("the decoded batch has another root") }
        }
        applyRuns.sort()

        // The validator's apply of the settle transaction, on a ledger that holds what it needs.
        let (ledger, chainID) = try ledgerFor(batch: batch, routerKey: routerKey, nodeKeys: nodeKeys, payerKeys: payerKeys,
                                              signingKey: signingKey)
        let settleTx = Transaction(signing: TransactionBody(chainID: chainID, createdAtMillis: benchGenesisMillis + 1_000_000,
                                                            kind: .settle(batch)), with: routerKey).encoded
        var ledgerRuns = [Double]()
        for _ in 0..<7 {
            var copy = ledger
            let start = clock.now
            let result = copy.apply(bytes: settleTx, context: BlockContext(height: 1_000, timeMillis: benchGenesisMillis + 1_000_000))
            ledgerRuns.append(seconds(clock.now - start))
            if case .failure(let error) = result { throw SettleBenchError.check("the ledger refuses the settle transaction: \(error)") }
        }
        ledgerRuns.sort()

        // Proof for the middle leaf of the first pair.
        func pairLeaves(_ p: Int) -> [SettlementLeaf] {
            (0..<perPair[p]).map { j in
                let i = firstLeaf[p] + j
                return SettlementLeaf(key: leafKey(pair: p, index: j), receiptBytes: Array(bytes(i)), amount: amounts[i])
            }
        }
        let firstPair = pairLeaves(0)
        let tree = try SettlementBatchBuilder.pairTree(leaves: firstPair)
        let middle = firstPair.count / 2
        let leafProof = try tree.proof(at: middle)
        let fullProof = SettlementReceiptProof(entry: batch.entries[0], entryProof: try batch.entryProof(at: 0), leafProof: leafProof)
        try fullProof.verify(receiptBytes: firstPair[middle].receiptBytes, amount: firstPair[middle].amount, batchRoot: batch.root)

        // The watched node's audit: its pairs' leaves with proofs (served by the router; built here, not timed).
        var served = [SettlementPair: [SettlementLeafWitness]]()
        var auditLeaves = 0
        for p in 0..<pairs where pairList[p].node == nodes[0] {
            let leaves = pairLeaves(p)
            let pairTree = try SettlementBatchBuilder.pairTree(leaves: leaves)
            served[pairList[p]] = try leaves.indices.map { try SettlementLeafWitness(tree: pairTree, leaves: leaves, index: $0) }
            auditLeaves += leaves.count
        }
        let auditStart = clock.now
        let findings = WatchtowerAudit.audit(batch: batch, node: nodes[0], served: served, kept: kept)
        let auditSeconds = seconds(clock.now - auditStart)
        guard findings.isEmpty else { throw SettleBenchError.check("the watchtower finds \(findings.prefix(3)) in an honest batch") }

        // Watchtowers: the leaves are downloaded first (not timed), then every pair is rebuilt and compared.
        var nodeSeconds = 0.0, allSeconds = 0.0, nodeLeaves = 0, nodePairs = 0
        for p in 0..<pairs {
            let leaves = pairLeaves(p)
            let start = clock.now
            let audit = batch.auditPair(pairList[p], leaves: leaves)
            let elapsed = seconds(clock.now - start)
            guard audit == .consistent else { throw SettleBenchError.check("pair \(p) audits as \(audit)") }
            allSeconds += elapsed
            if pairList[p].node == nodes[0] {
                nodeSeconds += elapsed
                nodeLeaves += leaves.count
                nodePairs += 1
            }
        }

        return SettleBenchResult(receipts: receipts, pairs: pairs, receiptBytes: receiptSize, generateSeconds: generateSeconds,
                                 buildSeconds: buildSeconds, residentBeforeBuild: residentBeforeBuild, peakResident: peakResident,
                                 batchBytes: encoded.count, applySeconds: applyRuns[applyRuns.count / 2],
                                 ledgerApplySeconds: ledgerRuns[ledgerRuns.count / 2], settleTxBytes: settleTx.count,
                                 leafProofBytes: leafProof.canonicalBytes.count, fullProofBytes: fullProof.canonicalBytes.count,
                                 auditNodeLeaves: auditLeaves, auditNodeSeconds: auditSeconds,
                                 watchtowerNodeLeaves: nodeLeaves, watchtowerNodePairs: nodePairs, watchtowerNodeSeconds: nodeSeconds,
                                 watchtowerAllSeconds: allSeconds)
    }

    static let benchGenesisMillis: UInt64 = 1_700_000_000_000

    /// A ledger with the router (bonded and registered), every node of the batch registered as a compute node, and
    /// each payer's escrow covering its entries: what a validator holds when the settle transaction arrives.
    static func ledgerFor(batch: SettlementBatch, routerKey: SigningKey, nodeKeys: [SigningKey], payerKeys: [SigningKey],
                          signingKey: () throws -> SigningKey) throws -> (LedgerState, String) {
        let chainID = "emc-bench"
        let owner = try signingKey(), validator = try signingKey(), validatorOwner = try signingKey()
        var parameters = LedgerParameters.standard
        parameters.routerEscrowCapMultiple = 1_000_000
        let genesis = Genesis.devnet(chainID: chainID, genesisTimeMillis: benchGenesisMillis,
                                     validators: [.init(nodeKey: validator.publicKey, owner: validatorOwner.publicKey)],
                                     fundedAccounts: [Account(owner: owner.publicKey)] + payerKeys.map { Account(owner: $0.publicKey) },
                                     fundedAmount: Amount(emc: 1_000_000), parameters: parameters)
        var ledger = try LedgerState(genesis: genesis)
        var height: UInt64 = 0
        func block(_ txs: [Transaction]) throws -> [TxResult] {
            height += 1
            let results = try ledger.applyBlock(txs: txs, context: BlockContext(height: height, timeMillis: benchGenesisMillis + height * 1_000))
            for case .failure(let error) in results.txResults { throw SettleBenchError.check("ledger set-up: \(error)") }
            return results.txResults
        }
        func tx(_ key: SigningKey, _ kind: TransactionKind) -> Transaction {
            Transaction(signing: TransactionBody(chainID: chainID, createdAtMillis: benchGenesisMillis + (height + 1) * 1_000, kind: kind), with: key)
        }
        func stakeID(_ result: TxResult) throws -> UInt64 {
            guard case .success(let outcome) = result, case .bonded(let id) = outcome.effect else { throw SettleBenchError.check("a bond failed") }
            return id
        }
        let staking = parameters.staking
        let routerStake = try stakeID(try block([tx(owner, .bond(Bond(role: .router, amount: staking.router.minimumStake,
                                                                          lockDays: staking.router.minimumLockDays)))])[0])
        _ = try block([tx(owner, .registerNode(NodeRegistration(statement: NodeRegistrationStatement(
            chainID: chainID, owner: owner.publicKey, nodeKey: routerKey.publicKey, role: .router, endpoints: [], stakeID: routerStake),
            nodeKey: routerKey)))])
        for node in nodeKeys {
            let id = try stakeID(try block([tx(owner, .bond(Bond(role: .compute, amount: staking.compute.minimumStake,
                                                                 lockDays: staking.compute.minimumLockDays)))])[0])
            _ = try block([tx(owner, .registerNode(NodeRegistration(statement: NodeRegistrationStatement(
                chainID: chainID, owner: owner.publicKey, nodeKey: node.publicKey, role: .compute, endpoints: [], stakeID: id),
                nodeKey: node)))])
        }
        var charges = [Account: UInt64]()
        for entry in batch.entries { charges[entry.payer, default: 0] += entry.amount }
        _ = try block(payerKeys.map { payer in
            tx(payer, .escrowOpen(EscrowOpen(router: routerKey.publicKey, amount: Amount(baseUnits: (charges[Account(owner: payer.publicKey)] ?? 0) + 1))))
        })
        return (ledger, chainID)
    }
}
