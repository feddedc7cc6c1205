import ArgumentParser
import EdgeMatrixChain
import EdgeMatrixClient
import EdgeMatrixCompute
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNode
import EdgeMatrixRouter
import EdgeMatrixStore
import Foundation
import Logging

@main
struct EMC: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "emc",
        abstract: "EdgeMatrix: an open, decentralized computing network for AI.",
        discussion: "Start with `emc devnet`, which runs a whole local network and prints how to call it.",
        version: ComputeNode.version,
        subcommands: [Devnet.self, Node.self, Join.self, Keys.self, Chat.self, GenesisCommand.self, Tx.self, Query.self, Audit.self, Receipts.self, Bench.self]
    )
}

/// Logging to stderr at the level in LOG_LEVEL (default info). Also clears the signal mask inherited from
/// whoever spawned us (a parent's dispatch thread often blocks SIGTERM), so Ctrl-C and SIGTERM always stop us cleanly.
func bootstrapLogging() -> Logger {
    var none = sigset_t()
    sigemptyset(&none)
    pthread_sigmask(SIG_SETMASK, &none, nil)
    LoggingSystem.bootstrap { label in
        var handler = StreamLogHandler.standardError(label: label)
        handler.logLevel = ProcessInfo.processInfo.environment["LOG_LEVEL"].flatMap(Logger.Level.init(rawValue:)) ?? .info
        return handler
    }
    return Logger(label: "emc")
}

func defaultDataDirectory() -> String {
    ProcessInfo.processInfo.environment["EMC_DATA_DIR"] ?? FileManager.default.currentDirectoryPath + "/devnet-data"
}

func absolute(_ path: String) -> String {
    path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
}

/// Prints a line to stdout at once (progress must show while long steps run).
@Sendable func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

struct Devnet: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a local network: a router, two compute nodes and real local AI models.",
        discussion: """
        The first run installs the models into DATA_DIR/models (minutes; progress is shown). Later runs reuse keys, \
        models, the API key and stored receipts. Prints OPENAI_BASE_URL and OPENAI_API_KEY for the stock OpenAI SDK. \
        Ctrl-C stops everything cleanly.
        """
    )

    @Option(name: .long, help: "Where the network keeps its state.") var dataDir: String = defaultDataDirectory()
    @Option(name: .long, help: "Router HTTP port (the tunnel uses PORT+1, the model servers PORT+10 and PORT+11).")
    var port: Int = 8080
    @Option(name: .long, help: "Use an existing model venv instead of DATA_DIR/models/venv.") var venv: String?

    func validate() throws {
        guard (1...65000).contains(port) else { throw ValidationError("--port must be between 1 and 65000") }
    }

    func run() async throws {
        let logger = bootstrapLogging()
        try await EdgeMatrixNode.Devnet(dataDirectory: absolute(dataDir), httpPort: port, logger: logger)
            .run(venv: venv.map(absolute), say: say)
    }
}

struct Node: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run one node: a compute node beside your AI app, a router, a validator, or a read-only full node.",
        discussion: """
        compute: --config FILE lists the routers to dial (address and pinned key) and the local apps (name, kind \
        openai|rest, base_url, models). The node key is DATA_DIR/node.key (created if missing). With --chain URL \
        (or $EMC_NODE_URL) it also settles its own countersigned receipts on chain when a router stops settling them.
        router:  serves the OpenAI-compatible API on --http-port and the compute-node tunnel on --tunnel-port.
        validator: runs consensus and the ledger for the chain in --genesis; the chain's HTTP JSON API is on \
        --http-port, other validators dial --p2p-port. Blocks live in DATA_DIR/chain.sqlite.
        full: follows the chain in --genesis read-only: syncs blocks from the genesis validators and --peers (each \
        block's commit certificate checked), serves the chain's read-only HTTP API on --http-port, never votes, \
        refuses POST /txs (read_only_node) and opens no peer port.
        """
    )

    enum Role: String, ExpressibleByArgument, CaseIterable { case compute, router, validator, full }

    @Option(help: "compute, router, validator or full (a read-only chain node).") var role: Role
    @Option(help: "Config file (required for compute nodes).") var config: String?
    @Option(name: .long, help: "Where the node keeps its key and state.") var dataDir: String = defaultDataDirectory()
    @Option(help: "Address to listen on (router).") var host: String = "127.0.0.1"
    @Option(help: "OpenAI-compatible API port (router).") var httpPort: Int = 8080
    @Option(help: "Port compute nodes dial (router).") var tunnelPort: Int = 7070
    @Option(help: "Seed for node selection (router; reproducible runs).") var seed: UInt64?
    @Option(help: ArgumentHelp("A validator's HTTP API (default $EMC_NODE_URL). A router admits the compute nodes its registry lists; a compute node settles its own receipts there if a router stops settling them.",
                               valueName: "URL"))
    var chain: String?
    @Option(help: ArgumentHelp("Blocks a countersigned receipt may stay unsettled before the compute node notices it on chain (compute; default two epochs, at least 3600).",
                               valueName: "BLOCKS"))
    var noticeGraceBlocks: UInt64?
    @Option(help: "Genesis file (validator, full).") var genesis: String?
    @Option(help: "Port other validators dial (validator).") var p2pPort: Int = 26656
    @Option(help: ArgumentHelp("Extra peers to dial, comma-separated NODE_KEY_HEX@HOST:PORT (validator, full; the genesis validators are dialled anyway).",
                               valueName: "PEERS"))
    var peers: String?

    /// `--chain`, else $EMC_NODE_URL.
    var chainURL: String? {
        guard let url = chain ?? ProcessInfo.processInfo.environment["EMC_NODE_URL"], !url.isEmpty else { return nil }
        return url.hasPrefix("http") ? url : "http://" + url
    }

    /// `--peers`, parsed; a bad entry is a usage error naming it.
    func peerAddresses() throws -> [PeerAddress] {
        guard let peers, !peers.isEmpty else { return [] }
        return try peers.split(separator: ",").map { entry in
            let parts = entry.trimmingCharacters(in: .whitespaces).split(separator: "@", maxSplits: 1)
            guard parts.count == 2, let key = try? PublicKey(hex: String(parts[0])),
                  let address = PeerAddress(key: key, endpoint: String(parts[1])) else {
                throw ValidationError("--peers entry '\(entry)' must be NODE_KEY_HEX@HOST:PORT (64 hex digits, then a port 1-65535)")
            }
            return address
        }
    }

    func validate() throws {
        if role == .compute, config == nil { throw ValidationError("a compute node needs --config FILE") }
        if role == .validator, genesis == nil { throw ValidationError("a validator needs --genesis FILE (emc genesis new writes one)") }
        if role == .full, genesis == nil { throw ValidationError("a full node needs --genesis FILE: the chain it follows") }
        for (name, port) in [("--http-port", httpPort), ("--tunnel-port", tunnelPort), ("--p2p-port", p2pPort)]
        where !(1...65535).contains(port) {
            throw ValidationError("\(name) must be a TCP port from 1 to 65535, got \(port)")
        }
        _ = try peerAddresses()
        if role == .router, chainURL == nil {
            throw ValidationError("a router needs --chain URL (or EMC_NODE_URL): it admits only compute nodes registered on chain")
        }
    }

    func run() async throws {
        let logger = bootstrapLogging()
        let dataDir = absolute(dataDir)
        let key = try KeyFile.loadOrCreate(at: dataDir + "/node.key")
        switch role {
        case .compute:
            try await NodeRunner.runCompute(configPath: absolute(config!), key: key, dataDirectory: dataDir, chainURL: chainURL,
                                            noticeGraceBlocks: noticeGraceBlocks, logger: logger)
        case .router:
            let configuration = RouterConfiguration(httpHost: host, httpPort: httpPort, tunnelHost: host, tunnelPort: tunnelPort,
                                                    dataDirectory: dataDir, selectionSeed: seed ?? UInt64.random(in: .min ... .max))
            try await NodeRunner.runRouter(configuration: configuration, key: key, chainURL: chainURL!, logger: logger) { endpoints in
                say("router \(key.nodeID) ready: http=\(endpoints.httpPort) tunnel=\(endpoints.tunnelPort) key=\(key.publicKey.hex)")
            }
        case .validator, .full:
            var configuration = ValidatorConfiguration(
                genesis: try ValidatorConfiguration.loadGenesis(path: absolute(genesis!)), dataDirectory: dataDir,
                httpHost: host, httpPort: httpPort, p2pHost: host, p2pPort: p2pPort, peers: try peerAddresses())
            configuration.role = role == .full ? .full : .validator
            try await NodeRunner.runValidator(configuration: configuration, key: key, logger: logger) { http, p2p in
                if role == .full {
                    say("full node \(key.nodeID) ready: http=\(http) (read-only)")
                } else {
                    say("validator \(key.nodeID) ready: http=\(http) p2p=\(p2p)")
                }
                say("EMC_NODE_URL=http://\(host):\(http)")
            }
        }
    }
}

struct Keys: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage node keys and API keys.",
        subcommands: [New.self, Show.self, API.self]
    )

    struct New: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create an Ed25519 node key (file mode 0600).")
        @Option(name: .long, help: "Data dir; the key goes to DATA_DIR/node.key.") var dataDir: String = defaultDataDirectory()
        @Option(help: "Key file path (overrides --data-dir).") var file: String?
        @Flag(help: "Replace an existing key (its identity is lost).") var force = false

        func run() throws {
            let path = absolute(file ?? dataDir + "/node.key")
            let key = SigningKey()
            try KeyFile.write(key, to: path, overwrite: force)
            say("node id:    \(key.nodeID)\npublic key: \(key.publicKey.hex)\nkey file:   \(path)")
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a node key's id and public key.")
        @Option(name: .long, help: "Data dir holding node.key.") var dataDir: String = defaultDataDirectory()
        @Option(help: "Key file path (overrides --data-dir).") var file: String?
        @Flag(help: "Print JSON (node_id, public_key, account, key_file) instead of text.") var json = false

        func run() throws {
            let path = absolute(file ?? dataDir + "/node.key")
            let key = try loadSigningKey(path, option: "key file")
            if json {
                return printJSON(["node_id": key.nodeID.description, "public_key": key.publicKey.hex,
                                  "account": Account(owner: key.publicKey).description, "key_file": path])
            }
            say("node id:    \(key.nodeID)\npublic key: \(key.publicKey.hex)\naccount:    \(Account(owner: key.publicKey))\nkey file:   \(path)")
        }
    }

    struct API: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "api",
            abstract: "Router API keys: emc keys api new|list|revoke.",
            discussion: "`emc keys api` alone is `emc keys api new`. Keys are stored hashed in the router's data dir.",
            subcommands: [NewAPIKey.self, ListAPIKeys.self, RevokeAPIKey.self],
            defaultSubcommand: NewAPIKey.self)
    }

    struct ListAPIKeys: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "list",
            abstract: "List a router's API keys: id (from the key's hash; the secret is never stored), label, account, spend limit, creation time, state.")
        @Option(name: .long, help: "The router's data dir.") var dataDir: String = defaultDataDirectory()
        @Flag(help: "Print JSON instead of a table.") var json = false

        func run() throws {
            let directory = absolute(dataDir)
            let database = try RouterDatabase(path: RouterConfiguration(dataDirectory: directory).databasePath)
            let keys = try APIKeyStore(database: database).list()
            // Keys from before bindings bill the router's own account.
            let routerAccount = (try? KeyFile.read(from: directory + "/node.key")).map { Account(owner: $0.publicKey).description }
            func account(_ info: APIKeyInfo) -> String? { info.account?.description ?? routerAccount }
            func limit(_ info: APIKeyInfo) -> String? {
                info.spendLimitPerEpoch == APIKeyBinding.unlimited ? nil : Amount(baseUnits: info.spendLimitPerEpoch).description
            }
            if json {
                return printJSON(keys.map {
                    ["id": $0.id, "label": $0.label, "created_at_ms": $0.createdAtMillis, "revoked": $0.revoked,
                     "account": account($0) ?? NSNull(), "bound": $0.account != nil,
                     "spend_limit_per_epoch": limit($0) ?? NSNull()] as [String: Any]
                })
            }
            if keys.isEmpty { return say("no API keys; create one with `emc keys api new`") }
            let formatter = ISO8601DateFormatter()
            printTable(["ID", "STATE", "CREATED", "ACCOUNT", "LIMIT/EPOCH", "LABEL"], keys.map {
                [$0.id, $0.revoked ? "revoked" : "active",
                 formatter.string(from: Date(timeIntervalSince1970: Double($0.createdAtMillis) / 1000)),
                 account($0) ?? "(router's own)", limit($0) ?? "none", $0.label]
            })
        }
    }

    struct RevokeAPIKey: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "revoke",
            abstract: "Revoke a router API key, named by its id from `emc keys api list` (8+ leading hex digits) or by the key itself.")
        @Argument(help: "The key's id (or a unique prefix of at least 8 hex digits), or the key emc-sk-....") var key: String
        @Option(name: .long, help: "The router's data dir.") var dataDir: String = defaultDataDirectory()

        func run() throws {
            let database = try RouterDatabase(path: RouterConfiguration(dataDirectory: absolute(dataDir)).databasePath)
            let info: APIKeyInfo
            do { info = try APIKeyStore(database: database).revoke(key) } catch let error as APIKeyAdminError {
                throw CLIError(error.description)
            }
            say("revoked \(info.id) (\(info.label))")
        }
    }

    struct NewAPIKey: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "new",
            abstract: "Create an API key bound to an account (printed once; only its hash is stored).",
            discussion: """
            With --router URL the key is made here and bound remotely: the account's key (--account) signs a binding of \
            the key's hash to that router, and the router stores it (POST /v1/keys). Without --router the key is made \
            in the router's data dir (operator use): bound to --account if given, else to the router's own account, \
            signed by the router key (DATA_DIR/node.key). The router charges exactly the bound account.
            """)
        @Option(name: .long, help: "The router's data dir (without --router).") var dataDir: String = defaultDataDirectory()
        @Option(help: "A label to remember the key by.") var label: String = "default"
        @Option(help: ArgumentHelp("Key file of the account the key spends from.", valueName: "KEY_FILE")) var account: String?
        @Option(help: ArgumentHelp("A router's HTTP URL: bind the key there, remotely (needs --account).", valueName: "URL"))
        var router: String?
        @Option(help: ArgumentHelp("Pin the router's public key (64 hex digits) instead of asking the router for it.", valueName: "HEX"))
        var routerKey: String?
        @Option(help: ArgumentHelp("Most the key may spend per epoch, in EMC (default: no limit beyond the escrow).", valueName: "EMC"))
        var spendLimit: String?

        func validate() throws {
            if router != nil, account == nil { throw ValidationError("--router needs --account KEY_FILE: the account signs the key's binding") }
            if routerKey != nil, router == nil { throw ValidationError("--router-key only applies with --router") }
            if let routerKey, (try? PublicKey(hex: routerKey)) == nil {
                throw ValidationError("--router-key must be 64 hex digits of an Ed25519 public key")
            }
            guard label.utf8.count <= APIKeyStore.maxLabelBytes else { throw ValidationError("--label is at most \(APIKeyStore.maxLabelBytes) bytes") }
            _ = try limit()
        }

        func limit() throws -> UInt64 {
            guard let spendLimit else { return APIKeyBinding.unlimited }
            do { return try Amount(parsing: spendLimit).baseUnits } catch {
                throw ValidationError("--spend-limit: \(error.description)")
            }
        }

        func run() async throws {
            let owner = try account.map { try loadSigningKey($0, option: "--account") }
            if let router, let owner {
                let issued: APIKeyRequest.Issued
                do {
                    issued = try await APIKeyRequest.bind(routerURL: router, owner: owner, routerKey: try routerKey.map { try PublicKey(hex: $0) },
                                                          spendLimitPerEpoch: try limit(), label: label)
                } catch let error as APIKeyRequestError {
                    throw CLIError("the router refused the key: \(error)")
                }
                FileHandle.standardError.write(Data("key \(issued.id) bound to account \(issued.account) at router \(issued.router.nodeID)\n".utf8))
                return say(issued.secret)
            }
            let directory = absolute(dataDir)
            let database = try RouterDatabase(path: RouterConfiguration(dataDirectory: directory).databasePath)
            // The router's own key names the router in the binding (and signs it when no account is given).
            let routerKey = try KeyFile.loadOrCreate(at: directory + "/node.key")
            say(try APIKeyStore(database: database).create(label: label, router: routerKey.publicKey, signer: owner ?? routerKey,
                                                           spendLimitPerEpoch: try limit()))
        }
    }
}

struct Chat: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Ask a model through a router (uses OPENAI_BASE_URL and OPENAI_API_KEY).")

    @Argument(help: "The prompt.") var prompt: String
    @Option(help: "Model id.") var model: String = LocalModels.chatModel
    @Option(help: "Router base URL ending in /v1 (default $OPENAI_BASE_URL).") var url: String?
    @Option(help: "API key (default $OPENAI_API_KEY).") var key: String?
    @Option(help: "Maximum tokens to generate.") var maxTokens: Int = 128
    @Flag(help: "Print the whole answer at once instead of streaming it.") var noStream = false

    func validate() throws {
        guard (1...1_000_000).contains(maxTokens) else { throw ValidationError("--max-tokens must be from 1 to 1000000") }
    }

    func run() async throws {
        let env = ProcessInfo.processInfo.environment
        guard let url = url ?? env["OPENAI_BASE_URL"], let key = key ?? env["OPENAI_API_KEY"] else {
            throw ValidationError("set OPENAI_BASE_URL and OPENAI_API_KEY (emc devnet prints them) or pass --url and --key")
        }
        let client = EdgeMatrixClient(baseURL: url, apiKey: key)
        let messages = [ChatMessage(role: "user", content: prompt)]
        if noStream {
            say(try await client.chat(model: model, messages: messages, maxTokens: maxTokens).text)
        } else {
            for try await delta in client.streamChat(model: model, messages: messages, maxTokens: maxTokens) {
                FileHandle.standardOutput.write(Data(delta.utf8))
            }
            say("")
        }
    }
}
