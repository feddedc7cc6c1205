import AsyncHTTPClient
import EdgeMatrixChain
import EdgeMatrixCore
import EdgeMatrixLedger
import Foundation
import NIOCore
import Testing

extension Integration {
    /// Issue 7's crash test: the router process is killed with SIGKILL while paid requests are in flight and a
    /// settlement batch is open, then restarted on the same data dir.
    @Suite("Settlement across a router crash", .serialized)
    struct SettlementCrashTests {
        // Catches: a receipt lost or left out of every batch after the crash (the node's pay lost), a range
        // settled twice or skipped (batches not contiguous), a batch closed over requests whose receipts were
        // still to be re-delivered (then refused as already batched), and an escrow charged other than what the
        // stored receipts are worth.
        @Test("router kill -9 mid-batch with paid requests in flight: after the restart every receipt is settled exactly once, in contiguous batches, and the escrow pays exactly their worth")
        func crashMidBatch() async throws {
            let network = try await TestNetwork(name: "settle-crash")
            defer { network.stopAll() }
            let paid = try await PaidNetwork(network)
            let secret = paid.secret
            let before = try await paid.escrowBalance()

            // 12 requests in flight; the router dies under them, once the first answers are back.
            let answered = Counter()
            let requests = Task {
                await withTaskGroup(of: Void.self) { group in
                    for i in 0..<12 {
                        group.addTask {
                            let answer = try? await Harness.request(.POST, network.baseURL + "/chat/completions", key: secret,
                                                                    body: PaidNetwork.chat("Tell a story about the number \(i).", maxTokens: 48), timeout: .seconds(60))
                            if answer?.status == 200 { answered.increment() }
                        }
                    }
                }
            }
            try await Harness.eventually(timeout: .seconds(60), "a first answer under load") { answered.value >= 1 }
            network.router?.kill9()
            await requests.value
            try await network.startRouter()
            try await network.waitForNodes(1)
            // Served after the restart, in the same and following batches.
            for i in 0..<3 {
                let after = try await Harness.request(.POST, network.baseURL + "/chat/completions", key: secret, body: PaidNetwork.chat("after \(i)", maxTokens: 4))
                #expect(after.status == 200, "\(after.text)")
            }

            // Everything the router stored for this payer ends up in exactly one final batch.
            let (stored, settlements) = try await paid.waitForFinalSettlements()
            #expect(stored.count >= 5, "too few receipts to test anything: \(stored.count)")
            try await paid.checkSettledExactly(stored: stored, settlements: settlements, escrowBefore: before)
            #expect(!network.router!.log.contains("sequence_already_batched") && !network.router!.log.contains("already closed"),
                    "a receipt was refused as already batched")
        }

        final class Counter: @unchecked Sendable {
            private let lock = NSLock()
            private var count = 0
            func increment() { lock.withLock { count += 1 } }
            var value: Int { lock.withLock { count } }
        }
    }
}

extension Integration {
    /// Issue 7: the router cannot reach any validator for two epochs' worth of time.
    @Suite("Settlement with the chain unreachable", .serialized)
    struct ChainUnreachableTests {
        // Catches: a router that stops serving paid requests when the chain is away (it must serve up to the escrow
        // it last read), that stops closing batches (one huge late batch), or that sends the batches closed while
        // away out of order, twice, or not at all once the chain is back.
        @Test("with every validator unreachable for two epochs the router keeps serving, closes a batch per epoch of wall time, and settles them all in order once the chain is back")
        func chainAway() async throws {
            let network = try await TestNetwork(name: "chain-away")
            defer { network.stopAll() }
            let chainURL = try await RegistryChain.shared.url()
            let chainPort = try #require(URL(string: chainURL)?.port)
            let proxyPort = Harness.freePort()
            func startProxy() async throws -> TestProcess {
                let proxy = try TestProcess(name: "chain-proxy", executable: Harness.python, arguments: [
                    Harness.packageRoot + "/Tests/python/tcp_proxy.py", String(proxyPort), String(chainPort),
                ], logDirectory: network.root)
                try await Harness.eventually(timeout: .seconds(20), "the chain proxy listening") { proxy.log.contains("listening") }
                return proxy
            }
            var proxy = try await startProxy()
            let paid = try await PaidNetwork(network, chainURL: "http://127.0.0.1:\(proxyPort)")
            let before = try await paid.escrowBalance()
            let epochLength = try #require((try await paid.chain.parameters()["epoch_length_blocks"] as? NSNumber)?.intValue)

            // The chain goes away for two epochs' worth of time (at about a block a second); requests keep coming.
            proxy.kill9()
            let away = ContinuousClock.now
            var servedWhileAway = 0
            while ContinuousClock.now - away < .seconds(2 * epochLength + 5) {
                let answer = try await Harness.request(.POST, network.baseURL + "/chat/completions", key: paid.secret,
                                                       body: PaidNetwork.chat("while away", maxTokens: 4))
                #expect(answer.status == 200, "\(answer.text)")
                if answer.status == 200 { servedWhileAway += 1 }
                try await Task.sleep(for: .seconds(3))
            }
            #expect(servedWhileAway >= 10)
            #expect(network.router!.log.contains("cannot read the chain"), "\(network.router!.log.suffix(3000))")
            let closedWhileAway = network.router!.count(logged: "settlement batch closed")
            #expect(closedWhileAway >= 2, "batches must close by wall time while the chain is away")
            proxy = try await startProxy()
            defer { proxy.terminate() }

            let (stored, settlements) = try await paid.waitForFinalSettlements()
            try await paid.checkSettledExactly(stored: stored, settlements: settlements, escrowBefore: before)
            // In order: included heights never go down as batch numbers go up.
            let included = settlements.sorted { ($0["batch"] as? Int ?? 0) < ($1["batch"] as? Int ?? 0) }
                .compactMap { ($0["included_height"] as? NSNumber)?.uint64Value }
            #expect(included == included.sorted(), "\(included)")
            #expect(settlements.count >= closedWhileAway)
        }
    }
}

/// A router on the test chain that a payer pays: the router enrolled, one compute node with `prices`, a payer with a
/// 50 EMC escrow and an API key bound to its account.
struct PaidNetwork {
    /// 0.5 EMC / 1M prompt tokens, 1.5 EMC / 1M completion tokens (50 and 150 base units a token).
    static let prices = PriceList(entries: [
        PriceEntry(name: PriceList.wildcard, perMillionPromptTokens: Amount(baseUnits: 50_000_000),
                   perMillionCompletionTokens: Amount(baseUnits: 150_000_000)),
    ])
    let network: TestNetwork
    let chain: ChainClient
    let secret: String
    let account: Account

    init(_ network: TestNetwork, chainURL: String? = nil, computeArguments: [String] = []) async throws {
        self.network = network
        chain = ChainClient(baseURL: try await RegistryChain.shared.url())
        try await RegistryChain.shared.enrollRouter(network.routerKey, tunnelAddress: "127.0.0.1:\(network.tunnelPort)")
        try await network.startRouter(chainURL: chainURL)
        try await network.startComputeNode(maxConcurrent: 4, arguments: computeArguments)
        let nodeKey = try KeyFile.read(from: network.root + "/compute-1/node.key").publicKey
        try await RegistryChain.shared.setPrices(nodeKey, Self.prices)
        try await network.waitForNodes(1)
        let payer = SigningKey()
        let payerFile = network.root + "/payer.key"
        try KeyFile.write(payer, to: payerFile)
        try await RegistryChain.shared.fundEscrow(payer, router: network.routerKey.publicKey, amount: Amount(emc: 50))
        let bound = try CLIRun.emc(["keys", "api", "new", "--account", payerFile, "--router", network.baseURL, "--label", "paid"])
        guard bound.status == 0 else { throw HarnessError.processFailed("emc keys api new: \(bound)") }
        secret = bound.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        account = Account(owner: payer.publicKey)
        let secret = secret
        try await Harness.eventually(timeout: .seconds(20), "the router reading the escrow") {
            try await Harness.request(.POST, network.baseURL + "/chat/completions", key: secret,
                                      body: Self.chat("warm up", maxTokens: 2)).status == 200
        }
    }

    static func chat(_ prompt: String, maxTokens: Int) -> [UInt8] {
        Harness.json(["model": "smollm2-135m-instruct", "messages": [["role": "user", "content": prompt]], "max_tokens": maxTokens, "temperature": 0])
    }

    func escrowBalance() async throws -> UInt64 {
        let escrow = try #require(try await chain.escrows(of: account).first { $0["router"] as? String == network.routerKey.publicKey.hex })
        return try #require((escrow["balance_base_units"] as? NSNumber)?.uint64Value)
    }

    /// Waits until final settlements cover every receipt the router stored for the payer; returns both.
    func waitForFinalSettlements() async throws -> (stored: [Receipt], settlements: [[String: Any]]) {
        let database = network.routerDirectory + "/router.sqlite"
        var stored: [Receipt] = []
        var settlements: [[String: Any]] = []
        let account = account, chain = chain, router = network.routerKey.publicKey
        try await Harness.eventually(timeout: .seconds(180), "final settlements covering every stored receipt") {
            stored = try await ReceiptFile(path: database).receipts().filter { $0.body.payer == account }
            settlements = try await chain.settlements(router: router)
            guard let last = stored.map(\.body.sequence).max(),
                  let covered = settlements.compactMap({ ($0["last_sequence"] as? NSNumber)?.uint64Value }).max() else { return false }
            return covered >= last && settlements.allSatisfy { $0["status"] as? String == "final" }
        }
        return (stored, settlements)
    }

    /// Batches 0, 1, 2, … contiguous from sequence 1; their leaves (through the router's data-availability API)
    /// exactly the stored receipts, each once; the escrow charged exactly their worth at `prices`.
    func checkSettledExactly(stored: [Receipt], settlements: [[String: Any]], escrowBefore: UInt64) async throws {
        let ranges = settlements.compactMap { s -> (UInt64, UInt64, UInt64)? in
            guard let b = (s["batch"] as? NSNumber)?.uint64Value, let f = (s["first_sequence"] as? NSNumber)?.uint64Value,
                  let l = (s["last_sequence"] as? NSNumber)?.uint64Value else { return nil }
            return (b, f, l)
        }.sorted { $0.0 < $1.0 }
        #expect(ranges.map(\.0) == Array(0..<UInt64(ranges.count)))
        #expect(ranges.first?.1 == 1)
        #expect(zip(ranges, ranges.dropFirst()).allSatisfy { $0.2 + 1 == $1.1 }, "\(ranges)")
        let routerURL = "http://127.0.0.1:\(network.httpPort)"
        var leafKeys: [String] = []
        var settledAmount: UInt64 = 0
        for (batch, _, _) in ranges {
            let served = try #require(try await Harness.request(.GET, "\(routerURL)/v1/settlements/\(batch)").json)
            for entry in try #require(served["entries"] as? [[String: Any]]) where entry["payer"] as? String == account.description {
                let node = try PublicKey(hex: try #require(entry["node"] as? String))
                for leaf in try await Integration.DevnetSettlementTests.leaves(routerURL: routerURL, batch: batch, payer: account, node: node) {
                    let body = try Receipt(settlementBytes: leaf.receipt).body
                    leafKeys.append("\(body.sequence).\(body.attempt)")
                    settledAmount += leaf.amount
                }
            }
        }
        #expect(leafKeys.sorted() == stored.map { "\($0.body.sequence).\($0.body.attempt)" }.sorted())
        // Worth, priced here from each stored receipt's units.
        let worth = stored.reduce(UInt64(0)) { $0 + $1.body.units.promptTokens * 50 + $1.body.units.completionTokens * 150 }
        #expect(settledAmount == worth)
        #expect(try await escrowBalance() == escrowBefore - worth, "the escrow paid other than the receipts' worth")
    }
}
