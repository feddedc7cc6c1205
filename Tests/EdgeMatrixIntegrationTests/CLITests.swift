import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixStore
import Foundation
import Testing

/// One run of the real `emc` binary: exit status, stdout and stderr.
struct CLIRun: CustomStringConvertible {
    var status: Int32
    var stdout: String
    var stderr: String

    /// stdout parsed as JSON (nil when it is not JSON).
    var json: Any? { try? JSONSerialization.jsonObject(with: Data(stdout.utf8)) }
    var object: [String: Any] { json as? [String: Any] ?? [:] }
    var array: [[String: Any]] { json as? [[String: Any]] ?? [] }
    var description: String { "exit \(status)\nstdout: \(stdout)\nstderr: \(stderr)" }

    /// Runs `emc` with `arguments`; EMC_NODE_URL is cleared so only an explicit --node counts.
    static func emc(_ arguments: [String]) throws -> CLIRun { try run(executable: Harness.emcBinary, arguments) }

    /// Runs a program to completion; one still running after `timeout` seconds is killed and reported as exit 124.
    static func run(executable: String, _ arguments: [String], timeout: Double = 90) throws -> CLIRun {
        let directory = Harness.temporaryDirectory("cli-run")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        FileManager.default.createFile(atPath: directory + "/out", contents: nil)
        FileManager.default.createFile(atPath: directory + "/err", contents: nil)
        let out = FileHandle(forWritingAtPath: directory + "/out")!
        let err = FileHandle(forWritingAtPath: directory + "/err")!
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        var environment = ProcessInfo.processInfo.environment
        environment["EMC_NODE_URL"] = nil
        process.environment = environment
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning, Date() < deadline { usleep(20_000) }
        let timedOut = process.isRunning
        if timedOut { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        try out.close()
        try err.close()
        return CLIRun(status: timedOut ? 124 : process.terminationStatus,
                      stdout: (try? String(contentsOfFile: directory + "/out", encoding: .utf8)) ?? "",
                      stderr: (try? String(contentsOfFile: directory + "/err", encoding: .utf8)) ?? "")
    }
}

extension Integration {
    /// The chain CLI (`emc tx <module> <verb>`, `emc query <what> --json`) as a participant uses it, against a real
    /// validator over real TCP.
    @Suite("Chain CLI against a running validator", .serialized)
    struct CLITests {
        /// A one-validator chain (in process; the CLI runs as its own process) that has started committing.
        static func startChain() async throws -> InProcessChain {
            let chain = try InProcessChain(validators: 1, running: 1)
            try await Harness.eventually(timeout: .seconds(20), "the validator commits blocks") {
                (try await Harness.request(.GET, chain.url() + "/status", timeout: .seconds(1)).json?["height"] as? Int ?? 0) >= 2
            }
            return chain
        }

        static func newKey(_ path: String) throws -> SigningKey {
            let run = try CLIRun.emc(["keys", "new", "--file", path])
            guard run.status == 0 else { throw HarnessError.processFailed("emc keys new: \(run)") }
            return try KeyFile.read(from: path)
        }

        static func balance(_ chain: InProcessChain, _ account: Account) async throws -> String? {
            try await Harness.request(.GET, chain.url() + "/accounts/\(account)/balance", timeout: .seconds(5)).json?["balance"] as? String
        }

        // Catches: a stake or node command that builds the wrong transaction kind, a registration without a valid
        // node-key signature (the ledger refuses it), an update that drops or garbles endpoints, `query nodes --json`
        // missing node_key/role/owner/status/stake or reporting a stale status, a stake unbonded while it backs an active node, a node retired by a key
        // that does not own it, and a withdrawal before the lock ends.
        @Test("stake bond → node register → query nodes --json → retire → unbond, each through the emc binary")
        func stakeAndNodeLifecycle() async throws {
            let chain = try await Self.startChain()
            do { try await lifecycle(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        func lifecycle(_ chain: InProcessChain) async throws {
            let node = ["--node", chain.url()]
            let funded = chain.layout.fundedKeyPath
            let ownerPath = chain.directory + "/owner.key"
            let nodePath = chain.directory + "/node.key"
            let owner = try Self.newKey(ownerPath)
            let nodeKey = try Self.newKey(nodePath)
            let ownerAccount = Account(owner: owner.publicKey)

            // Fund the owner, via the module form of transfer.
            let funding = try CLIRun.emc(["tx", "token", "transfer", "--to", ownerPath, "--amount", "1000", "--key", funded, "--json"] + node)
            #expect(funding.status == 0, "\(funding)")
            #expect(funding.object["status"] as? String == "committed", "\(funding)")
            #expect(try await Self.balance(chain, ownerAccount) == "1000.00000000")

            // Bond a compute stake; the command reports the new stake's id.
            let bond = try CLIRun.emc(["tx", "stake", "bond", "--role", "compute", "--amount", "150", "--lock-days", "30",
                                       "--key", ownerPath, "--json"] + node)
            #expect(bond.status == 0, "\(bond)")
            let stakeID = try #require(bond.object["stake_id"] as? Int, "\(bond)")
            let stakes = try CLIRun.emc(["query", "stakes", ownerAccount.description, "--json"] + node)
            #expect(stakes.status == 0, "\(stakes)")
            #expect(stakes.array.count == 1, "\(stakes)")
            #expect(stakes.array.first?["id"] as? Int == stakeID)
            #expect(stakes.array.first?["amount"] as? String == "150.00000000")
            #expect(stakes.array.first?["status"] as? String == "bonded")
            #expect(stakes.array.first?["node_key"] is NSNull, "\(stakes)")

            // Register a compute node on that stake (owner signs the tx, the node key signs the statement).
            let register = try CLIRun.emc(["tx", "node", "register", "--node-key", nodePath, "--role", "compute",
                                           "--endpoint", "http://127.0.0.1:9", "--key", ownerPath, "--json"] + node)
            #expect(register.status == 0, "\(register)")
            #expect(register.object["status"] as? String == "committed", "\(register)")

            let entry = try nodeEntry(chain, nodeKey.publicKey)
            #expect(entry["role"] as? String == "compute")
            #expect(entry["owner"] as? String == ownerAccount.description)
            #expect(entry["owner_key"] as? String == owner.publicKey.hex)
            #expect(entry["status"] as? String == "active")
            #expect(entry["stake"] as? String == "150.00000000")
            #expect(entry["stake_id"] as? Int == stakeID)
            #expect(entry["node_id"] as? String == nodeKey.nodeID.description)
            #expect(entry["endpoints"] as? [String] == ["http://127.0.0.1:9"])
            #expect(entry["eligible"] as? Bool == true, "an active node on a bonded stake of its role is eligible: \(entry)")
            // The readable table names the node too.
            let table = try CLIRun.emc(["query", "nodes"] + node)
            #expect(table.status == 0 && table.stdout.contains(nodeKey.nodeID.description) && table.stdout.contains("active"), "\(table)")

            // The owner updates its endpoints (by public key this time); clearing them works too.
            let update = try CLIRun.emc(["tx", "node", "update", "--node-key", nodeKey.publicKey.hex, "--endpoint", "https://gpu.example:8443",
                                         "--endpoint", "http://127.0.0.1:10", "--key", ownerPath] + node)
            #expect(update.status == 0, "\(update)")
            #expect(try nodeEntry(chain, nodeKey.publicKey)["endpoints"] as? [String] == ["https://gpu.example:8443", "http://127.0.0.1:10"])
            let clear = try CLIRun.emc(["tx", "node", "update", "--node-key", nodePath, "--clear-endpoints", "--key", ownerPath] + node)
            #expect(clear.status == 0, "\(clear)")
            #expect(try nodeEntry(chain, nodeKey.publicKey)["endpoints"] as? [String] == [])
            let nothing = try CLIRun.emc(["tx", "node", "update", "--node-key", nodePath, "--key", ownerPath] + node)
            #expect(nothing.status != 0 && nothing.stderr.contains("nothing to change"), "\(nothing)")

            // A stake that backs an active node cannot be unbonded.
            let early = try CLIRun.emc(["tx", "stake", "unbond", "--stake-id", String(stakeID), "--key", ownerPath] + node)
            #expect(early.status != 0, "\(early)")
            #expect(early.stderr.contains("stake_in_use"), "\(early)")

            // Another key cannot retire it.
            let stranger = try CLIRun.emc(["tx", "node", "retire", "--node-key", nodeKey.publicKey.hex, "--key", funded] + node)
            #expect(stranger.status != 0, "\(stranger)")
            #expect(stranger.stderr.contains("not_node_owner"), "\(stranger)")
            #expect(try nodeEntry(chain, nodeKey.publicKey)["status"] as? String == "active")

            // The owner retires it; it shows as retired.
            let retire = try CLIRun.emc(["tx", "node", "retire", "--node-key", nodePath, "--key", ownerPath, "--json"] + node)
            #expect(retire.status == 0, "\(retire)")
            let retired = try nodeEntry(chain, nodeKey.publicKey)
            #expect(retired["status"] as? String == "retired")
            #expect(retired["eligible"] as? Bool == false, "a retired node is not eligible: \(retired)")

            // Now the stake unbonds; withdrawing before the lock ends is refused and changes nothing.
            let unbond = try CLIRun.emc(["tx", "stake", "unbond", "--stake-id", String(stakeID), "--key", ownerPath, "--json"] + node)
            #expect(unbond.status == 0, "\(unbond)")
            let after = try CLIRun.emc(["query", "stakes", ownerPath, "--json"] + node)
            #expect(after.array.first?["status"] as? String == "unbonding", "\(after)")
            let balanceBefore = try await Self.balance(chain, ownerAccount)
            let withdraw = try CLIRun.emc(["tx", "stake", "withdraw", "--stake-id", String(stakeID), "--key", ownerPath] + node)
            #expect(withdraw.status != 0, "\(withdraw)")
            #expect(withdraw.stderr.contains("stake_locked"), "\(withdraw)")
            #expect(try await Self.balance(chain, ownerAccount) == balanceBefore)
        }

        func nodeEntry(_ chain: InProcessChain, _ key: PublicKey) throws -> [String: Any] {
            let nodes = try CLIRun.emc(["query", "nodes", "--json", "--node", chain.url()])
            #expect(nodes.status == 0, "\(nodes)")
            // The genesis validator is listed too.
            #expect(nodes.array.contains { $0["role"] as? String == "validator" }, "\(nodes)")
            for element in nodes.array {
                for field in ["node_key", "role", "owner", "status", "stake"] {
                    #expect(element[field] != nil, "query nodes --json element lacks \(field): \(element)")
                }
            }
            return try #require(nodes.array.first { $0["node_key"] as? String == key.hex }, "node \(key.hex) not listed: \(nodes)")
        }

        // Catches: an amount parser that wraps, truncates, accepts a sign, an exponent or a 9th decimal; a zero
        // transfer; key files that are garbage, missing, world-readable or whose public key does not match the
        // private key being used anyway; each of them submitting anything at all. Every case must exit non-zero with
        // a message that names the problem, and no balance may move.
        @Test("bad amounts, bad key files and bad arguments: a clear error, non-zero exit, nothing changes")
        func badInputChangesNothing() async throws {
            let chain = try await Self.startChain()
            do { try await badInput(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        func badInput(_ chain: InProcessChain) async throws {
            let node = ["--node", chain.url()]
            let funded = chain.layout.fundedKeyPath
            let fundedAccount = Account(owner: try chain.funded.publicKey)
            let bobPath = chain.directory + "/bob.key"
            let bob = Account(owner: try Self.newKey(bobPath).publicKey)
            let fundedBefore = try await Self.balance(chain, fundedAccount)

            // Key files that must not be used.
            let garbage = chain.directory + "/garbage.key"
            try Data("{\"x\":1}".utf8).write(to: URL(fileURLWithPath: garbage))
            chmod(garbage, 0o600)
            let open = chain.directory + "/open.key"
            try KeyFile.write(SigningKey(), to: open)
            chmod(open, 0o644)
            let mismatched = chain.directory + "/mismatched.key"
            var file = KeyFile(key: SigningKey())
            file.publicKey = SigningKey().publicKey.hex
            try JSONEncoder().encode(file).write(to: URL(fileURLWithPath: mismatched))
            chmod(mismatched, 0o600)

            let transfer = { (amount: String, key: String) in ["tx", "transfer", "--to", bobPath, "--amount", amount, "--key", key] + node }
            let cases: [(arguments: [String], says: String)] = [
                (["tx", "transfer", "--to", bobPath, "--amount=-5", "--key", funded] + node, "not an EMC amount"),
                (transfer("-5", funded), "--amount"),
                (transfer("99999999999999999999", funded), "larger than any EMC amount"),
                (transfer("184467440737.09551616", funded), "larger than any EMC amount"), // UInt64.max + 1 base units
                (transfer("1e3", funded), "not an EMC amount"),
                (transfer("1,5", funded), "not an EMC amount"),
                (transfer("12.123456789", funded), "more than 8 decimals"),
                (transfer("0", funded), "more than 0"),
                (transfer("", funded), "not an EMC amount"),
                (transfer("1", garbage), "not a key file"),
                (transfer("1", chain.directory + "/missing.key"), "no key file"),
                (transfer("1", open), "chmod 600"),
                (transfer("1", mismatched), "does not match"),
                (transfer("100000000", funded), "insufficient_funds"), // more than the funded account holds
                (["tx", "transfer", "--to", "not-an-account", "--amount", "1", "--key", funded] + node, "invalid account"),
                (["tx", "stake", "bond", "--role", "compute", "--amount", "50", "--lock-days", "30", "--key", funded] + node, "stake_below_minimum"),
                (["tx", "stake", "bond", "--role", "compute", "--amount", "100", "--lock-days", "1", "--key", funded] + node, "lock_too_short"),
                (["tx", "stake", "bond", "--role", "compute", "--amount", "100", "--lock-days", "99999999999", "--key", funded] + node, "--lock-days"),
                (["tx", "stake", "bond", "--role", "boss", "--amount", "100", "--lock-days", "30", "--key", funded] + node, "--role"),
                (["tx", "stake", "unbond", "--stake-id", "18446744073709551616", "--key", funded] + node, "--stake-id"),
                (["tx", "stake", "unbond", "--stake-id", "424242", "--key", funded] + node, "unknown_stake"),
                (["tx", "node", "register", "--node-key", bobPath, "--role", "compute", "--key", funded] + node, "no bonded compute stake"),
                (["tx", "node", "register", "--node-key", bobPath, "--role", "compute", "--endpoint", "has space", "--key", funded] + node, "--endpoint"),
                (["tx", "node", "retire", "--node-key", "zz", "--key", funded] + node, "--node-key"),
                (["query", "tx", "../status", "--json"] + node, "not a transaction hash"),
                (["query", "balance", "nobody", "--json"] + node, "invalid account"),
                (["query", "nodes", "--json", "--node", "http://127.0.0.1:\(Harness.freePort())"], "cannot reach"),
                // A "node" that answers something other than JSON (here the validator's Prometheus text).
                (["query", "status", "--json", "--node", chain.url() + "/metrics?x="], "not a JSON object"),
                // A port out of range must be refused, not wrapped around (it once bound 99999999 mod 65536).
                (["node", "--role", "router", "--http-port", "99999999", "--data-dir", chain.directory + "/router"], "--http-port"),
                (["node", "--role", "validator", "--genesis", chain.layout.genesisPath, "--p2p-port", "-1", "--data-dir", chain.directory + "/v"], "--p2p-port"),
                // A full node follows one chain: without a genesis file it does not start.
                (["node", "--role", "full", "--data-dir", chain.directory + "/full"], "a full node needs --genesis"),
                (["node", "--role", "full", "--genesis", chain.layout.genesisPath, "--peers", "127.0.0.1:1", "--data-dir", chain.directory + "/full"],
                 "NODE_KEY_HEX@HOST:PORT"),
            ]
            for (arguments, says) in cases {
                let run = try CLIRun.run(executable: Harness.emcBinary, arguments, timeout: 20)
                #expect(run.status != 0, "emc \(arguments.joined(separator: " ")) should fail: \(run)")
                #expect(run.stderr.contains(says), "emc \(arguments.joined(separator: " ")) should say '\(says)': \(run)")
                #expect(!run.stderr.contains("Fatal error"), "emc crashed: \(run)")
            }

            // Nothing was submitted: after a few blocks no balance moved and the mempool is empty.
            let height = try await Harness.request(.GET, chain.url() + "/status").json?["height"] as? Int ?? 0
            try await Harness.eventually(timeout: .seconds(20), "two more blocks") {
                (try await Harness.request(.GET, chain.url() + "/status", timeout: .seconds(1)).json?["height"] as? Int ?? 0) >= height + 2
            }
            #expect(try await Self.balance(chain, fundedAccount) == fundedBefore)
            #expect(try await Self.balance(chain, bob) == "0.00000000")
            #expect(try await Harness.request(.GET, chain.url() + "/status").json?["mempool_size"] as? Int == 0)
            let stakes = try CLIRun.emc(["query", "stakes", funded, "--json"] + node)
            #expect(stakes.status == 0 && stakes.array.isEmpty, "\(stakes)")
        }

        // Catches: `emc keys api` losing its old form; `keys api new` not printing a usable key; `list` leaking a
        // secret or missing a key; `revoke` revoking nothing, the wrong key, or several keys for an ambiguous or
        // malformed id; a revoked key still passing the store's check.
        @Test("keys api new (and bare `keys api`), list, revoke by id or by key; bad ids are refused")
        func apiKeys() throws {
            let directory = Harness.temporaryDirectory("cli-keys")
            let explicit = try CLIRun.emc(["keys", "api", "new", "--data-dir", directory, "--label", "a"])
            let bare = try CLIRun.emc(["keys", "api", "--data-dir", directory, "--label", "b"])
            for run in [explicit, bare] {
                #expect(run.status == 0, "\(run)")
                #expect(run.stdout.hasPrefix("emc-sk-"), "\(run)")
            }
            let first = explicit.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            let second = bare.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(first != second)

            let list = try CLIRun.emc(["keys", "api", "list", "--data-dir", directory, "--json"])
            #expect(list.status == 0, "\(list)")
            #expect(list.array.map { $0["label"] as? String } == ["a", "b"], "\(list)")
            #expect(list.array.allSatisfy { $0["revoked"] as? Bool == false }, "\(list)")
            #expect(!list.stdout.contains(first) && !list.stdout.contains(String(first.dropFirst(7))), "list must never show a secret")
            let firstID = Hash32.of(Array(first.utf8)).hex.prefix(16)
            #expect(list.array.first?["id"] as? String == String(firstID))

            // Bad selectors change nothing.
            for selector in ["abc", "not-hex-at-all!", "0000000000000000", "emc-sk-00"] {
                let refused = try CLIRun.emc(["keys", "api", "revoke", selector, "--data-dir", directory])
                #expect(refused.status != 0, "revoke \(selector): \(refused)")
                #expect(refused.stderr.contains("API key"), "revoke \(selector): \(refused)")
            }
            let database = try RouterDatabase(path: directory + "/router.sqlite")
            let store = APIKeyStore(database: database)
            #expect(try store.isValid(first) && store.isValid(second))

            // Revoke the first by its id, the second by the key itself.
            let byID = try CLIRun.emc(["keys", "api", "revoke", String(firstID.prefix(10)), "--data-dir", directory])
            #expect(byID.status == 0, "\(byID)")
            #expect(try !store.isValid(first))
            #expect(try store.isValid(second), "revoking one key must leave the other")
            let byKey = try CLIRun.emc(["keys", "api", "revoke", second, "--data-dir", directory])
            #expect(byKey.status == 0, "\(byKey)")
            #expect(try !store.isValid(second))
            let after = try CLIRun.emc(["keys", "api", "list", "--data-dir", directory, "--json"])
            #expect(after.array.count == 2 && after.array.allSatisfy { $0["revoked"] as? Bool == true }, "\(after)")
        }

        // Catches: an operator's key with no signed binding, or bound to some account other than the one named;
        // a spend limit lost on the way; `--router` accepted without the account that must sign.
        @Test("keys api new binds each key: to the router's own account by default, to --account with its --spend-limit")
        func apiKeyBindings() throws {
            let directory = Harness.temporaryDirectory("cli-bind")
            let ownerFile = directory + "/owner.key"
            let owner = SigningKey()
            try KeyFile.write(owner, to: ownerFile)
            let operatorKey = try CLIRun.emc(["keys", "api", "new", "--data-dir", directory, "--label", "ops"])
            #expect(operatorKey.status == 0, "\(operatorKey)")
            let bound = try CLIRun.emc(["keys", "api", "new", "--data-dir", directory, "--label", "user", "--account", ownerFile,
                                        "--spend-limit", "12.5"])
            #expect(bound.status == 0, "\(bound)")
            let routerKey = try KeyFile.read(from: directory + "/node.key")
            let list = try CLIRun.emc(["keys", "api", "list", "--data-dir", directory, "--json"])
            let byLabel = Dictionary(uniqueKeysWithValues: list.array.map { ($0["label"] as? String ?? "", $0) })
            #expect(byLabel["ops"]?["account"] as? String == Account(owner: routerKey.publicKey).description, "\(list)")
            #expect(byLabel["ops"]?["spend_limit_per_epoch"] is NSNull, "\(list)")
            #expect(byLabel["user"]?["account"] as? String == Account(owner: owner.publicKey).description, "\(list)")
            #expect(byLabel["user"]?["spend_limit_per_epoch"] as? String == "12.50000000", "\(list)")
            let store = APIKeyStore(database: try RouterDatabase(path: directory + "/router.sqlite"))
            let secret = bound.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(try store.lookup(secret)?.account == Account(owner: owner.publicKey))
            #expect(try store.lookup(secret)?.spendLimitPerEpoch == 1_250_000_000)
            for arguments in [["--router", "http://127.0.0.1:1"], ["--spend-limit", "1.000000001"], ["--spend-limit", "-1"]] {
                let refused = try CLIRun.emc(["keys", "api", "new", "--data-dir", directory] + arguments)
                #expect(refused.status != 0, "\(arguments): \(refused)")
            }
            #expect(try store.list().count == 2)
        }
    }
}
