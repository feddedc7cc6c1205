import EdgeMatrixCore
import EdgeMatrixLedger
import Foundation
import Testing

extension Integration {
    /// A client in another language, written from docs/PROTOCOL.md alone (Tests/python/submit_transfer.py, with
    /// Python's `cryptography` for Ed25519), builds, signs and submits a transfer to a real validator.
    @Suite("Cross-language client: Python builds and signs a transfer from docs/PROTOCOL.md", .serialized)
    struct PythonClientTests {
        static let script = Harness.packageRoot + "/Tests/python/submit_transfer.py"

        struct ScriptRun {
            var status: Int32
            var output: [String: Any]
            var text: String
        }

        /// Runs the script with the venv's python; its last stdout line is a JSON object.
        static func submit(_ chain: InProcessChain, to: PublicKey, baseUnits: UInt64, memo: String? = nil,
                           flipSignature: Bool = false, protobuf: Bool = false) throws -> ScriptRun {
            var arguments = [script, "--node", chain.url(), "--key", chain.layout.fundedKeyPath, "--to", to.hex,
                             "--amount-base-units", String(baseUnits)]
            if let memo { arguments += ["--memo", memo] }
            if flipSignature { arguments.append("--flip-signature-byte") }
            if protobuf { arguments += ["--protobuf", "--proto-root", Harness.packageRoot + "/proto"] }
            let run = try CLIRun.python(arguments)
            let last = run.stdout.split(separator: "\n").last.map(String.init) ?? ""
            let output = (try? JSONSerialization.jsonObject(with: Data(last.utf8))) as? [String: Any] ?? [:]
            return ScriptRun(status: run.status, output: output, text: "\(run)")
        }

        static func requireCryptography() throws {
            let check = try CLIRun.python(["-c", "import cryptography"])
            if check.status != 0 {
                Issue.record("the venv at \(Harness.venv) lacks Python's `cryptography`: run scripts/test.sh (its setup step installs it)")
                throw HarnessError.processFailed("no cryptography in the venv")
            }
        }

        static func requireGrpcTools() throws {
            try requireCryptography()
            let check = try CLIRun.python(["-c", "import grpc_tools.protoc, google.protobuf"])
            if check.status != 0 {
                Issue.record("the venv at \(Harness.venv) lacks `grpcio-tools`: run scripts/test.sh (its setup step installs it)")
                throw HarnessError.processFailed("no grpcio-tools in the venv")
            }
        }

        static func balance(_ chain: InProcessChain, _ key: PublicKey) async throws -> UInt64? {
            let json = try await Harness.request(.GET, chain.url() + "/accounts/\(Account(owner: key))/balance", timeout: .seconds(5)).json
            return (json?["balance_base_units"] as? NSNumber)?.uint64Value
        }

        // Catches: PROTOCOL.md and the implementation disagreeing on any byte of the transfer encoding, the
        // domain-separated signing message, the transaction id (the script checks the node's hash against
        // SHA-256(signer ‖ body)) or the POST /txs format; and a ledger that credits anything but the exact amount.
        @Test("a transfer built in Python from the document commits; the receiver gains exactly the amount")
        func pythonTransferCommits() async throws {
            try Self.requireCryptography()
            let chain = try await CLITests.startChain()
            do { try await commits(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        func commits(_ chain: InProcessChain) async throws {
            let receiver = SigningKey().publicKey
            let sender = try chain.funded.publicKey
            let senderBefore = try #require(try await Self.balance(chain, sender))
            #expect(try await Self.balance(chain, receiver) == 0)
            let amount: UInt64 = 1_234_567_891
            let run = try Self.submit(chain, to: receiver, baseUnits: amount, memo: "from python")
            #expect(run.status == 0, "\(run.text)")
            let result = run.output["result"] as? [String: Any]
            #expect(result?["status"] as? String == "committed", "\(run.text)")
            let transaction = result?["transaction"] as? [String: Any]
            #expect(transaction?["kind"] as? String == "transfer")
            #expect(transaction?["amount"] as? String == "12.34567891")
            #expect(transaction?["memo_hex"] as? String == Hex.encode(Array("from python".utf8)))
            #expect(transaction?["to"] as? String == Account(owner: receiver).description)
            // Exactly the amount arrives; the sender pays the amount plus the ledger fee.
            try await Harness.eventually(timeout: .seconds(10), "the receiver's balance") {
                try await Self.balance(chain, receiver) == amount
            }
            let fee = chain.genesis.parameters.transferFee.baseUnits
            #expect(try await Self.balance(chain, sender) == senderBefore - amount - fee)
        }

        // Catches: proto/edgematrix/ledger/v1/transaction.proto and POST /txs disagreeing (field numbers, which bytes
        // go in which field, the content type), a validator that re-encodes the body instead of verifying the bytes
        // signed, and one that ignores the content type (protobuf bytes read as an envelope are malformed).
        @Test("a transfer signed in Python and sent as a protoc-generated SignedTransaction commits; exactly amount + fee move")
        func pythonProtobufTransferCommits() async throws {
            try Self.requireGrpcTools()
            let chain = try await CLITests.startChain()
            do { try await protobufCommits(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        func protobufCommits(_ chain: InProcessChain) async throws {
            let receiver = SigningKey().publicKey
            let sender = try chain.funded.publicKey
            let senderBefore = try #require(try await Self.balance(chain, sender))
            let amount: UInt64 = 987_654_321
            let run = try Self.submit(chain, to: receiver, baseUnits: amount, memo: "protobuf", protobuf: true)
            #expect(run.status == 0, "\(run.text)")
            #expect(run.output["encoding"] as? String == "protobuf", "\(run.text)")
            #expect(run.output["submitted_status"] as? Int == 202, "\(run.text)")
            let result = run.output["result"] as? [String: Any]
            #expect(result?["status"] as? String == "committed", "\(run.text)")
            #expect((result?["transaction"] as? [String: Any])?["memo_hex"] as? String == Hex.encode(Array("protobuf".utf8)))
            try await Harness.eventually(timeout: .seconds(10), "the receiver's balance") {
                try await Self.balance(chain, receiver) == amount
            }
            let fee = chain.genesis.parameters.transferFee.baseUnits
            #expect(try await Self.balance(chain, sender) == senderBefore - amount - fee)

            // The same path with one signature byte flipped: refused as bad_signature, nothing moves.
            let bad = try Self.submit(chain, to: receiver, baseUnits: 5, flipSignature: true, protobuf: true)
            #expect(bad.status == 2, "\(bad.text)")
            #expect(((bad.output["submitted"] as? [String: Any])?["error"] as? [String: Any])?["code"] as? String == "bad_signature",
                    "\(bad.text)")
            #expect(try await Self.balance(chain, receiver) == amount)
        }

        // Catches: a validator that admits a transaction whose signature does not verify (the script flips one
        // byte of an otherwise valid signature over a fresh body, so the only possible refusal is bad_signature),
        // or one that moves funds for it.
        @Test("the same script with one signature byte flipped gets bad_signature; no balance changes")
        func flippedSignatureIsRefused() async throws {
            try Self.requireCryptography()
            let chain = try await CLITests.startChain()
            do { try await refused(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        func refused(_ chain: InProcessChain) async throws {
            let receiver = SigningKey().publicKey
            let sender = try chain.funded.publicKey
            let senderBefore = try await Self.balance(chain, sender)
            let run = try Self.submit(chain, to: receiver, baseUnits: 500_000_000, flipSignature: true)
            #expect(run.status == 2, "\(run.text)")
            #expect(run.output["submitted_status"] as? Int == 400, "\(run.text)")
            let error = (run.output["submitted"] as? [String: Any])?["error"] as? [String: Any]
            #expect(error?["code"] as? String == "bad_signature", "\(run.text)")
            // Nothing happens later either: not pending, not committed, no balance moved.
            let hash = try #require(run.output["hash"] as? String)
            let height = try await Harness.request(.GET, chain.url() + "/status").json?["height"] as? Int ?? 0
            try await Harness.eventually(timeout: .seconds(20), "two more blocks") {
                (try await Harness.request(.GET, chain.url() + "/status", timeout: .seconds(1)).json?["height"] as? Int ?? 0) >= height + 2
            }
            #expect(try await Harness.request(.GET, chain.url() + "/txs/\(hash)").status == 404)
            #expect(try await Self.balance(chain, receiver) == 0)
            #expect(try await Self.balance(chain, sender) == senderBefore)
        }
    }
}

extension Integration.PythonClientTests {
    // Catches: PROTOCOL.md and the implementation disagreeing on the bond encoding, the ICRC-1 account text (the
    // script finds its stake through it), the NodeRegistrationStatement layout or the node-registration domain;
    // a ledger that registers a node with the wrong owner, role, stake or endpoints.
    @Test("Python bonds a compute stake and registers a node (owner and node key both sign) from the document")
    func pythonRegistersNode() async throws {
        try Self.requireCryptography()
        let chain = try await Integration.CLITests.startChain()
        do { try await registers(chain) } catch {
            await chain.stop()
            throw error
        }
        await chain.stop()
    }

    func registers(_ chain: InProcessChain) async throws {
        let nodeKeyPath = chain.directory + "/python-node.key"
        let nodeKey = SigningKey()
        try KeyFile.write(nodeKey, to: nodeKeyPath)
        let owner = try chain.funded.publicKey
        let run = try CLIRun.python([Harness.packageRoot + "/Tests/python/register_node.py", "--node", chain.url(),
                                     "--key", chain.layout.fundedKeyPath, "--node-key", nodeKeyPath,
                                     "--amount-base-units", "15000000000", "--lock-days", "30",
                                     "--endpoint", "https://gpu.example:8443"])
        #expect(run.status == 0, "\(run)")
        let last = run.stdout.split(separator: "\n").last.map(String.init) ?? ""
        let output = (try? JSONSerialization.jsonObject(with: Data(last.utf8))) as? [String: Any] ?? [:]
        #expect((output["register"] as? [String: Any])?["status"] as? String == "committed", "\(run)")
        let stakeID = try #require(output["stake_id"] as? Int, "\(run)")

        let nodes = try await Harness.request(.GET, chain.url() + "/nodes").json?["nodes"] as? [[String: Any]] ?? []
        let entry = try #require(nodes.first { $0["node_key"] as? String == nodeKey.publicKey.hex }, "\(nodes)")
        #expect(entry["owner"] as? String == owner.hex)
        #expect(entry["role"] as? String == "compute")
        #expect(entry["status"] as? String == "active")
        #expect(entry["stake_id"] as? Int == stakeID)
        #expect(entry["endpoints"] as? [String] == ["https://gpu.example:8443"])
        let stakes = try await Harness.request(.GET, chain.url() + "/stakes/\(Account(owner: owner))").json?["stakes"] as? [[String: Any]] ?? []
        let stake = try #require(stakes.first { $0["id"] as? Int == stakeID }, "\(stakes)")
        #expect(stake["amount"] as? String == "150.00000000")
        #expect(stake["lock_days"] as? Int == 30)
        #expect(stake["role"] as? String == "compute")
    }

    /// `name: value` lines of docs/PROTOCOL.md's test vector block.
    static func documentedVector() throws -> [String: String] {
        let text = try String(contentsOfFile: Harness.packageRoot + "/docs/PROTOCOL.md", encoding: .utf8)
        var vector = [String: String]()
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
            guard parts.count == 2, ["sender_public_key", "recipient_public_key", "recipient_account", "body", "signature",
                                     "envelope", "tx_id", "register_node_public_key", "register_statement",
                                     "register_node_signature", "register_body", "register_signature",
                                     "register_tx_id"].contains(parts[0]) else { continue }
            vector[parts[0]] = parts[1]
        }
        return vector
    }

    // Catches: the document's test vector (which other-language clients check their encoders against) drifting
    // from the implementation: field order, byte order, length prefixes, the signing domain, the tx id rule, or
    // the ICRC-1 account text.
    @Test("docs/PROTOCOL.md's test vector is what the Swift implementation encodes, verifies and hashes")
    func documentedTestVector() throws {
        let vector = try Self.documentedVector()
        #expect(vector.count == 13, "the test vector blocks in docs/PROTOCOL.md lost lines: \(vector.keys.sorted())")
        let sender = try SigningKey(seed: Array(0..<32))
        let recipient = try SigningKey(seed: Array(32..<64)).publicKey
        #expect(sender.publicKey.hex == vector["sender_public_key"])
        #expect(recipient.hex == vector["recipient_public_key"])
        #expect(Account(owner: recipient).description == vector["recipient_account"])

        let body = TransactionBody(chainID: "emc-devnet", createdAtMillis: 1_767_225_600_000,
                                   kind: .transfer(Transfer(to: Account(owner: recipient), amount: Amount(baseUnits: 1_250_000_000),
                                                            memo: Array("hi".utf8))))
        #expect(Hex.encode(body.canonicalBytes) == vector["body"])
        let envelope = try #require(Hex.decode(vector["envelope"] ?? ""))
        let decoded = try Transaction(decoding: envelope)
        #expect(decoded.body == body)
        #expect(Hex.encode(decoded.bodyBytes) == vector["body"])
        #expect(decoded.signer == sender.publicKey)
        #expect(Hex.encode(decoded.signature) == vector["signature"])
        #expect(decoded.hasValidSignature)
        #expect(decoded.id.hex == vector["tx_id"])
        #expect(Hex.encode(SigningDomain.transaction.message([])) == "656467656d61747269782f7472616e73616374696f6e2f763100")
        // A different signer key or one flipped bit breaks it.
        var forged = envelope
        forged[forged.count - 1] ^= 1
        #expect(try !Transaction(decoding: forged).hasValidSignature)

        // The node registration: statement, node signature, body, owner signature, id.
        let nodeKey = try SigningKey(seed: Array(64..<96))
        #expect(nodeKey.publicKey.hex == vector["register_node_public_key"])
        let statement = NodeRegistrationStatement(chainID: "emc-devnet", owner: sender.publicKey, nodeKey: nodeKey.publicKey,
                                                  role: .compute, endpoints: ["https://gpu.example:8443"], stakeID: 7)
        #expect(Hex.encode(statement.canonicalBytes) == vector["register_statement"])
        let registration = try NodeRegistration(statementBytes: try #require(Hex.decode(vector["register_statement"] ?? "")),
                                                nodeSignature: try #require(Hex.decode(vector["register_node_signature"] ?? "")))
        #expect(registration.hasValidNodeSignature)
        #expect(registration.statement == statement)
        let registerBody = TransactionBody(chainID: "emc-devnet", createdAtMillis: 1_767_225_600_000, kind: .registerNode(registration))
        #expect(Hex.encode(registerBody.canonicalBytes) == vector["register_body"])
        let registerEnvelope = try #require(Hex.decode("01" + "000000f9" + (vector["register_body"] ?? "") + sender.publicKey.hex
                                                       + (vector["register_signature"] ?? "")))
        let register = try Transaction(decoding: registerEnvelope)
        #expect(register.hasValidSignature)
        #expect(register.id.hex == vector["register_tx_id"])
    }
}

extension CLIRun {
    /// Runs the venv's python with `arguments`.
    static func python(_ arguments: [String]) throws -> CLIRun {
        try run(executable: Harness.python, arguments)
    }
}
