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
        /// 0.5 EMC / 1M prompt tokens, 1.5 EMC / 1M completion tokens (50 and 150 base units a token).
        static let prices = PriceList(entries: [
            PriceEntry(name: PriceList.wildcard, perMillionPromptTokens: Amount(baseUnits: 50_000_000),
                       perMillionCompletionTokens: Amount(baseUnits: 150_000_000)),
        ])

        // Catches: a receipt lost or left out of every batch after the crash (the node's pay lost), a range
        // settled twice or skipped (batches not contiguous), a batch closed over requests whose receipts were
        // still to be re-delivered (then refused as already batched), and an escrow charged other than what the
        // stored receipts are worth.
        @Test("router kill -9 mid-batch with paid requests in flight: after the restart every receipt is settled exactly once, in contiguous batches, and the escrow pays exactly their worth")
        func crashMidBatch() async throws {
            let network = try await TestNetwork(name: "settle-crash")
            defer { network.stopAll() }
            let chain = ChainClient(baseURL: try await RegistryChain.shared.url())
            try await RegistryChain.shared.enrollRouter(network.routerKey, tunnelAddress: "127.0.0.1:\(network.tunnelPort)")
            try await network.startRouter()
            try await network.startComputeNode(maxConcurrent: 4)
            let nodeKey = try KeyFile.read(from: network.root + "/compute-1/node.key").publicKey
            try await RegistryChain.shared.setPrices(nodeKey, Self.prices)
            try await network.waitForNodes(1)

            // A payer with its own escrow and a key bound to its account.
            let payer = SigningKey()
            let payerFile = network.root + "/payer.key"
            try KeyFile.write(payer, to: payerFile)
            try await RegistryChain.shared.fundEscrow(payer, router: network.routerKey.publicKey, amount: Amount(emc: 50))
            let bound = try CLIRun.emc(["keys", "api", "new", "--account", payerFile, "--router", network.baseURL, "--label", "crash"])
            #expect(bound.status == 0, "\(bound)")
            let secret = bound.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            let account = Account(owner: payer.publicKey)
            func escrowBalance() async throws -> UInt64 {
                let escrow = try #require(try await chain.escrows(of: account).first { $0["router"] as? String == network.routerKey.publicKey.hex })
                return try #require((escrow["balance_base_units"] as? NSNumber)?.uint64Value)
            }
            let before = try await escrowBalance()
            try await Harness.eventually(timeout: .seconds(20), "the router reading the escrow") {
                try await Harness.request(.POST, network.baseURL + "/chat/completions", key: secret,
                                          body: Self.chat("warm up", maxTokens: 2)).status == 200
            }

            // 12 requests in flight; the router dies under them, once the first answers are back.
            let answered = Counter()
            let requests = Task {
                await withTaskGroup(of: Void.self) { group in
                    for i in 0..<12 {
                        group.addTask {
                            let answer = try? await Harness.request(.POST, network.baseURL + "/chat/completions", key: secret,
                                                                    body: Self.chat("Tell a story about the number \(i).", maxTokens: 48), timeout: .seconds(60))
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
                let after = try await Harness.request(.POST, network.baseURL + "/chat/completions", key: secret, body: Self.chat("after \(i)", maxTokens: 4))
                #expect(after.status == 200, "\(after.text)")
            }

            // Everything the router stored for this payer ends up in exactly one final batch.
            let database = network.routerDirectory + "/router.sqlite"
            var stored: [Receipt] = []
            var settlements: [[String: Any]] = []
            try await Harness.eventually(timeout: .seconds(180), "final settlements covering every stored receipt") {
                stored = try await ReceiptFile(path: database).receipts().filter { $0.body.payer == account }
                settlements = try await chain.settlements(router: network.routerKey.publicKey)
                guard let last = stored.map(\.body.sequence).max(),
                      let covered = settlements.compactMap({ ($0["last_sequence"] as? NSNumber)?.uint64Value }).max() else { return false }
                return covered >= last && settlements.allSatisfy { $0["status"] as? String == "final" }
            }
            #expect(stored.count >= 5, "too few receipts to test anything: \(stored.count)")
            // Contiguous batches: 0, 1, 2, … each starting right after the previous one.
            let ranges = settlements.compactMap { s -> (UInt64, UInt64, UInt64)? in
                guard let b = (s["batch"] as? NSNumber)?.uint64Value, let f = (s["first_sequence"] as? NSNumber)?.uint64Value,
                      let l = (s["last_sequence"] as? NSNumber)?.uint64Value else { return nil }
                return (b, f, l)
            }.sorted { $0.0 < $1.0 }
            #expect(ranges.map(\.0) == Array(0..<UInt64(ranges.count)))
            #expect(ranges.first?.1 == 1)
            #expect(zip(ranges, ranges.dropFirst()).allSatisfy { $0.2 + 1 == $1.1 }, "\(ranges)")

            // The leaves the router serves are exactly the stored receipts, each once.
            var leafKeys: [String] = []
            var settledAmount: UInt64 = 0
            for (batch, _, _) in ranges {
                let served = try #require(try await Harness.request(.GET, "http://127.0.0.1:\(network.httpPort)/v1/settlements/\(batch)").json)
                for entry in try #require(served["entries"] as? [[String: Any]]) where entry["payer"] as? String == account.description {
                    let node = try PublicKey(hex: try #require(entry["node"] as? String))
                    for leaf in try await DevnetSettlementTests.leaves(routerURL: "http://127.0.0.1:\(network.httpPort)", batch: batch,
                                                                       payer: account, node: node) {
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
            #expect(try await escrowBalance() == before - worth, "the escrow paid other than the receipts' worth")
            #expect(!network.router!.log.contains("sequence_already_batched") && !network.router!.log.contains("already closed"),
                    "a receipt was refused as already batched")
        }

        static func chat(_ prompt: String, maxTokens: Int) -> [UInt8] {
            Harness.json(["model": "smollm2-135m-instruct", "messages": [["role": "user", "content": prompt]], "max_tokens": maxTokens, "temperature": 0])
        }

        final class Counter: @unchecked Sendable {
            private let lock = NSLock()
            private var count = 0
            func increment() { lock.withLock { count += 1 } }
            var value: Int { lock.withLock { count } }
        }
    }
}
