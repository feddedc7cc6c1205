import EdgeMatrixApplication
import EdgeMatrixConsensus
import EdgeMatrixCore
import EdgeMatrixLedger
import Foundation
import Logging
import ServiceLifecycle
import Synchronization

public struct ChainBenchResult: Sendable, CustomStringConvertible {
    public var validators: Int
    public var transactions: Int
    public var committed: Int
    public var seconds: Double
    public var blocks: Int
    public var blockTimeP50Ms: Double
    public var blockTimeP99Ms: Double
    public var finalityP50Ms: Double
    public var finalityP99Ms: Double
    public var maxTxsInBlock: Int
    public var signPerSecond: Double
    public var verifyPerSecondOneCore: Double
    public var verifyPerSecondAllCores: Double
    public var cores: Int

    public var tps: Double { seconds > 0 ? Double(committed) / seconds : 0 }

    public var description: String {
        func f(_ x: Double) -> String { String(format: "%.0f", x) }
        return """
        chain benchmark: \(validators) validators in one process on loopback, \(cores) CPU cores
          committed signed transfers: \(committed)/\(transactions) in \(String(format: "%.2f", seconds)) s = \(f(tps)) tx/s
          blocks: \(blocks) (largest \(maxTxsInBlock) txs); block time p50 \(f(blockTimeP50Ms)) ms, p99 \(f(blockTimeP99Ms)) ms
          finality (submit -> committed): p50 \(f(finalityP50Ms)) ms, p99 \(f(finalityP99Ms)) ms
          local limits: Ed25519 verify \(f(verifyPerSecondOneCore))/s on one core, \(f(verifyPerSecondAllCores))/s on \(cores) cores; sign \(f(signPerSecond))/s
        """
    }
}

/// Runs validators in one process, feeds them signed transfers as fast as they admit them, and measures what commits.
public enum ChainBench {
    public static func run(transactions: Int, validators count: Int = 4, basePort: Int, directory: String,
                           timeouts: TimeoutConfiguration = ValidatorConfiguration.defaultTimeouts, maxTxsPerBlock: Int = 10_000,
                           logger: Logger, progress: @escaping @Sendable (String) -> Void) async throws -> ChainBenchResult {
        let cores = ProcessInfo.processInfo.activeProcessorCount
        let (verifyOne, verifyAll, signRate) = await ed25519Rates(cores: cores)
        progress("Ed25519: verify \(Int(verifyOne))/s on one core, \(Int(verifyAll))/s on \(cores) cores")

        let endpoints = (0..<count).map { "127.0.0.1:\(basePort + 10 + $0)" }
        let genesis = try DevnetGenesis.create(directory: directory, chainID: "emc-bench", endpoints: endpoints, overwrite: true)
        let layout = DevnetGenesis.Layout(directory: directory)
        var nodes = [ValidatorNode]()
        for i in 0..<count {
            let key = try KeyFile.read(from: layout.validatorKeyPath(i + 1))
            let configuration = ValidatorConfiguration(genesis: genesis, dataDirectory: layout.validatorDirectory(i + 1),
                                                       httpPort: basePort + i, p2pPort: basePort + 10 + i, timeouts: timeouts,
                                                       maxTxsPerBlock: maxTxsPerBlock)
            nodes.append(try ValidatorNode(configuration: configuration, key: key, logger: logger))
        }
        let group = ServiceGroup(configuration: .init(services: nodes.map { .init(service: $0) }, logger: logger))
        let running = Task { try await group.run() }
        defer { running.cancel() }

        let entry = nodes[0]
        let deadline = ContinuousClock.now + .seconds(60)
        while entry.view.current.height < 2 {
            guard ContinuousClock.now < deadline else { throw ChainError.storage("the validators made no blocks within 60 s") }
            try await Task.sleep(for: .milliseconds(100))
        }
        progress("validators up at height \(entry.view.current.height); signing \(transactions) transfers...")

        let funded = try KeyFile.read(from: layout.fundedKeyPath)
        let recipient = Account(owner: SigningKey().publicKey)
        let now = wallClockMillis()
        var signed = [(id: Hash32, bytes: [UInt8])]()
        signed.reserveCapacity(transactions)
        for i in 0..<transactions {
            var memo = ByteWriter(capacity: 8)
            memo.write(UInt64(i))
            let body = TransactionBody(chainID: genesis.chainID, createdAtMillis: now,
                                       kind: .transfer(Transfer(to: recipient, amount: Amount(baseUnits: 1), memo: memo.bytes)))
            let tx = Transaction(signing: body, with: funded)
            signed.append((tx.id, tx.encoded))
        }

        // Watch commits on the entry validator.
        let submitted = Mutex<[Hash32: ContinuousClock.Instant]>([:])
        let events = entry.view.subscribe()
        let expected = transactions
        let watcher = Task { () -> (finality: [Double], blockTimes: [Double], blocks: Int, maxTxs: Int, committed: Int, end: ContinuousClock.Instant) in
            var finality = [Double]()
            var blockTimes = [Double]()
            var lastTime: UInt64?
            var blocks = 0
            var maxTxs = 0
            var committed = 0
            var end = ContinuousClock.now
            for await event in events {
                let seenAt = ContinuousClock.now
                if let lastTime, committed > 0 || event.txCount > 0 { blockTimes.append(Double(event.timeMillis - lastTime)) }
                lastTime = event.timeMillis
                guard event.txCount > 0, let stored = try? entry.store.block(at: event.height),
                      let block = try? ChainBlock(canonicalBytes: stored.value) else { continue }
                blocks += 1
                maxTxs = max(maxTxs, block.transactions.count)
                let ids = block.transactions.compactMap { try? Transaction(decoding: $0).id }
                let times = submitted.withLock { map in ids.compactMap { map[$0] } }
                for t in times { finality.append(Double((seenAt - t).components.attoseconds / 1_000_000_000_000_000 + (seenAt - t).components.seconds * 1000)) }
                committed += times.count
                end = seenAt
                if committed >= expected { break }
            }
            return (finality, blockTimes, blocks, maxTxs, committed, end)
        }

        progress("submitting...")
        let start = ContinuousClock.now
        var rejected = 0
        for (i, tx) in signed.enumerated() {
            while entry.mempool.count > 20_000 { try await Task.sleep(for: .milliseconds(5)) }
            submitted.withLock { $0[tx.id] = .now }
            do { _ = try entry.submit(tx.bytes) } catch {
                rejected += 1
                if rejected <= 3 { progress("rejected: \(error)") }
            }
            if i % 200 == 199 { await Task.yield() }
        }
        progress("submitted \(transactions - rejected) in \(ContinuousClock.now - start); waiting for commits...")
        let timeout = Task {
            try await Task.sleep(for: .seconds(120))
            watcher.cancel()
        }
        let outcome = await watcher.value
        timeout.cancel()
        await group.triggerGracefulShutdown()
        _ = try? await running.value

        func percentile(_ values: [Double], _ p: Double) -> Double {
            guard !values.isEmpty else { return 0 }
            let sorted = values.sorted()
            return sorted[min(sorted.count - 1, Int(Double(sorted.count - 1) * p))]
        }
        let elapsed = outcome.end - start
        return ChainBenchResult(
            validators: count, transactions: transactions, committed: outcome.committed,
            seconds: Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18,
            blocks: outcome.blocks, blockTimeP50Ms: percentile(outcome.blockTimes, 0.5), blockTimeP99Ms: percentile(outcome.blockTimes, 0.99),
            finalityP50Ms: percentile(outcome.finality, 0.5), finalityP99Ms: percentile(outcome.finality, 0.99),
            maxTxsInBlock: outcome.maxTxs, signPerSecond: signRate, verifyPerSecondOneCore: verifyOne,
            verifyPerSecondAllCores: verifyAll, cores: cores)
    }

    /// Ed25519 verifications per second on one core and on all cores, and signatures per second on one core.
    static func ed25519Rates(cores: Int) async -> (Double, Double, Double) {
        let key = SigningKey()
        let message = [UInt8](repeating: 7, count: 120)
        let signature = key.sign(message, domain: .transaction)
        let publicKey = key.publicKey
        @Sendable func verifyLoop(seconds: Double) -> Double {
            let start = Date()
            var n = 0
            while true {
                for _ in 0..<200 { if publicKey.isValidSignature(signature, for: message, domain: .transaction) { n += 1 } }
                let t = Date().timeIntervalSince(start)
                if t >= seconds { return Double(n) / t }
            }
        }
        let one = verifyLoop(seconds: 1)
        let all = await withTaskGroup(of: Double.self) { group in
            for _ in 0..<cores { group.addTask { verifyLoop(seconds: 1) } }
            var total = 0.0
            for await rate in group { total += rate }
            return total
        }
        let start = Date()
        var n = 0
        while Date().timeIntervalSince(start) < 0.5 {
            for _ in 0..<100 { _ = key.sign(message, domain: .transaction); n += 1 }
        }
        return (one, all, Double(n) / Date().timeIntervalSince(start))
    }
}
