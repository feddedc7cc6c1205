import EdgeMatrixCore
import EdgeMatrixLedger
import Foundation
import Testing

/// Four validator processes on loopback, from `emc genesis new`.
final class TestChain: @unchecked Sendable {
    let root: String
    let httpPorts: [Int]
    let p2pPorts: [Int]
    private(set) var validators: [TestProcess?]

    var genesisPath: String { root + "/net/genesis.json" }
    var fundedKey: String { root + "/net/funded.key" }
    func url(_ i: Int) -> String { "http://127.0.0.1:\(httpPorts[i])" }

    init(count: Int = 4) throws {
        root = Harness.temporaryDirectory("chain")
        httpPorts = (0..<count).map { _ in Harness.freePort() }
        p2pPorts = (0..<count).map { _ in Harness.freePort() }
        validators = Array(repeating: nil, count: count)
        _ = try TestNetwork.runEMC(["genesis", "new", "--validators", String(count), "--out", root + "/net",
                                    "--endpoints", p2pPorts.map { "127.0.0.1:\($0)" }.joined(separator: ",")])
    }

    func start(_ i: Int) throws {
        validators[i] = try TestProcess(name: "validator-\(i + 1)", executable: Harness.emcBinary, arguments: [
            "node", "--role", "validator", "--genesis", genesisPath, "--data-dir", root + "/net/validator-\(i + 1)",
            "--http-port", String(httpPorts[i]), "--p2p-port", String(p2pPorts[i]),
        ], logDirectory: root)
    }

    func kill9(_ i: Int) {
        validators[i]?.kill9()
        validators[i] = nil
    }

    func status(_ i: Int) async throws -> [String: Any] {
        let result = try await Harness.request(.GET, url(i) + "/status", timeout: .seconds(2))
        guard result.status == 200, let json = result.json else { throw HarnessError.processFailed("status \(result.status)") }
        return json
    }

    func height(_ i: Int) async throws -> Int { try await status(i)["height"] as? Int ?? -1 }

    func block(_ i: Int, _ height: Int) async throws -> [String: Any] {
        try await Harness.request(.GET, url(i) + "/blocks/\(height)", timeout: .seconds(2)).json ?? [:]
    }

    func balance(_ i: Int, keyFile: String) async throws -> String {
        let output = try TestNetwork.runEMC(["query", "balance", keyFile, "--json", "--node", url(i)])
        let json = try JSONSerialization.jsonObject(with: Data(output.utf8)) as? [String: Any]
        return json?["balance"] as? String ?? ""
    }

    func transfer(to keyFile: String, amount: String, via i: Int) throws -> [String: Any] {
        let output = try TestNetwork.runEMC(["tx", "transfer", "--to", keyFile, "--amount", amount, "--key", fundedKey, "--json", "--node", url(i)])
        return (try? JSONSerialization.jsonObject(with: Data(output.utf8)) as? [String: Any]) ?? [:]
    }

    func stopAll() { for v in validators { v?.terminate() } }

    var logs: String { validators.compactMap { $0 }.map { "==== \($0.name)\n\($0.log.suffix(3000))" }.joined(separator: "\n") }
}

extension Integration {
    @Suite("Chain: validators on loopback", .serialized)
    struct ChainTests {
        @Test("4 validators: transfers commit everywhere; kill -9 one, restart it, kill two, bring one back")
        func fourValidatorsSurviveCrashes() async throws {
            let chain = try TestChain()
            defer { chain.stopAll() }
            do { try await scenario(chain) } catch {
                print(chain.logs)
                throw error
            }
        }

        @Test("kill -9 under load: every committed transfer is on the restarted validator, state roots agree")
        func crashUnderLoad() async throws {
            let chain = try TestChain()
            defer { chain.stopAll() }
            do { try await load(chain) } catch {
                print(chain.logs)
                throw error
            }
        }

        func load(_ chain: TestChain) async throws {
            for i in 0..<4 { try chain.start(i) }
            try await Harness.eventually(timeout: .seconds(30), "all 4 validators commit blocks") {
                for i in 0..<4 where try await chain.height(i) < 2 { return false }
                return true
            }
            let funded = try KeyFile.read(from: chain.fundedKey)
            let chainID = try await chain.status(0)["chain_id"] as? String ?? ""
            var accepted = [String]()
            for n in 0..<150 {
                if n == 40 { chain.kill9(1) }
                if n == 120 { try chain.start(1) }
                let body = TransactionBody(chainID: chainID, createdAtMillis: UInt64(Date().timeIntervalSince1970 * 1000),
                                           kind: .transfer(Transfer(to: Account(owner: SigningKey().publicKey), amount: Amount(baseUnits: 1_000))))
                let tx = Transaction(signing: body, with: funded)
                let result = try await Harness.request(.POST, chain.url(0) + "/txs", body: Array(Hex.encode(tx.encoded).utf8))
                #expect(result.status == 202, "\(result.text)")
                if result.status == 202 { accepted.append(tx.id.hex) }
                try await Task.sleep(for: .milliseconds(20))
            }
            // Every accepted transfer commits, and the restarted validator has each one too.
            try await Harness.eventually(timeout: .seconds(60), "all accepted transfers committed") {
                for hash in accepted {
                    let r = try await Harness.request(.GET, chain.url(0) + "/txs/\(hash)", timeout: .seconds(2))
                    if r.json?["status"] as? String != "committed" { return false }
                }
                return true
            }
            let target = try await chain.height(0)
            try await Harness.eventually(timeout: .seconds(30), "restarted validator reaches height \(target)") {
                try await chain.height(1) >= target
            }
            for hash in accepted {
                let r = try await Harness.request(.GET, chain.url(1) + "/txs/\(hash)", timeout: .seconds(2))
                #expect(r.json?["status"] as? String == "committed", "\(hash) on the restarted validator: \(r.text)")
            }
            let roots = try await (0..<4).asyncMap { try await chain.block($0, target)["state_root"] as? String }
            #expect(roots[0] != nil)
            #expect(Set(roots.map { $0 ?? "" }).count == 1, "state roots at height \(target): \(roots)")
        }

        func scenario(_ chain: TestChain) async throws {
            for i in 0..<4 { try chain.start(i) }
            try await Harness.eventually(timeout: .seconds(30), "all 4 validators commit blocks") {
                for i in 0..<4 where try await chain.height(i) < 2 { return false }
                return true
            }

            // A transfer commits and shows on every validator.
            let bob = chain.root + "/bob.key"
            _ = try TestNetwork.runEMC(["keys", "new", "--file", bob])
            let result = try chain.transfer(to: bob, amount: "12.5", via: 0)
            #expect(result["status"] as? String == "committed", "\(result)")
            #expect((result["height"] as? Int ?? 0) > 0)
            try await Harness.eventually(timeout: .seconds(10), "balance on every validator") {
                for i in 0..<4 where try await chain.balance(i, keyFile: bob) != "12.50000000" { return false }
                return true
            }

            // kill -9 one: the chain goes on, and transfers still commit.
            chain.kill9(3)
            let before = try await chain.height(0)
            try await Harness.eventually(timeout: .seconds(30), "progress with 3 of 4 validators") {
                try await chain.height(0) >= before + 3
            }
            let second = try chain.transfer(to: bob, amount: "1", via: 1)
            #expect(second["status"] as? String == "committed", "\(second)")

            // Restart it: it catches up to the same state root at the same height.
            try chain.start(3)
            try await Harness.eventually(timeout: .seconds(30), "restarted validator catches up") {
                try await chain.height(3) >= chain.height(0) - 1
            }
            let caughtUp = try await chain.height(3)
            let a = try await chain.block(0, caughtUp)
            let b = try await chain.block(3, caughtUp)
            #expect(a["hash"] as? String != nil)
            #expect(a["hash"] as? String == b["hash"] as? String)
            #expect(a["state_root"] as? String == b["state_root"] as? String)
            #expect(try await chain.balance(3, keyFile: bob) == "13.50000000")

            // kill -9 two: no more commits, and the survivors agree.
            chain.kill9(2)
            chain.kill9(3)
            try await Harness.eventually(timeout: .seconds(10), "survivors settle on one height") {
                try await chain.height(0) == chain.height(1)
            }
            let halted = try await chain.height(0)
            try await Task.sleep(for: .seconds(5))
            #expect(try await chain.height(0) == halted, "no commit is possible with 2 of 4 validators")
            #expect(try await chain.height(1) == halted)
            for h in max(1, halted - 5)...halted {
                let x = try await chain.block(0, h)
                let y = try await chain.block(1, h)
                #expect(x["hash"] as? String == y["hash"] as? String, "fork at height \(h)")
            }

            // Bring one back: progress resumes.
            try chain.start(2)
            try await Harness.eventually(timeout: .seconds(60), "progress resumes with 3 of 4 validators") {
                try await chain.height(0) >= halted + 2
            }
            let third = try chain.transfer(to: bob, amount: "0.5", via: 2)
            #expect(third["status"] as? String == "committed", "\(third)")
        }
    }
}

extension Sequence {
    func asyncMap<T>(_ transform: (Element) async throws -> T) async rethrows -> [T] {
        var out = [T]()
        for element in self { out.append(try await transform(element)) }
        return out
    }
}
