import EdgeMatrixChain
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNode
import Foundation
import Testing

extension Integration {
    /// Escrow, price lists, router fees and parameters through the real `emc` binary against a real validator.
    @Suite("Escrow and prices through the CLI", .serialized)
    struct EscrowCLITests {
        // Catches: `tx escrow open` building the wrong kind or debiting the wrong account, a top-up that replaces
        // instead of adds, `query escrow --json` missing account/router/balance/pending/available/
        // withdrawable_at_height, the router cap not enforced through the chain, a withdrawal that never comes back
        // (no end-of-block step) or comes back early, prices or the router fee not reaching `query nodes --json`,
        // and `query params --json` not printing the settlement parameters by their genesis keys.
        @Test("escrow open → top up → cap refused → withdraw → returned after the delay; prices, router fee and params")
        func escrowLifecycle() async throws {
            let chain = try await CLITests.startChain()
            do { try await lifecycle(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        // Catches: an ensureEscrow that opens again on every start-up (the escrow would grow each restart), one that
        // tops up by the whole amount instead of the shortfall, and API routes that answer bad input with 500s.
        @Test("ensureEscrow (for the devnet) opens once, tops up only to N; escrow routes refuse bad input with stable codes")
        func ensureEscrowIsIdempotent() async throws {
            let chain = try await CLITests.startChain()
            do {
                let client = ChainClient(baseURL: chain.url())
                let funded = try chain.funded
                let router = SigningKey()
                let enrollment = NodeEnrollment(client: client, owner: funded)
                let requirement = LedgerParameters.standard.staking.router
                try await enrollment.enroll(node: router, role: .router, stake: requirement.minimumStake,
                                            lockDays: requirement.minimumLockDays, endpoints: ["127.0.0.1:9"])
                let account = Account(owner: funded.publicKey)
                #expect(try await enrollment.ensureEscrow(router: router.publicKey, amount: Amount(emc: 1_000)) == Amount(emc: 1_000))
                let after = try await CLITests.balance(chain, account)
                #expect(try await enrollment.ensureEscrow(router: router.publicKey, amount: Amount(emc: 1_000)) == Amount(emc: 1_000))
                #expect(try await enrollment.ensureEscrow(router: router.publicKey, amount: Amount(emc: 600)) == Amount(emc: 1_000))
                #expect(try await CLITests.balance(chain, account) == after)  // nothing was signed
                #expect(try await enrollment.ensureEscrow(router: router.publicKey, amount: Amount(emc: 1_500)) == Amount(emc: 1_500))
                let escrows = try await client.escrows(of: account)
                #expect(escrows.count == 1 && escrows.first?["balance"] as? String == "1500.00000000", "\(escrows)")
                let byRouter = try await client.escrows(router: router.publicKey)
                #expect(byRouter.count == 1 && byRouter.first?["account"] as? String == account.description, "\(byRouter)")

                // Bad input: stable codes, never a 500.
                let badAccount = try await Harness.request(.GET, chain.url() + "/escrow/not-an-account", timeout: .seconds(5))
                #expect(badAccount.status == 400 && badAccount.text.contains("invalid_account"), "\(badAccount.text)")
                let badRouter = try await Harness.request(.GET, chain.url() + "/escrows?router=zz", timeout: .seconds(5))
                #expect(badRouter.status == 400 && badRouter.text.contains("invalid_router"), "\(badRouter.text)")
                let params = try await Harness.request(.GET, chain.url() + "/params", timeout: .seconds(5)).json
                #expect((params?["derived"] as? [String: Any])?["escrow_withdraw_delay_blocks"] as? Int == 30, "\(String(describing: params))")
            } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        // Catches: `genesis new` writing a genesis (or keys) with an invalid settlement parameter, an error that does
        // not name the field, and options that do not reach the file.
        @Test("genesis new: settlement parameters are set by option, validated, and a bad one is named with nothing written")
        func genesisNewParameters() throws {
            let directory = Harness.temporaryDirectory("genesis-params")
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let bad = try CLIRun.emc(["genesis", "new", "--validators", "1", "--out", directory + "/bad", "--protocol-fee-bps", "10001"])
            #expect(bad.status != 0 && bad.stderr.contains("parameters.protocol_fee_bps"), "\(bad)")
            #expect(!FileManager.default.fileExists(atPath: directory + "/bad/genesis.json"))
            #expect(!FileManager.default.fileExists(atPath: directory + "/bad/funded.key"))
            let zero = try CLIRun.emc(["genesis", "new", "--validators", "1", "--out", directory + "/zero", "--challenge-window-blocks", "0"])
            #expect(zero.status != 0 && zero.stderr.contains("parameters.challenge_window_blocks"), "\(zero)")

            let good = try CLIRun.emc(["genesis", "new", "--validators", "1", "--out", directory + "/good", "--epoch-length-blocks", "30",
                                       "--protocol-fee-bps", "250", "--router-escrow-cap-multiple", "2"])
            #expect(good.status == 0 && good.stdout.contains("escrow withdrawal delay 45 blocks"), "\(good)")
            let genesis = try Genesis.decode(json: try Data(contentsOf: URL(fileURLWithPath: directory + "/good/genesis.json")))
            let p = genesis.parameters
            #expect(p.epochLengthBlocks == 30 && p.protocolFeeBps == 250 && p.routerEscrowCapMultiple == 2)
            #expect(p.challengeWindowBlocks == 15 && p.auditWindowBlocks == 15 && p.settlementDeadlineBlocks == 60)
        }

        func height(_ chain: InProcessChain) async throws -> Int {
            try await Harness.request(.GET, chain.url() + "/status", timeout: .seconds(5)).json?["height"] as? Int ?? 0
        }

        func lifecycle(_ chain: InProcessChain) async throws {
            let node = ["--node", chain.url()]
            let funded = chain.layout.fundedKeyPath
            let routerPath = chain.directory + "/router.key", computePath = chain.directory + "/compute.key"
            let payerPath = chain.directory + "/payer.key"
            let router = try CLITests.newKey(routerPath)
            let compute = try CLITests.newKey(computePath)
            let payer = try CLITests.newKey(payerPath)
            let payerAccount = Account(owner: payer.publicKey)

            // Parameters, by their genesis JSON keys (devnet timing).
            let params = try CLIRun.emc(["query", "params", "--json"] + node)
            #expect(params.status == 0, "\(params)")
            #expect(params.object["protocol_fee_bps"] as? Int == 500, "\(params)")
            #expect(params.object["epoch_length_blocks"] as? Int == 20)
            #expect(params.object["challenge_window_blocks"] as? Int == 10)
            #expect(params.object["audit_window_blocks"] as? Int == 10)
            #expect(params.object["settlement_deadline_blocks"] as? Int == 40)
            #expect(params.object["router_escrow_cap_multiple"] as? Int == 1)
            #expect(params.object["transfer_fee"] as? String == "0.00010000")
            #expect(params.object["staking"] is [String: Any])
            let readable = try CLIRun.emc(["query", "params"] + node)
            #expect(readable.status == 0 && readable.stdout.contains("escrow_withdraw_delay_blocks (derived)") && readable.stdout.contains("30"), "\(readable)")

            // The funded account runs a router (100,000 EMC stake) and a compute node.
            for args in [["tx", "stake", "bond", "--role", "router", "--amount", "100000", "--lock-days", "180", "--key", funded],
                         ["tx", "node", "register", "--node-key", routerPath, "--role", "router", "--endpoint", "127.0.0.1:9", "--key", funded],
                         ["tx", "stake", "bond", "--role", "compute", "--amount", "150", "--lock-days", "30", "--key", funded],
                         ["tx", "node", "register", "--node-key", computePath, "--role", "compute", "--key", funded],
                         ["tx", "transfer", "--to", payerPath, "--amount", "1000", "--key", funded]] {
                let run = try CLIRun.emc(args + node)
                #expect(run.status == 0, "\(args): \(run)")
            }

            // Open, then top up.
            let open = try CLIRun.emc(["tx", "escrow", "open", "--router", routerPath, "--amount", "50", "--key", payerPath, "--json"] + node)
            #expect(open.status == 0, "\(open)")
            #expect((open.object["escrow"] as? [String: Any])?["balance"] as? String == "50.00000000", "\(open)")
            let top = try CLIRun.emc(["tx", "escrow", "open", "--router", router.publicKey.hex, "--amount", "25.5", "--key", payerPath] + node)
            #expect(top.status == 0 && top.stdout.contains("balance 75.50000000 EMC"), "\(top)")
            let query = try CLIRun.emc(["query", "escrow", payerAccount.description, "--json"] + node)
            #expect(query.status == 0, "\(query)")
            #expect(query.array.count == 1, "\(query)")
            let escrow = try #require(query.array.first)
            #expect(escrow["account"] as? String == payerAccount.description)
            #expect(escrow["router"] as? String == router.publicKey.hex)
            #expect(escrow["balance"] as? String == "75.50000000")
            #expect(escrow["pending"] as? String == "0.00000000")
            #expect(escrow["available"] as? String == "75.50000000")
            #expect(escrow["withdrawable_at_height"] is NSNull, "\(escrow)")
            // 1000 − 75.5 − two fees.
            #expect(try await CLITests.balance(chain, payerAccount) == "924.49980000")

            // The router's cap (1 × 100,000 EMC) is enforced: the funded account cannot add 99,950 EMC more.
            let over = try CLIRun.emc(["tx", "escrow", "open", "--router", routerPath, "--amount", "99950", "--key", funded] + node)
            #expect(over.status != 0 && over.stderr.contains("escrow_cap_exceeded"), "\(over)")
            // Nor can a compute node take escrow.
            let wrong = try CLIRun.emc(["tx", "escrow", "open", "--router", computePath, "--amount", "1", "--key", payerPath] + node)
            #expect(wrong.status != 0 && wrong.stderr.contains("wrong_node_role"), "\(wrong)")

            // Prices and the router fee show in the registry.
            let pricesPath = chain.directory + "/prices.json"
            try Data(#"{"prices": [{"model": "tiny", "per_million_prompt_tokens": "0.5", "per_million_completion_tokens": "1.5"}, {"model": "*", "per_rest_call": "0.001"}]}"#.utf8)
                .write(to: URL(fileURLWithPath: pricesPath))
            let prices = try CLIRun.emc(["tx", "node", "prices", "--node-key", computePath, "--file", pricesPath, "--key", funded] + node)
            #expect(prices.status == 0, "\(prices)")
            let fee = try CLIRun.emc(["tx", "node", "router-fee", "--node-key", routerPath, "--bps", "250", "--key", funded] + node)
            #expect(fee.status == 0, "\(fee)")
            let nodes = try CLIRun.emc(["query", "nodes", "--json"] + node)
            let computeEntry = try #require(nodes.array.first { $0["node_key"] as? String == compute.publicKey.hex }, "\(nodes)")
            let list = try #require(computeEntry["prices"] as? [[String: Any]], "\(computeEntry)")
            #expect(list.map { $0["name"] as? String } == ["*", "tiny"])
            #expect(list.last?["per_million_completion_tokens"] as? String == "1.50000000")
            #expect(list.first?["per_rest_call"] as? String == "0.00100000")
            let routerEntry = try #require(nodes.array.first { $0["node_key"] as? String == router.publicKey.hex })
            #expect(routerEntry["router_fee_bps"] as? Int == 250, "\(routerEntry)")
            // A bad price file is refused before anything is signed, naming the field.
            try Data(#"{"prices": [{"model": "tiny", "per_image": 3}]}"#.utf8).write(to: URL(fileURLWithPath: pricesPath))
            let bad = try CLIRun.emc(["tx", "node", "prices", "--node-key", computePath, "--file", pricesPath, "--key", funded] + node)
            #expect(bad.status != 0 && bad.stderr.contains("prices[0].per_image"), "\(bad)")

            // Withdraw: one transaction; the escrow comes back by itself after epoch + challenge window = 30 blocks.
            let withdraw = try CLIRun.emc(["tx", "escrow", "withdraw", "--router", routerPath, "--key", payerPath, "--json"] + node)
            #expect(withdraw.status == 0, "\(withdraw)")
            let committedAt = try #require(withdraw.object["height"] as? Int, "\(withdraw)")
            let due = try #require((withdraw.object["escrow"] as? [String: Any])?["withdrawable_at_height"] as? Int, "\(withdraw)")
            #expect(due == committedAt + 30)
            let again = try CLIRun.emc(["tx", "escrow", "withdraw", "--router", routerPath, "--key", payerPath] + node)
            #expect(again.status != 0 && again.stderr.contains("escrow_withdrawal_pending"), "\(again)")
            // Not back before the due block …
            #expect(try await CLITests.balance(chain, payerAccount) == "924.49970000")
            #expect(try await height(chain) < due)
            #expect(try CLIRun.emc(["query", "escrow", payerPath, "--json"] + node).array.first?["balance"] as? String == "75.50000000")
            // … and back once it has passed.
            try await Harness.eventually(timeout: .seconds(90), "the chain reaches the withdrawal height \(due)") {
                try await height(chain) >= due
            }
            #expect(try await CLITests.balance(chain, payerAccount) == "999.99970000")
            let empty = try CLIRun.emc(["query", "escrow", payerPath, "--json"] + node)
            #expect(empty.status == 0 && empty.json is [Any] && empty.array.isEmpty, "\(empty)")
        }
    }
}
