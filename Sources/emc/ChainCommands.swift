import ArgumentParser
import EdgeMatrixChain
import EdgeMatrixCore
import EdgeMatrixLedger
import Foundation

/// `--node URL`, defaulting to $EMC_NODE_URL.
struct NodeOption: ParsableArguments {
    @Option(help: "A validator's HTTP API, e.g. http://127.0.0.1:8120 (default $EMC_NODE_URL).") var node: String?

    func client() throws -> ChainClient {
        guard let url = node ?? ProcessInfo.processInfo.environment["EMC_NODE_URL"], !url.isEmpty else {
            throw ValidationError("no node: pass --node URL or set EMC_NODE_URL (emc devnet prints it)")
        }
        return ChainClient(baseURL: url.hasPrefix("http") ? url : "http://" + url)
    }
}

func printJSON(_ object: Any) {
    let data = (try? JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])) ?? Data()
    say(String(decoding: data, as: UTF8.self))
}

/// An account given as ICRC-1 text, a 64-hex-digit public key, or a key file path.
func parseAccountArgument(_ text: String) throws -> Account {
    if FileManager.default.fileExists(atPath: absolute(text)) {
        return Account(owner: try KeyFile.read(from: absolute(text)).publicKey)
    }
    if text.count == 64, let key = try? PublicKey(hex: text) { return Account(owner: key) }
    do { return try Account(text: text) } catch { throw ValidationError("invalid account '\(text)': \(error)") }
}

struct GenesisCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "genesis", abstract: "Create genesis files.",
                                                    subcommands: [New.self])

    struct New: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write a devnet genesis with N validators, their node keys and a funded account key.",
            discussion: """
            Writes OUT/genesis.json, OUT/validator-I/node.key (and owner.key) for I = 1...N, and OUT/funded.key, whose \
            account holds 10,000,000 EMC. Validator I's peer address is --endpoints' I-th entry, or HOST:(BASE_PORT+I-1). \
            Run each validator with: emc node --role validator --genesis OUT/genesis.json --data-dir OUT/validator-I ...
            """)
        @Option(help: "Number of validators (1 to 100).") var validators: Int = 4
        @Option(help: "Output directory.") var out: String
        @Option(help: "Chain id.") var chainID: String = "emc-devnet"
        @Option(help: "Host of the validators' peer addresses.") var host: String = "127.0.0.1"
        @Option(help: "Peer port of validator 1; validator I uses BASE_PORT+I-1.") var basePort: Int = 26656
        @Option(help: "Comma-separated peer addresses HOST:PORT, one per validator (overrides --host/--base-port).")
        var endpoints: String?
        @Flag(help: "Replace an existing genesis in OUT.") var force = false

        func validate() throws {
            guard (1...100).contains(validators) else { throw ValidationError("--validators must be between 1 and 100") }
            if let endpoints, endpoints.split(separator: ",").count != validators {
                throw ValidationError("--endpoints must list exactly \(validators) addresses")
            }
        }

        func run() throws {
            let list = endpoints.map { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } }
                ?? (0..<validators).map { "\(host):\(basePort + $0)" }
            let directory = absolute(out)
            let genesis = try DevnetGenesis.create(directory: directory, chainID: chainID, endpoints: list, overwrite: force)
            let layout = DevnetGenesis.Layout(directory: directory)
            let funded = try KeyFile.read(from: layout.fundedKeyPath)
            say("genesis:        \(layout.genesisPath) (chain \(genesis.chainID), \(validators) validators)")
            for i in 1...validators { say("validator \(i):    \(layout.validatorKeyPath(i))  peer \(list[i - 1])") }
            say("funded key:     \(layout.fundedKeyPath)")
            say("funded account: \(Account(owner: funded.publicKey))")
        }
    }
}

struct Tx: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Sign and submit transactions.", subcommands: [Transfer.self])

    struct Transfer: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Transfer EMC; waits until the transfer is committed and prints its block height.")
        @Option(help: "Recipient: ICRC-1 account text, a hex public key, or a key file.") var to: String
        @Option(help: "Amount in EMC, up to 8 decimals, e.g. 12.5.") var amount: String
        @Option(help: "Memo text (at most 32 bytes).") var memo: String?
        @Option(help: "Key file of the sending account.") var key: String
        @Flag(help: "Return once the node accepted the transaction instead of waiting for the commit.") var noWait = false
        @OptionGroup var node: NodeOption

        func run() async throws {
            let client = try node.client()
            let recipient = try parseAccountArgument(to)
            let value: Amount
            do { value = try Amount(parsing: amount) } catch { throw ValidationError("invalid --amount '\(amount)': \(error)") }
            let signer = try KeyFile.read(from: absolute(key))
            let status = try await client.get("/status")
            guard let chainID = status["chain_id"] as? String else { throw ValidationError("the node did not report a chain id") }
            let body = TransactionBody(chainID: chainID, createdAtMillis: UInt64(Date().timeIntervalSince1970 * 1000),
                                       kind: .transfer(.init(to: recipient, amount: value, memo: memo.map { Array($0.utf8) })))
            let tx = Transaction(signing: body, with: signer)
            let hash = try await client.submit(tx)
            if noWait {
                printJSON(["hash": hash, "status": "pending"])
                return
            }
            let result = try await client.waitForCommit(hash: hash)
            printJSON(result)
            if result["status"] as? String != "committed" { throw ExitCode(1) }
        }
    }
}

struct Query: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Read the chain through a validator's HTTP API (prints JSON).",
        subcommands: [Status.self, Balance.self, Block.self, TxQuery.self, Validators.self])

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Chain id, latest committed height, block hash, state root, mempool size.")
        @OptionGroup var node: NodeOption
        func run() async throws { printJSON(try await node.client().get("/status")) }
    }

    struct Balance: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "An account's balance in EMC.")
        @Argument(help: "ICRC-1 account text, a hex public key, or a key file.") var account: String
        @OptionGroup var node: NodeOption
        func run() async throws {
            let account = try parseAccountArgument(account)
            let text = account.description.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed) ?? account.description
            printJSON(try await node.client().get("/accounts/\(text)/balance"))
        }
    }

    struct Block: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "A committed block by height.")
        @Argument(help: "Block height.") var height: UInt64
        @OptionGroup var node: NodeOption
        func run() async throws { printJSON(try await node.client().get("/blocks/\(height)")) }
    }

    struct TxQuery: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "tx", abstract: "A transaction by hash: pending, committed or failed.")
        @Argument(help: "Transaction hash (64 hex digits).") var hash: String
        @OptionGroup var node: NodeOption
        func run() async throws { printJSON(try await node.client().get("/txs/\(hash)")) }
    }

    struct Validators: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The current validator set.")
        @OptionGroup var node: NodeOption
        func run() async throws { printJSON(try await node.client().get("/validators")) }
    }
}

struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Benchmarks.", subcommands: [ChainBenchCommand.self])

    struct ChainBenchCommand: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "chain",
            abstract: "Committed signed transfers per second with validators on loopback, block time, finality, Ed25519 rates.",
            discussion: "Runs the validators inside this process on a fresh genesis in a temporary directory.")
        @Option(help: "Signed transfers to submit.") var transactions: Int = 20_000
        @Option(help: "Number of validators.") var validators: Int = 4
        @Option(help: "First HTTP port; peer ports start at PORT+10.") var basePort: Int = 29300
        @Option(help: "Commit wait in ms (paces blocks).") var commitMs: UInt64 = 900
        @Option(help: "Most transactions per block.") var maxTxsPerBlock: Int = 10_000
        @Option(help: "Keep the chain data here instead of a temporary directory.") var dataDir: String?

        func validate() throws {
            guard transactions >= 1, transactions <= 1_000_000 else { throw ValidationError("--transactions must be 1...1000000") }
            guard (1...16).contains(validators) else { throw ValidationError("--validators must be 1...16") }
        }

        func run() async throws {
            var logger = bootstrapLogging()
            if ProcessInfo.processInfo.environment["LOG_LEVEL"] == nil { logger.logLevel = .warning }
            let directory = dataDir.map(absolute) ?? NSTemporaryDirectory() + "emc-bench-\(UUID().uuidString.prefix(8))"
            var timeouts = ValidatorConfiguration.defaultTimeouts
            timeouts.commitMs = commitMs
            let result = try await ChainBench.run(transactions: transactions, validators: validators, basePort: basePort,
                                                  directory: directory, timeouts: timeouts, maxTxsPerBlock: maxTxsPerBlock,
                                                  logger: logger, progress: say)
            say(result.description)
            if dataDir == nil { try? FileManager.default.removeItem(atPath: directory) }
        }
    }
}
