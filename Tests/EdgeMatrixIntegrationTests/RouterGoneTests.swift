import EdgeMatrixChain
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixStore
import Foundation
import Testing

extension Integration {
    /// Issue 7's "Router gone" test: a router that never settles. Its compute node settles its own countersigned
    /// receipts on chain after the deadline (docs/SETTLEMENT.md § 10).
    @Suite("Settlement when the router is gone", .serialized)
    struct RouterGoneTests {
        // Catches: a compute node left unpaid when its router vanishes (no notice sent, or the ledger never defaults the
        // router), a node paid other than worth − protocol fee to the base unit, a payer's escrow debited other than the
        // receipts' worth, a receipt paid twice or not at all, a router fee paid to a router that did not settle, and a
        // node service that re-sends what the chain already holds (refused notices in its log).
        @Test("router gone: the router is killed for good before it settles; after the deadline its node settles its own receipts and is paid exactly worth − protocol fee from the escrow; the router gets nothing")
        func routerGone() async throws {
            let network = try await TestNetwork(name: "router-gone")
            defer { network.stopAll() }
            let chainURL = try await RegistryChain.shared.url()
            let chainPort = try #require(URL(string: chainURL)?.port)
            // The router reads the chain through a proxy, which goes away: it can no longer settle anything it serves.
            let proxyPort = Harness.freePort()
            let proxy = try TestProcess(name: "chain-proxy", executable: Harness.python, arguments: [
                Harness.packageRoot + "/Tests/python/tcp_proxy.py", String(proxyPort), String(chainPort),
            ], logDirectory: network.root)
            try await Harness.eventually(timeout: .seconds(20), "the chain proxy listening") { proxy.log.contains("listening") }
            let paid = try await PaidNetwork(network, chainURL: "http://127.0.0.1:\(proxyPort)",
                                             computeArguments: ["--chain", chainURL, "--notice-grace-blocks", "2"])
            let routerKeyFile = network.routerDirectory + "/node.key"
            let fee = try CLIRun.emc(["tx", "node", "router-fee", "--node-key", routerKeyFile, "--bps", "250",
                                      "--key", try await RegistryChain.shared.fundedKeyPath(), "--node", chainURL])
            #expect(fee.status == 0, "\(fee)")
            proxy.kill9()
            let router = network.routerKey.publicKey
            let node = try KeyFile.read(from: network.root + "/compute-1/node.key").publicKey
            let escrowBefore = try await paid.escrowBalance()

            // Paid requests with the official openai client (chat, stream, embeddings), then the router dies for good.
            let log = try Integration.DevnetSettlementTests.paidRequests(baseURL: network.baseURL, apiKey: paid.secret)
            #expect(log.count == 9, "3 rounds of chat, stream and embeddings")
            let outbox = network.root + "/compute-1/outbox.sqlite"
            let account = paid.account
            func kept() throws -> [Receipt] {
                try ReceiptOutboxStore(path: outbox).countersigned(router: router.nodeID).filter { $0.body.payer == account }
            }
            let answered = Set(log.compactMap { ($0["id"] as? NSNumber)?.uint64Value })
            try await Harness.eventually(timeout: .seconds(30), "the node keeping every answered request's countersigned receipt") {
                answered.isSubset(of: Set(try kept().map(\.body.sequence)))
            }
            network.router?.kill9()
            let killedAt = ContinuousClock.now

            // The node notices, the deadline passes, the router defaults, the node's share is held for the audit window,
            // then paid out.
            let chain = paid.chain
            var notices: [[String: Any]] = []
            try await Harness.eventually(timeout: .seconds(150), "the router defaulted and every notice settled and paid out") {
                guard try await chain.routerDefaultHeight(router: router) != nil else { return false }
                notices = try await chain.notices(router: router, node: node)
                let held = try await chain.earnings(of: node).compactMap { ($0["held_base_units"] as? NSNumber)?.uint64Value }.reduce(0, +)
                return !notices.isEmpty && notices.allSatisfy { $0["status"] as? String == "settled" } && held == 0
            }
            let waited = ContinuousClock.now - killedAt

            // Which receipts the node settled: every kept receipt worth something at or after the router's cursor, once.
            let cursor = try await chain.settlementCursor(router: router)
            let receipts = try kept()
            // units × the receipt's prices, which the ledger checks are the node's registered ones: for chat and streams
            // 50 and 150 base units a token (PaidNetwork.prices); embeddings are priced per input, at 0 here.
            func worth(_ r: Receipt) -> UInt64 { r.body.cost ?? 0 }
            #expect(receipts.filter { $0.body.model == "smollm2-135m-instruct" }.allSatisfy {
                worth($0) == $0.body.units.promptTokens * 50 + $0.body.units.completionTokens * 150
            })
            let expected = receipts.filter { $0.body.sequence >= cursor.nextSequence && worth($0) > 0 }
            #expect(!expected.isEmpty, "the router settled everything before it died; nothing was tested")
            let noticed = notices.map { "\($0["sequence"] ?? "")/\($0["attempt"] ?? "")" }
            #expect(noticed.sorted() == expected.map { "\($0.body.sequence)/\($0.body.attempt)" }.sorted(), "each unsettled receipt once")
            var noticedTotal: UInt64 = 0, nodeShare: UInt64 = 0
            for notice in notices {
                let amount = try #require((notice["amount_base_units"] as? NSNumber)?.uint64Value)
                let receipt = try #require(expected.first { "\($0.body.sequence)/\($0.body.attempt)" == "\(notice["sequence"] ?? "")/\(notice["attempt"] ?? "")" })
                #expect(amount == worth(receipt), "the ledger's worth is units × the registered prices")
                #expect((notice["charged_base_units"] as? NSNumber)?.uint64Value == amount)
                noticedTotal += amount
                nodeShare += amount - amount * 500 / 10_000
            }
            // What the router did settle before it lost the chain (normally nothing: the proxy went away first).
            let batches = try await chain.settlements(router: router)
            var routerSettled: UInt64 = 0, routerShare: UInt64 = 0
            for batch in batches {
                let total = try #require((batch["total_base_units"] as? NSNumber)?.uint64Value)
                let routerFee = total * UInt64((batch["router_fee_bps"] as? NSNumber)?.intValue ?? 0) / 10_000
                routerSettled += total
                nodeShare += total - total * 500 / 10_000 - routerFee
                routerShare += routerFee
            }
            let earnings = try await chain.earnings(of: node)
            let earned = earnings.compactMap { ($0["node_income_base_units"] as? NSNumber)?.uint64Value }.reduce(0, +)
            #expect(earned == nodeShare, "node owner: exactly Σ (worth − protocol fee) of the noticed receipts")
            let routerIncome = try await chain.earnings(of: router).compactMap { ($0["router_income_base_units"] as? NSNumber)?.uint64Value }.reduce(0, +)
            #expect(routerIncome == routerShare, "the router earns nothing from what its node settled")
            #expect(try await paid.escrowBalance() == escrowBefore - noticedTotal - routerSettled, "the escrow paid exactly the receipts' worth")
            // `emc query notices` shows the same, settled.
            let cli = try CLIRun.emc(["query", "notices", "--router", router.hex, "--node-key", node.hex, "--json", "--node", chainURL])
            #expect(cli.status == 0 && cli.array.count == notices.count && cli.array.allSatisfy { $0["status"] as? String == "settled" }, "\(cli)")
            let computeLog = network.computeNodes[0].log
            #expect(computeLog.contains("noticed receipts the router has not settled"), "\(computeLog.suffix(2000))")
            #expect(!computeLog.contains("the chain refused a notice"), "\(computeLog.suffix(2000))")
            print("router gone: \(expected.count) receipts, \(noticedTotal) base units noticed, node paid \(earned), \(batches.count) router batches; paid \(waited) after the kill")
        }
    }
}
