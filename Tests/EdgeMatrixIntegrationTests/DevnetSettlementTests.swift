import EdgeMatrixChain
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNode
import EdgeMatrixStore
import Foundation
import Testing

extension Integration {
    /// Issue 7's happy path on the real thing: `emc devnet` (4 validators, a router, 2 compute nodes, real local
    /// models), the official openai Python client with the printed key, and the money checked to the base unit
    /// against what the client itself saw and the prices the devnet registers — never against the chain's own sums.
    @Suite("Settlement on the devnet, end to end", .serialized)
    struct DevnetSettlementTests {
        /// The devnet's registered prices (`DevnetEnrollment.computePrices`), restated here in base units so that a
        /// wrong price on chain or in a receipt is caught: 0.5 EMC / 1M prompt tokens, 1.5 EMC / 1M completion
        /// tokens, 0.0001 EMC per embedding input.
        static let perPromptToken: UInt64 = 50, perCompletionToken: UInt64 = 150, perInput: UInt64 = 10_000
        static let protocolFeeBps: UInt64 = 500, routerFeeBps: UInt64 = 250

        // Catches: requests served but never settled (or settled twice), a leaf priced other than units × the
        // registered price, usage billed other than what the client was told, a split that rounds for the router
        // or loses a base unit, payouts released before the audit window or never, and fees taken from the wrong
        // account.
        @Test("the devnet's openai client pays for chat, stream and embeddings: after the windows every balance moved by exactly Σ units × price, split into node, router fee and burn")
        func happyPath() async throws {
            let directory = Harness.temporaryDirectory("devnet-settle")
            let port = Self.freePortBlock()
            let devnet = try TestProcess(name: "devnet", executable: Harness.emcBinary, arguments: [
                "devnet", "--data-dir", directory + "/data", "--port", String(port), "--venv", Harness.venv,
            ], logDirectory: directory)
            defer { devnet.terminate() }
            try await Harness.eventually(timeout: .seconds(120), "the devnet banner") { devnet.log.contains("OPENAI_API_KEY=") }
            func exported(_ name: String) throws -> String {
                let line = try #require(devnet.log.split(separator: "\n").first { $0.hasPrefix(name + "=") })
                return String(line.dropFirst(name.count + 1))
            }
            let chain = ChainClient(baseURL: try exported("EMC_NODE_URL"))
            let funded = try KeyFile.read(from: try exported("EMC_FUNDED_KEY"))
            let payer = Account(owner: funded.publicKey)
            let routerKey = try KeyFile.read(from: directory + "/data/router/node.key").publicKey
            let routerURL = "http://127.0.0.1:\(port)"

            // Start-up enrollment done: the escrow holds 1,000 EMC and the router's fee is registered.
            try await Harness.eventually(timeout: .seconds(60), "the devnet escrow and router fee") {
                let escrow = try await chain.escrows(of: payer).first { $0["router"] as? String == routerKey.hex }
                let router = try await chain.nodes().first { $0["node_key"] as? String == routerKey.hex }
                return escrow?["available"] as? String == "1000.00000000" && (router?["router_fee_bps"] as? NSNumber)?.uint64Value == Self.routerFeeBps
            }
            let parameters = try await chain.parameters()
            let fee = try Amount(parsing: try #require(parameters["transfer_fee"] as? String)).baseUnits
            let auditWindow = try #require((parameters["audit_window_blocks"] as? NSNumber)?.uint64Value)
            let before = try await Self.money(chain, payer: payer, router: routerKey)
            #expect(try await chain.settlements(router: routerKey).isEmpty)

            // The client's own log: what it asked for, under which request id, and the usage it was told.
            let log = try Self.paidRequests(baseURL: try exported("OPENAI_BASE_URL"), apiKey: try exported("OPENAI_API_KEY"))
            let ids = log.compactMap { ($0["id"] as? NSNumber)?.uint64Value }
            #expect(ids.count == 9 && Set(ids).count == 9, "\(log)")
            let lastID = try #require(ids.max())

            // Wait until batches cover every request, are final, and their node payouts are released.
            var settlements: [[String: Any]] = []
            try await Harness.eventually(timeout: .seconds(240), "settlements covering every request, final, and paid out") {
                settlements = try await chain.settlements(router: routerKey)
                guard let covered = settlements.compactMap({ ($0["last_sequence"] as? NSNumber)?.uint64Value }).max(), covered >= lastID,
                      settlements.allSatisfy({ $0["status"] as? String == "final" }) else { return false }
                let lastFinal = settlements.compactMap { ($0["final_height"] as? NSNumber)?.uint64Value }.max() ?? 0
                let height = (try await chain.status()["height"] as? NSNumber)?.uint64Value ?? 0
                return height > lastFinal + auditWindow
            }
            #expect(settlements.allSatisfy { ($0["router_fee_bps"] as? NSNumber)?.uint64Value == Self.routerFeeBps
                && ($0["protocol_fee_bps"] as? NSNumber)?.uint64Value == Self.protocolFeeBps && ($0["upheld_challenges"] as? NSNumber)?.intValue == 0 })

            // Every leaf, through the router's data-availability API: one per request, priced by the test itself.
            var leafSequences: [UInt64] = []
            var leafIDs = Set<Hash32>()
            var total: UInt64 = 0, protocolFees: UInt64 = 0, routerFees: UInt64 = 0
            var nodeShares: [PublicKey: UInt64] = [:]
            let byID = Dictionary(log.map { (($0["id"] as? NSNumber)?.uint64Value ?? 0, $0) }, uniquingKeysWith: { a, _ in a })
            for settlement in settlements {
                let batch = try #require((settlement["batch"] as? NSNumber)?.uint64Value)
                let served = try #require(try await Harness.request(.GET, "\(routerURL)/v1/settlements/\(batch)").json)
                let entries = try #require(served["entries"] as? [[String: Any]])
                var batchTotal: UInt64 = 0
                for entry in entries {
                    #expect(entry["payer"] as? String == payer.description)
                    let node = try PublicKey(hex: try #require(entry["node"] as? String))
                    let leaves = try await Self.leaves(routerURL: routerURL, batch: batch, payer: payer, node: node)
                    var entrySum: UInt64 = 0
                    for leaf in leaves {
                        let receipt = try Receipt(settlementBytes: leaf.receipt)
                        let body = receipt.body
                        try receipt.verify(nodeKey: node, routerKey: routerKey)
                        #expect(body.payer == payer && body.node == node && body.router == routerKey)
                        leafSequences.append(body.sequence)
                        leafIDs.insert(receipt.id)
                        let asked = try #require(byID[body.sequence], "a leaf for request \(body.sequence), which the client never made")
                        let cost: UInt64
                        switch asked["kind"] as? String {
                        case "chat":
                            // Billed exactly the usage the client was told.
                            #expect(body.units.promptTokens == (asked["prompt_tokens"] as? NSNumber)?.uint64Value)
                            #expect(body.units.completionTokens == (asked["completion_tokens"] as? NSNumber)?.uint64Value)
                            cost = body.units.promptTokens * Self.perPromptToken + body.units.completionTokens * Self.perCompletionToken
                        case "stream":
                            // llama-cpp-python sends no usage block in a stream: the node bills the content deltas it
                            // relayed as completion tokens (docs/SETTLEMENT.md § 4.1).
                            #expect(body.units.completionTokens > 0 && body.units.items == 0)
                            cost = body.units.promptTokens * Self.perPromptToken + body.units.completionTokens * Self.perCompletionToken
                        default:
                            // Embeddings are priced per input only.
                            #expect(body.units.items == 2 && body.units.completionTokens == 0)
                            cost = body.units.items * Self.perInput
                        }
                        #expect(leaf.amount == cost, "request \(body.sequence): leaf \(leaf.amount), units × price \(cost)")
                        entrySum += cost
                    }
                    #expect(UInt64(leaves.count) == (entry["count"] as? NSNumber)?.uint64Value)
                    #expect(String(entrySum) == entry["amount"] as? String)
                    // The split, per entry (docs/SETTLEMENT.md § 4), computed here.
                    let protocolFee = entrySum * Self.protocolFeeBps / 10_000
                    let routerFee = min(entrySum * Self.routerFeeBps / 10_000, entrySum - protocolFee)
                    protocolFees += protocolFee
                    routerFees += routerFee
                    nodeShares[node, default: 0] += entrySum - protocolFee - routerFee
                    batchTotal += entrySum
                }
                #expect((settlement["total_base_units"] as? NSNumber)?.uint64Value == batchTotal)
                total += batchTotal
            }
            #expect(leafSequences.sorted() == ids.sorted(), "every request settled once, and nothing else")
            // Each compute node kept its own countersigned receipts (its evidence against the router): together
            // exactly the settled ones, each with a countersignature that verifies.
            var kept: [Receipt] = []
            for index in 1...2 { kept += try ReceiptOutboxStore(path: directory + "/data/compute-\(index)/outbox.sqlite").countersigned() }
            #expect(Set(kept.map(\.id)) == leafIDs && kept.count == leafIDs.count)
            #expect(kept.allSatisfy { (try? $0.verify(nodeKey: $0.body.node, routerKey: routerKey)) != nil })
            // The same through `emc receipts`, which an operator uses to build a claim; bad input is refused.
            var listed = Set<String>()
            for index in 1...2 {
                let run = try CLIRun.emc(["receipts", "--data-dir", directory + "/data/compute-\(index)", "--router", routerKey.hex, "--json"])
                #expect(run.status == 0, "\(run)")
                for row in run.array {
                    listed.insert(row["receipt_id"] as? String ?? "")
                    let bytes = try #require((row["receipt"] as? String).flatMap { Hex.decode($0) })
                    #expect(try Receipt(settlementBytes: bytes).id.hex == row["receipt_id"] as? String)
                }
            }
            #expect(listed == Set(leafIDs.map(\.hex)))
            for bad in [["--data-dir", directory + "/nowhere"], ["--data-dir", directory + "/data/compute-1", "--limit", "0"],
                        ["--data-dir", directory + "/data/compute-1", "--router", "zz"], ["--data-dir", directory + "/data/compute-1", "--after", "-1"]] {
                let refused = try CLIRun.emc(["receipts"] + bad)
                #expect(refused.status != 0 && !refused.stderr.isEmpty, "\(bad): \(refused)")
            }
            #expect(total > 0)

            // The money moved by exactly that.
            let after = try await Self.money(chain, payer: payer, router: routerKey)
            let settleFees = fee * UInt64(settlements.count)
            #expect(before.escrow - after.escrow == total, "escrow paid \(before.escrow - after.escrow), receipts say \(total)")
            #expect(after.pending == 0)
            // The funded account owns the router and both compute nodes, and pays each settle transaction's fee.
            #expect(after.balance + settleFees == before.balance + routerFees + nodeShares.values.reduce(0, +))
            #expect(after.burned - before.burned == protocolFees + settleFees)
            for (node, share) in nodeShares {
                let earnings = try await chain.earnings(of: node)
                #expect(earnings.reduce(UInt64(0)) { $0 + (($1["node_income_base_units"] as? NSNumber)?.uint64Value ?? 0) } == share)
                #expect(earnings.allSatisfy { ($0["held_base_units"] as? NSNumber)?.uint64Value == 0 })
            }
            let routerEarnings = try await chain.earnings(of: routerKey)
            #expect(routerEarnings.reduce(UInt64(0)) { $0 + (($1["router_income_base_units"] as? NSNumber)?.uint64Value ?? 0) } == routerFees)

            // `emc audit` with the client's own log: every batch is ok, and together they charge what was paid.
            // Catches: an audit that flags honest batches, or that misses leaves (a charged total below the escrow's).
            let logPath = directory + "/client.jsonl"
            func audit(log ids: [UInt64]) throws -> CLIRun {
                try ids.map { "{\"id\": \($0)}" }.joined(separator: "\n").write(toFile: logPath, atomically: true, encoding: .utf8)
                return try CLIRun.emc(["audit", "--account", try exported("EMC_FUNDED_KEY"), "--router", try exported("OPENAI_BASE_URL"),
                                       "--log", logPath, "--node", chain.baseURL, "--json"])
            }
            let clean = try audit(log: ids)
            #expect(clean.status == 0, "\(clean)")
            #expect(clean.array.count == settlements.count && clean.array.allSatisfy { $0["verdict"] as? String == "ok" }, "\(clean)")
            #expect(clean.array.reduce(UInt64(0)) { $0 + (($1["charged_base_units"] as? NSNumber)?.uint64Value ?? 0) } == total)
            #expect(clean.array.reduce(0) { $0 + (($1["leaves"] as? Int) ?? 0) } == ids.count)
            // A log without one request: the router charged for a request the client never received, and the audit
            // says so, naming it. Catches: an audit that never compares with the client's log.
            let dropped = ids[0]
            let flagged = try audit(log: Array(ids.dropFirst()))
            #expect(flagged.status == 1, "\(flagged)")
            let findings = flagged.array.flatMap { ($0["findings"] as? [[String: Any]]) ?? [] }
            #expect(findings.count == 1 && findings.first?["code"] as? String == "not_in_client_log"
                    && (findings.first?["sequence"] as? NSNumber)?.uint64Value == dropped, "\(flagged)")
        }

        // Catches: a client log line silently skipped (a request the audit then cannot vouch for) or a hostile line
        // (negative, huge, not a number) trapping or being read as some id.
        @Test("emc audit reads a client log of request ids line by line and names the first bad line")
        func clientLog() throws {
            #expect(try PayerAudit.requestIDs(inLog: "1\n{\"id\": 2}\n\n  {\"request_id\": \"3\"}\n{\"x-emc-request-id\": 4, \"kind\": \"chat\"}\n") == [1, 2, 3, 4])
            for bad in ["-1", "18446744073709551616", "{\"id\": -5}", "{\"id\": 1.5e40}", "{\"kind\": \"chat\"}", "[1]", "nope"] {
                #expect(throws: PayerAuditError.self, "\(bad)") { try PayerAudit.requestIDs(inLog: "7\n" + bad) }
            }
        }

        /// The funded account's balance, its escrow with the router, and the chain's burned total, in base units.
        static func money(_ chain: ChainClient, payer: Account, router: PublicKey) async throws -> (balance: UInt64, escrow: UInt64, pending: UInt64, burned: UInt64) {
            let escrow = try #require(try await chain.escrows(of: payer).first { $0["router"] as? String == router.hex })
            let account = try #require(try await Harness.request(.GET, "\(chain.baseURL)/accounts/\(payer.description)/balance").json)
            let burned = try Amount(parsing: try #require(try await chain.status()["burned"] as? String)).baseUnits
            return (try #require((account["balance_base_units"] as? NSNumber)?.uint64Value),
                    try #require((escrow["balance_base_units"] as? NSNumber)?.uint64Value),
                    try #require((escrow["pending_base_units"] as? NSNumber)?.uint64Value), burned)
        }

        /// Every leaf of one pair, paging through `GET /v1/settlements/{batch}/receipts`.
        static func leaves(routerURL: String, batch: UInt64, payer: Account, node: PublicKey) async throws -> [(receipt: [UInt8], amount: UInt64)] {
            var leaves: [(receipt: [UInt8], amount: UInt64)] = []
            var offset = 0
            while true {
                let page = try #require(try await Harness.request(
                    .GET, "\(routerURL)/v1/settlements/\(batch)/receipts?payer=\(payer.description)&node=\(node.hex)&offset=\(offset)&limit=2").json)
                for item in try #require(page["receipts"] as? [[String: Any]]) {
                    let receipt = try #require((item["receipt"] as? String).flatMap { Hex.decode($0) })
                    let amount = try #require((item["amount"] as? String).flatMap { UInt64($0) })
                    leaves.append((receipt, amount))
                }
                guard let next = (page["next_offset"] as? NSNumber)?.intValue else { return leaves }
                offset = next
            }
        }

        /// Runs Tests/python/paid_requests.py (the official openai package) and returns its log.
        static func paidRequests(baseURL: String, apiKey: String) throws -> [[String: Any]] {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: Harness.python)
            process.arguments = [Harness.packageRoot + "/Tests/python/paid_requests.py", "--rounds", "3"]
            process.environment = ProcessInfo.processInfo.environment.merging(["OPENAI_BASE_URL": baseURL, "OPENAI_API_KEY": apiKey]) { $1 }
            let out = Pipe(), err = Pipe()
            process.standardOutput = out
            process.standardError = err
            try process.run()
            let output = out.fileHandleForReading.readDataToEndOfFile()
            let errors = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            guard process.terminationStatus == 0, let log = try? JSONSerialization.jsonObject(with: output) as? [[String: Any]] else {
                throw HarnessError.processFailed("paid_requests.py: \(errors)")
            }
            return log
        }

        /// A base port whose devnet offsets (+0, +1, +10, +11, +20…23, +30…33) are all free.
        static func freePortBlock() -> Int {
            for _ in 0..<50 {
                let base = Int.random(in: 20_000...50_000)
                if [0, 1, 10, 11, 20, 21, 22, 23, 30, 31, 32, 33].allSatisfy({ Self.isFree(base + $0) }) { return base }
            }
            return Harness.freePort()
        }

        static func isFree(_ port: Int) -> Bool {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(fd) }
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_addr.s_addr = inet_addr("127.0.0.1")
            addr.sin_port = in_port_t(UInt16(port).bigEndian)
            return withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } } == 0
        }
    }
}
