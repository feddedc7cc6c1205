import ArgumentParser
import EdgeMatrixChain
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNode
import EdgeMatrixStore
import Foundation

// The chain CLI follows one convention: transactions are `emc tx <module> <verb>`, reads are `emc query <what>`,
// and every read takes `--json` (without it, a readable table or summary). Every transaction is signed locally
// with `--key` and waits for its commit unless `--no-wait`.

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

/// `--json` on every read.
struct OutputOption: ParsableArguments {
    @Flag(help: "Print JSON instead of a readable summary.") var json = false
}

/// A command-line mistake or a refused operation, said plainly. Exits with status 1.
struct CLIError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

func printJSON(_ object: Any) {
    let data = (try? JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])) ?? Data()
    say(String(decoding: data, as: UTF8.self))
}

/// Prints rows as columns padded to their widest cell.
func printTable(_ header: [String], _ rows: [[String]]) {
    let all = [header] + rows
    let widths = header.indices.map { column in all.map { $0.indices.contains(column) ? $0[column].count : 0 }.max() ?? 0 }
    for row in all {
        let cells = row.enumerated().map { i, cell in
            i == row.count - 1 ? cell : cell.padding(toLength: widths[i], withPad: " ", startingAt: 0)
        }
        say(cells.joined(separator: "  "))
    }
}

/// Reads a signing key, saying which option it came from when it cannot be used.
func loadSigningKey(_ path: String, option: String) throws -> SigningKey {
    do { return try KeyFile.read(from: absolute(path)) } catch {
        throw CLIError("\(option) \(path): \(error)")
    }
}

/// An account given as ICRC-1 text, a 64-hex-digit public key, or a key file path.
func parseAccountArgument(_ text: String) throws -> Account {
    if FileManager.default.fileExists(atPath: absolute(text)) {
        return Account(owner: try loadSigningKey(text, option: "account key file").publicKey)
    }
    if text.count == 64, let key = try? PublicKey(hex: text) { return Account(owner: key) }
    do { return try Account(text: text) } catch {
        throw CLIError("invalid account '\(text)': \(error); give ICRC-1 account text, a 64-hex-digit public key or a key file")
    }
}

/// A public key given as 64 hex digits or as a key file path.
func parsePublicKeyArgument(_ text: String, option: String) throws -> PublicKey {
    if text.count == 64, Hex.decode(text) != nil {
        do { return try PublicKey(hex: text) } catch { throw CLIError("\(option) \(text): \(error)") }
    }
    return try loadSigningKey(text, option: option).publicKey
}

/// Parses an EMC amount given on the command line; zero is refused (it can only be a mistake).
func parseAmountArgument(_ text: String, option: String) throws -> Amount {
    let value: Amount
    do { value = try Amount(parsing: text) } catch { throw CLIError("invalid \(option) '\(text)': \(error)") }
    guard value > .zero else { throw CLIError("invalid \(option) '\(text)': the amount must be more than 0") }
    return value
}


/// A 64-hex-digit transaction hash, checked before it goes into a URL.
func checkedHash(_ text: String) throws -> String {
    guard Hash32(hex: text) != nil else { throw CLIError("'\(text)' is not a transaction hash: expected 64 hex digits") }
    return text.lowercased()
}

/// `--role` values.
enum RoleArgument: String, ExpressibleByArgument, CaseIterable {
    case validator, router, compute
    var role: NodeRole {
        switch self {
        case .validator: .validator
        case .router: .router
        case .compute: .compute
        }
    }
}

// MARK: - Genesis

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
        @Option(help: "Blocks per epoch (a settlement batch closes at each epoch boundary).") var epochLengthBlocks: UInt64 = DevnetGenesis.epochLengthBlocks
        @Option(help: "Share of every settled amount burned, in basis points (default 500).") var protocolFeeBps: UInt32?
        @Option(help: "Blocks during which a settlement can be challenged (default: half an epoch).") var challengeWindowBlocks: UInt64?
        @Option(help: "Blocks node payouts are held after the challenge window (default: half an epoch).") var auditWindowBlocks: UInt64?
        @Option(help: "Blocks a router has to settle an epoch (default: two epochs).") var settlementDeadlineBlocks: UInt64?
        @Option(help: "k: a router holds at most k × its bonded stake in escrow (default 1).") var routerEscrowCapMultiple: UInt32?

        func validate() throws {
            guard (1...100).contains(validators) else { throw ValidationError("--validators must be between 1 and 100") }
            guard (1...65535).contains(basePort), basePort <= 65536 - validators else {
                throw ValidationError("--base-port must leave room for \(validators) ports below 65536")
            }
            if let endpoints, endpoints.split(separator: ",").count != validators {
                throw ValidationError("--endpoints must list exactly \(validators) addresses")
            }
        }

        func run() throws {
            let list = endpoints.map { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } }
                ?? (0..<validators).map { "\(host):\(basePort + $0)" }
            let directory = absolute(out)
            let genesis = try DevnetGenesis.create(directory: directory, chainID: chainID, endpoints: list, overwrite: force,
                                                   epochLengthBlocks: epochLengthBlocks) { p in
                if let protocolFeeBps { p.protocolFeeBps = protocolFeeBps }
                if let challengeWindowBlocks { p.challengeWindowBlocks = challengeWindowBlocks }
                if let auditWindowBlocks { p.auditWindowBlocks = auditWindowBlocks }
                if let settlementDeadlineBlocks { p.settlementDeadlineBlocks = settlementDeadlineBlocks }
                if let routerEscrowCapMultiple { p.routerEscrowCapMultiple = routerEscrowCapMultiple }
            }
            let layout = DevnetGenesis.Layout(directory: directory)
            let funded = try KeyFile.read(from: layout.fundedKeyPath)
            say("genesis:        \(layout.genesisPath) (chain \(genesis.chainID), \(validators) validators)")
            for i in 1...validators { say("validator \(i):    \(layout.validatorKeyPath(i))  peer \(list[i - 1])") }
            say("funded key:     \(layout.fundedKeyPath)")
            say("funded account: \(Account(owner: funded.publicKey))")
            let p = genesis.parameters
            say("settlement:     epoch \(p.epochLengthBlocks) blocks, challenge window \(p.challengeWindowBlocks), audit window "
                + "\(p.auditWindowBlocks), deadline \(p.settlementDeadlineBlocks), protocol fee \(p.protocolFeeBps) bps, "
                + "escrow cap \(p.routerEscrowCapMultiple) × router stake, escrow withdrawal delay \(p.escrowWithdrawDelayBlocks) blocks")
        }
    }
}

// MARK: - Transactions

/// What every transaction command shares: the signing key, the node, waiting and output.
struct TxOptions: ParsableArguments {
    @Option(help: "Key file of the signing account (sender, stake owner or node owner).") var key: String
    @Flag(help: "Return once the node accepted the transaction instead of waiting for the commit.") var noWait = false
    @Flag(help: "Print the result as JSON.") var json = false
    @OptionGroup var node: NodeOption

    func signer() throws -> SigningKey { try loadSigningKey(key, option: "--key") }

    /// Signs `kind` for the node's chain, submits it and (unless --no-wait) waits for the outcome. Prints the
    /// result; a transaction that failed in its block exits with status 1. Returns the committed tx JSON.
    @discardableResult
    func submit(_ makeKind: (_ chainID: String) throws -> TransactionKind, signer: SigningKey, client: ChainClient,
                extra: (([String: Any]) async throws -> [String: Any])? = nil) async throws -> [String: Any]? {
        let chainID = try await client.chainID()
        let body = TransactionBody(chainID: chainID, createdAtMillis: wallClockMillis(), kind: try makeKind(chainID))
        let tx = Transaction(signing: body, with: signer)
        let hash = try await client.submit(tx)
        if noWait {
            if json { printJSON(["hash": hash, "status": "pending"]) } else { say("pending  \(hash)\n(check it with: emc query tx \(hash))") }
            return nil
        }
        var result = try await client.waitForCommit(hash: hash)
        let committed = result["status"] as? String == "committed"
        if committed, let extra { result.merge(try await extra(result)) { $1 } }
        if json {
            printJSON(result)
        } else if committed {
            say("committed  \(body.kind.name)  block \(result["height"] ?? "?") tx \(result["index"] ?? "?")  hash \(hash)")
            for key in ["stake_id", "node_id", "node_key"] where result[key] != nil { say("\(key): \(result[key]!)") }
        }
        guard committed else {
            let error = result["error"] as? [String: Any]
            throw CLIError("transaction \(hash) failed in block \(result["height"] ?? "?"): \(error?["code"] ?? "error"): \(error?["message"] ?? "unknown")")
        }
        return result
    }
}

struct Tx: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Sign and submit transactions: emc tx <module> <verb>.",
        discussion: """
        Modules: token (transfer), stake (bond, unbond, withdraw), node (register, update, retire, prices, router-fee), \
        escrow (open, withdraw), settlement (request-data). `emc tx transfer` \
        is short for `emc tx token transfer`. Each command signs with --key, submits to --node (default \
        $EMC_NODE_URL) and waits until the transaction is in a block; a transaction the chain refuses prints why and \
        exits with status 1. Fees are the ledger's transfer fee, burned.
        """,
        subcommands: [Transfer.self, Token.self, Stake.self, NodeTx.self, EscrowTx.self, SettlementTx.self])

    struct Transfer: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Transfer EMC; waits until the transfer is committed and prints its block height.")
        @Option(help: "Recipient: ICRC-1 account text, a hex public key, or a key file.") var to: String
        @Option(help: "Amount in EMC, up to 8 decimals, e.g. 12.5.") var amount: String
        @Option(help: "Memo text (at most 32 bytes).") var memo: String?
        @OptionGroup var tx: TxOptions

        func run() async throws {
            let client = try tx.node.client()
            let recipient = try parseAccountArgument(to)
            let value = try parseAmountArgument(amount, option: "--amount")
            let memoBytes = memo.map { Array($0.utf8) }
            if let memoBytes, memoBytes.count > TransactionLimits.maxMemoBytes {
                throw CLIError("--memo is \(memoBytes.count) bytes; a memo can never exceed \(TransactionLimits.maxMemoBytes) (the chain's own limit, 32 by default, may be lower)")
            }
            let signer = try tx.signer()
            try await tx.submit({ _ in .transfer(.init(to: recipient, amount: value, memo: memoBytes)) }, signer: signer, client: client)
        }
    }

    struct Token: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "EMC token transactions.", subcommands: [Transfer.self])
    }

    // MARK: stake

    struct Stake: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Bond, unbond and withdraw stakes.",
            discussion: """
            A stake locks EMC for a role (validator, router, compute) for at least the role's minimum lock. A bonded \
            stake backs one registered node. Unbonding stops it counting (a stake that backs an active node cannot be \
            unbonded: retire the node first); withdrawing returns it once its lock has ended.
            """,
            subcommands: [Bond.self, Unbond.self, Withdraw.self])

        struct Bond: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Lock EMC from the --key account as stake for a role; prints the new stake's id.")
            @Option(help: "The role the stake is for: validator, router or compute.") var role: RoleArgument
            @Option(help: "Amount in EMC, up to 8 decimals (at least the role's minimum: compute 100, router 100000, validator 1000000 by default).")
            var amount: String
            @Option(help: "Days the stake stays locked (at least the role's minimum: compute 7, router 180, validator 360 by default).")
            var lockDays: UInt32
            @OptionGroup var tx: TxOptions

            func run() async throws {
                let client = try tx.node.client()
                let value = try parseAmountArgument(amount, option: "--amount")
                let signer = try tx.signer()
                let before = Set(try await client.stakes(ownedBy: signer.publicKey).compactMap { $0["id"] as? Int })
                let role = role.role
                try await tx.submit({ _ in .bond(.init(role: role, amount: value, lockDays: lockDays)) }, signer: signer, client: client) { _ in
                    // The new stake is the one that was not there before (the committed state can trail the tx
                    // index by a moment, so look a few times).
                    for _ in 0..<50 {
                        let fresh = try await client.stakes(ownedBy: signer.publicKey).filter {
                            guard let id = $0["id"] as? Int else { return false }
                            return !before.contains(id) && $0["role"] as? String == role.rawValue && $0["amount"] as? String == value.description
                        }
                        if fresh.count == 1, let id = fresh[0]["id"] { return ["stake_id": id] }
                        try await Task.sleep(for: .milliseconds(100))
                    }
                    return [:]
                }
            }
        }

        struct Unbond: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Stop a stake counting; its EMC stays locked until the lock ends (then `emc tx stake withdraw`).")
            @Option(help: "The stake's id (see `emc query stakes <account>`).") var stakeID: UInt64
            @OptionGroup var tx: TxOptions

            func run() async throws {
                let client = try tx.node.client()
                let signer = try tx.signer()
                try await tx.submit({ _ in .unbond(stakeID: stakeID) }, signer: signer, client: client)
            }
        }

        struct Withdraw: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Return an unbonded stake whose lock has ended to its owner account.")
            @Option(help: "The stake's id (see `emc query stakes <account>`).") var stakeID: UInt64
            @OptionGroup var tx: TxOptions

            func run() async throws {
                let client = try tx.node.client()
                let signer = try tx.signer()
                try await tx.submit({ _ in .withdraw(stakeID: stakeID) }, signer: signer, client: client)
            }
        }
    }

    // MARK: node

    struct NodeTx: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "node",
            abstract: "Register, update and retire nodes in the on-chain registry.",
            discussion: """
            --key is the owner account's key (it pays the fee and owns the node); --node-key is the node's own key \
            (DATA_DIR/node.key). Registration carries two signatures: the owner's over the transaction and the node \
            key's over a statement naming the owner, chain, role, endpoints and stake, so nobody can register a node \
            key they do not hold. Retired nodes cannot come back; register a new node key instead. (The ledger has no \
            jailing yet, so there is no unjail.)
            """,
            subcommands: [Register.self, Update.self, Retire.self, Prices.self, RouterFee.self])

        struct Register: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Register a node, backed by one of the owner's bonded stakes of the same role.")
            @Option(help: "The node's key file (it signs the registration).") var nodeKey: String
            @Option(help: "The node's role; the backing stake must be of the same role.") var role: RoleArgument
            @Option(help: "The bonded stake that backs the node (default: the owner's only unused bonded stake of this role).")
            var stakeID: UInt64?
            @Option(help: "An address where the node can be reached, e.g. https://node.example:8443 (repeat for more, at most 8).")
            var endpoint: [String] = []
            @OptionGroup var tx: TxOptions

            func validate() throws {
                if let problem = NodeRegistrationStatement.endpointProblem(endpoint) { throw ValidationError("--endpoint: \(problem)") }
            }

            func run() async throws {
                let client = try tx.node.client()
                let owner = try tx.signer()
                let node = try loadSigningKey(nodeKey, option: "--node-key")
                let role = role.role
                let stake: UInt64
                if let stakeID { stake = stakeID } else { stake = try await Self.freeStake(client: client, owner: owner.publicKey, role: role) }
                let endpoints = endpoint
                try await tx.submit({ chainID in
                    let statement = NodeRegistrationStatement(chainID: chainID, owner: owner.publicKey, nodeKey: node.publicKey,
                                                              role: role, endpoints: endpoints, stakeID: stake)
                    return .registerNode(NodeRegistration(statement: statement, nodeKey: node))
                }, signer: owner, client: client) { _ in ["node_id": node.nodeID.description, "node_key": node.publicKey.hex, "stake_id": stake] }
            }

            /// The owner's only bonded stake of `role` that backs no active node.
            static func freeStake(client: ChainClient, owner: PublicKey, role: NodeRole) async throws -> UInt64 {
                let used = Set(try await client.nodes().filter { $0["status"] as? String != "retired" }.compactMap { $0["stake_id"] as? Int })
                let free = try await client.stakes(ownedBy: owner).filter {
                    $0["role"] as? String == role.rawValue && $0["status"] as? String == "bonded" && !used.contains($0["id"] as? Int ?? -1)
                }.compactMap { ($0["id"] as? Int).flatMap(UInt64.init(exactly:)) }
                guard free.count == 1 else {
                    throw CLIError(free.isEmpty
                        ? "the --key account has no bonded \(role) stake that backs no node; bond one with `emc tx stake bond --role \(role)` first"
                        : "the --key account has \(free.count) unused bonded \(role) stakes (\(free.map(String.init).joined(separator: ", "))); choose one with --stake-id")
                }
                return free[0]
            }
        }

        struct Update: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Change a registered node's endpoints and/or the stake behind it.")
            @Option(help: "The node: its key file or its 64-hex-digit public key.") var nodeKey: String
            @Option(help: "New endpoint list (repeat for more, at most 8); replaces the old list.") var endpoint: [String] = []
            @Flag(help: "Set the node's endpoint list to empty.") var clearEndpoints = false
            @Option(help: "Move the node to this bonded stake (same role, same owner).") var stakeID: UInt64?
            @OptionGroup var tx: TxOptions

            func validate() throws {
                guard !endpoint.isEmpty || clearEndpoints || stakeID != nil else {
                    throw ValidationError("nothing to change: give --endpoint, --clear-endpoints or --stake-id")
                }
                if clearEndpoints, !endpoint.isEmpty { throw ValidationError("--clear-endpoints and --endpoint contradict each other") }
                if let problem = NodeRegistrationStatement.endpointProblem(endpoint) { throw ValidationError("--endpoint: \(problem)") }
            }

            func run() async throws {
                let client = try tx.node.client()
                let key = try parsePublicKeyArgument(nodeKey, option: "--node-key")
                let signer = try tx.signer()
                let endpoints: [String]? = clearEndpoints ? [] : (endpoint.isEmpty ? nil : endpoint)
                let stakeID = stakeID
                try await tx.submit({ _ in .updateNode(NodeUpdate(nodeKey: key, endpoints: endpoints, stakeID: stakeID)) },
                                    signer: signer, client: client)
            }
        }

        struct Retire: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Retire a node for good; its stake is freed (then it can be unbonded).")
            @Option(help: "The node: its key file or its 64-hex-digit public key.") var nodeKey: String
            @OptionGroup var tx: TxOptions

            func run() async throws {
                let client = try tx.node.client()
                let key = try parsePublicKeyArgument(nodeKey, option: "--node-key")
                let signer = try tx.signer()
                try await tx.submit({ _ in .retireNode(nodeKey: key) }, signer: signer, client: client)
            }
        }

        struct Prices: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Set a compute node's price list (replaces the old one).",
                discussion: """
                The file is JSON: {"prices": [{"model": "llama3.2:3b", "per_million_prompt_tokens": "0.5", \
                "per_million_completion_tokens": "1.5"}, {"app": "sd", "per_image": "0.02"}, {"model": "*", \
                "per_rest_call": "0.001"}]}. Prices are EMC strings (up to 8 decimals); a missing price is 0. An entry \
                names a model, or an app for apps without models; "*" applies to anything not listed; a node with no \
                matching entry charges nothing. Chat and completions pay per million prompt and completion tokens, \
                embeddings per input, image generation per image, REST apps per call. At most 64 entries, names 1 to \
                128 printable ASCII characters. The entries are sorted for you.
                """)
            @Option(help: "The compute node: its key file or its 64-hex-digit public key.") var nodeKey: String
            @Option(help: "The price file (JSON).") var file: String
            @OptionGroup var tx: TxOptions

            func run() async throws {
                let data: Data
                do { data = try Data(contentsOf: URL(fileURLWithPath: absolute(file))) } catch {
                    throw CLIError("--file \(file): cannot read it (\(error.localizedDescription))")
                }
                let prices: PriceList
                do { prices = try PriceList.parse(json: data) } catch { throw CLIError("--file \(file): \(error)") }
                let client = try tx.node.client()
                let key = try parsePublicKeyArgument(nodeKey, option: "--node-key")
                let signer = try tx.signer()
                try await tx.submit({ _ in .setPrices(SetPrices(nodeKey: key, prices: prices)) }, signer: signer, client: client)
            }
        }

        struct RouterFee: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "router-fee",
                abstract: "Set a router's fee, in basis points of what it settles (at most 10000 minus the protocol fee).")
            @Option(help: "The router node: its key file or its 64-hex-digit public key.") var nodeKey: String
            @Option(help: "The fee in basis points (100 = 1%).") var bps: UInt32
            @OptionGroup var tx: TxOptions

            func validate() throws {
                guard bps <= 10_000 else { throw ValidationError("--bps must be at most 10000 (100%)") }
            }

            func run() async throws {
                let client = try tx.node.client()
                let key = try parsePublicKeyArgument(nodeKey, option: "--node-key")
                let signer = try tx.signer()
                let bps = bps
                try await tx.submit({ _ in .setRouterFee(SetRouterFee(nodeKey: key, feeBps: bps)) }, signer: signer, client: client)
            }
        }
    }

    // MARK: escrow

    struct EscrowTx: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "escrow",
            abstract: "Open, top up and withdraw the escrow that pays a router for your requests.",
            discussion: """
            An escrow belongs to the --key account and one router (its node key). Routers charge requests against it \
            and settle each epoch. `open` moves EMC from the account into the escrow (again = top up); a router holds \
            at most router_escrow_cap_multiple × its bonded stake in escrow from all payers together. `withdraw` is one \
            transaction: after one epoch plus the challenge window (see `emc query params`) the ledger returns what is \
            neither spent nor pending to the account by itself. A top-up cancels a waiting withdrawal.
            """,
            subcommands: [Open.self, Withdraw.self])

        /// The escrow's state after the transaction, for the output.
        static func escrowFields(client: ChainClient, account: Account, router: PublicKey) async throws -> [String: Any] {
            guard let escrow = try await client.escrows(of: account).first(where: { $0["router"] as? String == router.hex }) else {
                return ["escrow": NSNull()]
            }
            return ["escrow": escrow]
        }

        static func describe(_ result: [String: Any]?) {
            guard let escrow = result?["escrow"] as? [String: Any] else { return }
            say("escrow with router \(escrow["router_id"] ?? "?"): balance \(escrow["balance"] ?? "?") EMC, pending \(escrow["pending"] ?? "?"), available \(escrow["available"] ?? "?")")
            if let due = escrow["withdrawable_at_height"] as? Int {
                say("withdrawal scheduled: the available EMC returns to \(escrow["account"] ?? "the account") at the end of block \(due)")
            }
        }

        struct Open: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Move EMC from the --key account into its escrow with a router (opens it, or tops it up).")
            @Option(help: "The router's node key: 64 hex digits or its key file.") var router: String
            @Option(help: "Amount in EMC, up to 8 decimals, e.g. 50.") var amount: String
            @OptionGroup var tx: TxOptions

            func run() async throws {
                let client = try tx.node.client()
                let routerKey = try parsePublicKeyArgument(router, option: "--router")
                let value = try parseAmountArgument(amount, option: "--amount")
                let signer = try tx.signer()
                let account = Account(owner: signer.publicKey)
                let result = try await tx.submit({ _ in .escrowOpen(EscrowOpen(router: routerKey, amount: value)) }, signer: signer, client: client) { _ in
                    try await EscrowTx.escrowFields(client: client, account: account, router: routerKey)
                }
                if !tx.json { EscrowTx.describe(result) }
            }
        }

        struct Withdraw: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Ask for the escrow with a router back; the ledger returns it after one epoch plus the challenge window.")
            @Option(help: "The router's node key: 64 hex digits or its key file.") var router: String
            @OptionGroup var tx: TxOptions

            func run() async throws {
                let client = try tx.node.client()
                let routerKey = try parsePublicKeyArgument(router, option: "--router")
                let signer = try tx.signer()
                let account = Account(owner: signer.publicKey)
                let result = try await tx.submit({ _ in .escrowWithdraw(EscrowWithdraw(router: routerKey)) }, signer: signer, client: client) { _ in
                    try await EscrowTx.escrowFields(client: client, account: account, router: routerKey)
                }
                if !tx.json { EscrowTx.describe(result) }
            }
        }
    }
}

extension Tx {
    struct SettlementTx: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "settlement",
            abstract: "Transactions about routers' settlement batches.",
            subcommands: [RequestData.self])

        struct RequestData: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "request-data",
                abstract: "Ask a router on chain for the leaves of one (payer, node) pair of a pending batch (data_request, kind 15).",
                discussion: """
                For a payer or compute node whose router does not serve a pair's leaves. Sign with the payer account's \
                key, the compute node key, or the node's owner key; the account posts challenge_bond (see `emc query \
                params`) plus the fee. The router must post the leaves on chain (data_response, kind 16) by the deadline: \
                half the batch's challenge window after this request, which must be filed in the window's first half. \
                Answered in full, the bond comes back. Not answered, at the deadline the pair's charge returns to the \
                payer's escrow, the router is slashed, the node owner is made whole from the slash and the bond comes \
                back (docs/SETTLEMENT.md § 11). Example: emc tx settlement request-data --router R --batch 3 --payer \
                me.key --node-key N --key me.key
                """)
            @Option(help: "The router's node key: 64 hex digits or its key file.") var router: String
            @Option(help: "The router's batch number (emc query settlements --router R).") var batch: UInt64
            @Option(help: "The pair's payer account (text form or key file; default: the --key account).") var payer: String?
            @Option(name: .customLong("node-key"), help: "The pair's compute node key: 64 hex digits or its key file.") var nodeKey: String
            @OptionGroup var tx: TxOptions

            func run() async throws {
                let client = try tx.node.client()
                let routerKey = try parsePublicKeyArgument(router, option: "--router")
                let computeKey = try parsePublicKeyArgument(nodeKey, option: "--node-key")
                let signer = try tx.signer()
                let payerAccount = try payer.map(parseAccountArgument) ?? Account(owner: signer.publicKey)
                let request = DataRequest(router: routerKey, batchNumber: batch, payer: payerAccount, node: computeKey)
                _ = try await tx.submit({ _ in .dataRequest(request) }, signer: signer, client: client)
                if !tx.json {
                    say("asked router \(routerKey.nodeID) for the leaves of \(payerAccount) → \(computeKey.nodeID) in batch \(batch); "
                        + "see `emc query settlements --router \(routerKey.hex)` for the outcome")
                }
            }
        }
    }
}

// MARK: - Queries

struct Query: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Read the chain through a validator's HTTP API: emc query <what> [--json].",
        subcommands: [Status.self, Balance.self, Block.self, TxQuery.self, Validators.self, Nodes.self, Stakes.self, Params.self, EscrowQuery.self,
                      SettlementsQuery.self, NoticesQuery.self, DataRequestsQuery.self, EarningsQuery.self])

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Chain id, latest committed height, block hash, state root, mempool size.")
        @OptionGroup var node: NodeOption
        @OptionGroup var output: OutputOption

        func run() async throws {
            let status = try await node.client().status()
            if output.json { return printJSON(status) }
            for key in status.keys.sorted() { say("\(key):".padding(toLength: 22, withPad: " ", startingAt: 0) + "\(status[key]!)") }
        }
    }

    struct Balance: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "An account's balance in EMC.")
        @Argument(help: "ICRC-1 account text, a hex public key, or a key file.") var account: String
        @OptionGroup var node: NodeOption
        @OptionGroup var output: OutputOption

        func run() async throws {
            let account = try parseAccountArgument(account)
            let result = try await node.client().get("/accounts/\(ChainClient.pathComponent(account.description))/balance")
            if output.json { return printJSON(result) }
            say("\(result["balance"] ?? "?") EMC  \(account)  (height \(result["height"] ?? "?"))")
        }
    }

    struct Block: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "A committed block by height.")
        @Argument(help: "Block height (1 or more).") var height: UInt64
        @OptionGroup var node: NodeOption
        @OptionGroup var output: OutputOption

        func run() async throws {
            let block = try await node.client().get("/blocks/\(height)")
            if output.json { return printJSON(block) }
            for key in ["height", "hash", "time_ms", "proposer", "tx_count", "state_root"] where block[key] != nil {
                say("\(key):".padding(toLength: 12, withPad: " ", startingAt: 0) + "\(block[key]!)")
            }
            for case let tx as [String: Any] in block["transactions"] as? [Any] ?? [] {
                say("  \(tx["hash"] ?? "?")  \(tx["kind"] ?? "?")  \(tx["from"] ?? "")" + (tx["amount"].map { "  \($0) EMC" } ?? ""))
            }
        }
    }

    struct TxQuery: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "tx", abstract: "A transaction by hash: pending, committed or failed.")
        @Argument(help: "Transaction hash (64 hex digits).") var hash: String
        @OptionGroup var node: NodeOption
        @OptionGroup var output: OutputOption

        func run() async throws {
            let result = try await node.client().get("/txs/\(try checkedHash(hash))")
            if output.json { return printJSON(result) }
            var line = "\(result["status"] ?? "?")  \(result["hash"] ?? hash)"
            if let height = result["height"] { line += "  block \(height) tx \(result["index"] ?? "?")" }
            say(line)
            if let error = result["error"] as? [String: Any] { say("error: \(error["code"] ?? "?"): \(error["message"] ?? "")") }
            if let tx = result["transaction"] as? [String: Any] {
                for key in tx.keys.sorted() { say("  \(key): \(tx[key]!)") }
            }
        }
    }

    struct Validators: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The current validator set.")
        @OptionGroup var node: NodeOption
        @OptionGroup var output: OutputOption

        func run() async throws {
            let result = try await node.client().get("/validators")
            if output.json { return printJSON(result) }
            say("height \(result["height"] ?? "?"), total voting power \(result["total_voting_power"] ?? "?")")
            let rows = (result["validators"] as? [[String: Any]] ?? []).map {
                ["\($0["node_id"] ?? "")", "\($0["voting_power"] ?? "")", ($0["endpoints"] as? [String] ?? []).joined(separator: ",")]
            }
            printTable(["NODE ID", "POWER", "ENDPOINTS"], rows)
        }
    }

    struct Nodes: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Every registered node: key, role, owner, status and the stake behind it.",
            discussion: """
            --json prints an array; each element has node_key, node_id, role, owner (ICRC-1 account text of the owner \
            key), owner_key, status (active, jailed or retired, as the chain reports it), stake (the backing stake's \
            amount in EMC, or null if it is gone), stake_id, stake_status, endpoints, registered_at and, where the \
            validator reports it, eligible (whether routers admit the node now), prices (a compute node's price list: \
            name and per_million_prompt_tokens, per_million_completion_tokens, per_embedding_input, per_image, \
            per_rest_call in EMC) and router_fee_bps (a router's fee).
            """)
        @Option(help: "Only nodes of this role.") var role: RoleArgument?
        @OptionGroup var node: NodeOption
        @OptionGroup var output: OutputOption

        func run() async throws {
            let client = try node.client()
            var nodes = try await client.nodes()
            if let role { nodes = nodes.filter { $0["role"] as? String == role.rawValue } }
            // The stake amounts come from each owner's stake list.
            var stakesByOwner = [String: [Int: [String: Any]]]()
            var elements = [[String: Any]]()
            for record in nodes {
                guard let keyHex = record["node_key"] as? String, let nodeKey = try? PublicKey(hex: keyHex),
                      let ownerHex = record["owner"] as? String, let owner = try? PublicKey(hex: ownerHex) else {
                    throw CLIError("the node returned a registry entry without valid node_key/owner keys: \(record)")
                }
                let stakeID = record["stake_id"] as? Int
                // Validators that report the backing stake with each node answer from one snapshot; older ones do
                // not, and the stake is read from the owner's stake list instead.
                var stakeAmount = record["stake"], stakeStatus = record["stake_status"]
                if stakeAmount == nil {
                    if stakesByOwner[ownerHex] == nil {
                        var byID = [Int: [String: Any]]()
                        for stake in try await client.stakes(ownedBy: owner) { if let id = stake["id"] as? Int { byID[id] = stake } }
                        stakesByOwner[ownerHex] = byID
                    }
                    let stake = stakeID.flatMap { stakesByOwner[ownerHex]?[$0] }
                    (stakeAmount, stakeStatus) = (stake?["amount"], stake?["status"])
                }
                var element: [String: Any] = [
                    "node_key": keyHex, "node_id": nodeKey.nodeID.description, "role": record["role"] ?? NSNull(),
                    "owner": Account(owner: owner).description, "owner_key": ownerHex, "status": record["status"] ?? NSNull(),
                    "stake": stakeAmount ?? NSNull(), "stake_id": stakeID.map { $0 as Any } ?? NSNull(), "stake_status": stakeStatus ?? NSNull(),
                    "endpoints": record["endpoints"] ?? [], "registered_at": record["registered_at"] ?? NSNull(),
                    "prices": record["prices"] ?? [], "router_fee_bps": record["router_fee_bps"] ?? 0,
                ]
                if let eligible = record["eligible"] { element["eligible"] = eligible }
                elements.append(element)
            }
            if output.json { return printJSON(elements) }
            if elements.isEmpty { return say("no nodes registered" + (role.map { " with role \($0.rawValue)" } ?? "")) }
            printTable(["NODE ID", "ROLE", "STATUS", "STAKE (EMC)", "STAKE ID", "OWNER", "ENDPOINTS"], elements.map { e in
                let status = "\(e["status"]!)" + ((e["eligible"] as? Bool) == false && e["status"] as? String == "active" ? " (not eligible)" : "")
                return ["\(e["node_id"]!)", "\(e["role"]!)", status, e["stake"] as? String ?? "-", "\(e["stake_id"]!)",
                 "\(e["owner"]!)", (e["endpoints"] as? [String] ?? []).joined(separator: ",")]
            })
        }
    }

    struct Stakes: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The stakes an account's owner key holds (all its subaccounts).",
            discussion: """
            --json prints an array; each element has id, owner, role, amount (EMC), lock_days, bonded_at_ms, \
            unlocks_at_ms, status (bonded or unbonding) and node_key (the active node it backs, or null).
            """)
        @Argument(help: "ICRC-1 account text, a hex public key, or a key file.") var account: String
        @OptionGroup var node: NodeOption
        @OptionGroup var output: OutputOption

        func run() async throws {
            let client = try node.client()
            let account = try parseAccountArgument(account)
            let stakes = try await client.stakes(ownedBy: account.owner)
            var backing = [Int: String]()
            for record in try await client.nodes() where record["status"] as? String != "retired" {
                if let id = record["stake_id"] as? Int, let key = record["node_key"] as? String { backing[id] = key }
            }
            let elements = stakes.map { stake -> [String: Any] in
                var element = stake
                element["node_key"] = (stake["id"] as? Int).flatMap { backing[$0] }.map { $0 as Any } ?? NSNull()
                return element
            }
            if output.json { return printJSON(elements) }
            if elements.isEmpty { return say("no stakes held by \(account.owner.hex)") }
            printTable(["ID", "ROLE", "AMOUNT (EMC)", "STATUS", "LOCK DAYS", "UNLOCKS AT (ms)", "BACKS NODE"], elements.map { e in
                ["\(e["id"] ?? "")", "\(e["role"] ?? "")", "\(e["amount"] ?? "")", "\(e["status"] ?? "")", "\(e["lock_days"] ?? "")",
                 "\(e["unlocks_at_ms"] ?? "")", (e["node_key"] as? String).flatMap { try? PublicKey(hex: $0) }?.nodeID.description ?? "-"]
            })
        }
    }
}

extension Query {
    struct Params: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Every ledger parameter, by its genesis JSON key.",
            discussion: """
            --json prints the chain's `parameters` object exactly as in its genesis file (protocol_fee_bps, \
            challenge_window_blocks, audit_window_blocks, settlement_deadline_blocks, router_escrow_cap_multiple, \
            epoch_length_blocks, transfer_fee, staking, rewards, ...). The readable form adds what is derived from \
            them (the escrow withdrawal delay: one epoch plus the challenge window).
            """)
        @OptionGroup var node: NodeOption
        @OptionGroup var output: OutputOption

        func run() async throws {
            let answer = try await node.client().get("/params")
            guard let parameters = answer["parameters"] as? [String: Any] else {
                throw CLIError("the node did not return a `parameters` object; is it an EdgeMatrix validator of this version?")
            }
            if output.json { return printJSON(parameters) }
            func text(_ value: Any) -> String {
                if value is [Any] || value is [String: Any],
                   let data = try? JSONSerialization.data(withJSONObject: value, options: [.sortedKeys, .withoutEscapingSlashes]) {
                    return String(decoding: data, as: UTF8.self)
                }
                return "\(value)"
            }
            var rows = parameters.keys.sorted().map { [$0, text(parameters[$0]!)] }
            for (key, value) in ((answer["derived"] as? [String: Any]) ?? [:]).sorted(by: { $0.key < $1.key }) {
                rows.append(["\(key) (derived)", text(value)])
            }
            printTable(["PARAMETER", "VALUE"], rows)
        }
    }

    struct EscrowQuery: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "escrow",
            abstract: "An account's escrows, one per router.",
            discussion: """
            --json prints an array; each element has account, router (node key hex), router_id, balance (everything in \
            the escrow, pending included), pending (charged by settlements still in their challenge window), available \
            (balance − pending: what routers may still charge and what a withdrawal returns), their *_base_units and \
            withdrawable_at_height (the block at whose end a requested withdrawal returns, or null).
            """)
        @Argument(help: "ICRC-1 account text, a hex public key, or a key file.") var account: String
        @OptionGroup var node: NodeOption
        @OptionGroup var output: OutputOption

        func run() async throws {
            let account = try parseAccountArgument(account)
            let escrows = try await node.client().escrows(of: account)
            if output.json { return printJSON(escrows) }
            if escrows.isEmpty { return say("no escrows for \(account)") }
            printTable(["ROUTER ID", "BALANCE (EMC)", "PENDING", "AVAILABLE", "WITHDRAWABLE AT"], escrows.map { e in
                ["\(e["router_id"] ?? "")", "\(e["balance"] ?? "")", "\(e["pending"] ?? "")", "\(e["available"] ?? "")",
                 (e["withdrawable_at_height"] as? Int).map { "block \($0)" } ?? "-"]
            })
        }
    }
}

extension Query {
    struct SettlementsQuery: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "settlements",
            abstract: "Settlement batches on chain, oldest first (of one router with --router).",
            discussion: """
            --json prints an array; each element has router (node key hex), router_id, batch (the router's batch \
            number, from 0), first_sequence and last_sequence (the router sequence numbers it covers), epoch (of the \
            including block), receipt_count, pair_count, total (EMC) and total_base_units, status (pending: in its \
            challenge window; final: paid; challenged; reverted), tx (the settle transaction's id), included_height, \
            final_height (the block at whose end the money moves), router_fee_bps and protocol_fee_bps in force.
            """)
        @Option(help: "Only this router: its node key (64 hex digits) or its key file.") var router: String?
        @OptionGroup var node: NodeOption
        @OptionGroup var output: OutputOption

        func run() async throws {
            let routerKey = try router.map { try parsePublicKeyArgument($0, option: "--router") }
            let settlements = try await node.client().settlements(router: routerKey)
            if output.json { return printJSON(settlements) }
            if settlements.isEmpty { return say("no settlements" + (routerKey.map { " of router \($0.nodeID)" } ?? "")) }
            printTable(["ROUTER ID", "BATCH", "SEQUENCES", "EPOCH", "RECEIPTS", "PAIRS", "TOTAL (EMC)", "STATUS", "FINAL AT"], settlements.map { s in
                ["\(s["router_id"] ?? "")", "\(s["batch"] ?? "")", "\(s["first_sequence"] ?? "")–\(s["last_sequence"] ?? "")", "\(s["epoch"] ?? "")",
                 "\(s["receipt_count"] ?? "")", "\(s["pair_count"] ?? "")", "\(s["total"] ?? "")", "\(s["status"] ?? "")",
                 "block \(s["final_height"] ?? "")"]
            })
        }
    }

    struct DataRequestsQuery: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "data-requests",
            abstract: "Data requests (kind 15) and omission queries (kind 17) that a router must answer on chain, of pending settlements.",
            discussion: """
            A payer or compute node asks a router on chain for a pair's leaves (emc tx settlement request-data), or a \
            compute node files a receipt the router must prove is in its batch. Unanswered by due_height, the pair's \
            charge is reverted (data requests) or the node is paid the receipt's worth (omission queries) and the \
            router is slashed (docs/SETTLEMENT.md § 11, § 12). --json prints {data_requests: [...], omission_queries: \
            [...]} as GET /data-requests does: router, batch, payer, node, requester, status (open | answered | \
            withheld, or upheld for a query), requested_height, due_height, resolved_height, tx, and leaves_posted or \
            sequence, attempt and worth_base_units.
            """)
        @Option(help: "Only this router: its node key (64 hex digits) or its key file.") var router: String?
        @OptionGroup var node: NodeOption
        @OptionGroup var output: OutputOption

        func run() async throws {
            let routerKey = try router.map { try parsePublicKeyArgument($0, option: "--router") }
            let (requests, queries) = try await node.client().dataRequests(router: routerKey)
            if output.json { return printJSON(["data_requests": requests, "omission_queries": queries] as [String: Any]) }
            if requests.isEmpty && queries.isEmpty { return say("no data requests or omission queries on pending settlements") }
            printTable(["KIND", "ROUTER", "BATCH", "PAYER", "NODE", "WHAT", "STATUS", "DUE AT"],
                       requests.map { r in
                           ["data", String("\(r["router"] ?? "")".prefix(12)), "\(r["batch"] ?? "")", "\(r["payer"] ?? "")",
                            String("\(r["node"] ?? "")".prefix(12)), "\(r["leaves_posted"] ?? 0) leaves posted", "\(r["status"] ?? "")",
                            "block \(r["due_height"] ?? "")"]
                       } + queries.map { q in
                           ["omission", String("\(q["router"] ?? "")".prefix(12)), "\(q["batch"] ?? "")", "\(q["payer"] ?? "")",
                            String("\(q["node"] ?? "")".prefix(12)), "sequence \(q["sequence"] ?? "").\(q["attempt"] ?? "")",
                            "\(q["status"] ?? "")", "block \(q["due_height"] ?? "")"]
                       })
        }
    }

    struct NoticesQuery: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "notices",
            abstract: "Receipts compute nodes settle themselves because their router did not (node_settle), of one router or node.",
            discussion: """
            A compute node notices on chain the countersigned receipts its router has not settled; the payer's escrow \
            holds their worth from then on. If the router's batches cover them before the deadline \
            (settlement_deadline_blocks), the notices lapse; if not, the router is defaulted and they settle: the node \
            owner gets the worth minus the protocol fee, the router nothing. --json prints an array, in router, \
            sequence, attempt order: router, node, node_id, payer, sequence, attempt, amount (EMC), amount_base_units, \
            charged_base_units (what the escrow held for it), status (open | settled), noticed_height, due_height, \
            settled_height (0 while open) and tx.
            """)
        @Option(help: "Only this router: its node key (64 hex digits) or its key file.") var router: String?
        @Option(name: .customLong("node-key"), help: "Only this compute node: its node key (64 hex digits) or its key file.") var nodeKey: String?
        @OptionGroup var node: NodeOption
        @OptionGroup var output: OutputOption

        func run() async throws {
            let routerKey = try router.map { try parsePublicKeyArgument($0, option: "--router") }
            let computeKey = try nodeKey.map { try parsePublicKeyArgument($0, option: "--node-key") }
            let notices = try await node.client().notices(router: routerKey, node: computeKey)
            if output.json { return printJSON(notices) }
            if notices.isEmpty { return say("no receipts noticed by compute nodes") }
            printTable(["ROUTER", "NODE ID", "SEQUENCE", "ATTEMPT", "AMOUNT (EMC)", "STATUS", "DUE AT", "SETTLED AT"], notices.map { n in
                [String("\(n["router"] ?? "")".prefix(12)), "\(n["node_id"] ?? "")", "\(n["sequence"] ?? "")", "\(n["attempt"] ?? "")",
                 "\(n["amount"] ?? "")", "\(n["status"] ?? "")", "block \(n["due_height"] ?? "")",
                 (n["settled_height"] as? Int).flatMap { $0 > 0 ? "block \($0)" : nil } ?? "-"]
            })
        }
    }

    struct EarningsQuery: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "earnings",
            abstract: "Income per epoch of a node, or of every node an owner key owns.",
            discussion: """
            Income counts once a settlement is final (its challenge window passed). --json prints an array, one \
            element per node and epoch, oldest epoch first: epoch, node, node_id, node_income (the node's share of \
            what it served), router_income (router fees, for a router), held (node income still inside the audit \
            window, not yet paid out), total, their *_base_units, and receipts.
            """)
        @Argument(help: "A node key or an owner key: 64 hex digits, or a key file.") var key: String
        @OptionGroup var node: NodeOption
        @OptionGroup var output: OutputOption

        func run() async throws {
            let key = try parsePublicKeyArgument(key, option: "node or owner key")
            let earnings = try await node.client().earnings(of: key)
            if output.json { return printJSON(earnings) }
            if earnings.isEmpty { return say("no income yet for \(key.hex)") }
            printTable(["EPOCH", "NODE ID", "NODE INCOME (EMC)", "ROUTER INCOME", "HELD", "RECEIPTS"], earnings.map { e in
                ["\(e["epoch"] ?? "")", "\(e["node_id"] ?? "")", "\(e["node_income"] ?? "")", "\(e["router_income"] ?? "")",
                 "\(e["held"] ?? "")", "\(e["receipts"] ?? "")"]
            })
        }
    }
}

// MARK: - A compute node's kept receipts

struct Receipts: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The countersigned receipts a compute node kept (its evidence against its routers' batches).",
        discussion: """
        Reads DATA_DIR/outbox.sqlite of a compute node (also while it runs). Each receipt is the node's own, with the \
        router's countersignature, exactly the leaf bytes a settlement batch commits to (docs/PROTOCOL.md § 12.2). \
        --json prints an array, in router then sequence order: router, router_id, sequence, attempt, payer, app, \
        model, prompt_tokens, completion_tokens, items, cost_base_units, receipt_id and receipt (hex bytes).
        """)
    @Option(help: "The compute node's data directory.") var dataDir: String
    @Option(help: "Only this router: its node key (64 hex digits) or its key file.") var router: String?
    @Option(help: "Only sequence numbers above this.") var after: UInt64 = 0
    @Option(help: "At most this many.") var limit: Int = 10_000
    @OptionGroup var output: OutputOption

    func run() throws {
        let path = absolute(dataDir) + "/outbox.sqlite"
        guard FileManager.default.fileExists(atPath: path) else { throw CLIError("no receipt store at \(path); is --data-dir a compute node's?") }
        guard (1...1_000_000).contains(limit) else { throw CLIError("--limit must be from 1 to 1,000,000") }
        let routerID = try router.map { try parsePublicKeyArgument($0, option: "--router").nodeID }
        let receipts = try ReceiptOutboxStore(path: path).countersigned(router: routerID, afterSequence: after, limit: limit)
        let rows: [[String: Any]] = receipts.map { r in
            let b = r.body
            return ["router": b.router.hex, "router_id": b.routerID.description, "sequence": b.sequence, "attempt": b.attempt,
                    "payer": b.payer.description, "app": b.app, "model": b.model, "prompt_tokens": b.units.promptTokens,
                    "completion_tokens": b.units.completionTokens, "items": b.units.items,
                    "cost_base_units": b.cost.map { $0 as Any } ?? NSNull(), "receipt_id": r.id.hex,
                    "receipt": Hex.encode(r.settlementBytes ?? [])]
        }
        if output.json { return printJSON(rows) }
        if rows.isEmpty { return say("no countersigned receipts kept in \(path)") }
        printTable(["ROUTER ID", "SEQUENCE", "ATTEMPT", "MODEL", "PROMPT", "COMPLETION", "ITEMS", "COST (EMC)"], receipts.map { r in
            let b = r.body
            return [b.routerID.short, "\(b.sequence)", "\(b.attempt)", b.model, "\(b.units.promptTokens)", "\(b.units.completionTokens)",
                    "\(b.units.items)", b.cost.map { Amount(baseUnits: $0).description } ?? "overflow"]
        })
    }
}

// MARK: - Audit

struct Audit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check what a router settled against your account, batch by batch.",
        discussion: """
        For every settlement batch of the router on chain, fetches the batch and your leaves from the router's \
        data-availability API (GET /v1/settlements/...) and checks: the batch is the one on chain (same \
        commitment); each leaf is a receipt signed by its compute node and countersigned by the router, for your \
        account, charging exactly its units × its prices, and inside its entry's Merkle-sum tree. With --log, each \
        leaf must also be a request your client received: the log holds the x-emc-request-id of every answer, one per \
        line (a bare number, or a JSON object with "id"). A leaf that is not in your log is a request you never made: \
        evidence to publish. Prints a verdict per batch (--json: an array of {batch, status, leaves, charged, \
        charged_base_units, verdict: ok|fault, findings: [{code, sequence, message}]}). Exits 1 when any batch has a \
        finding.
        """)
    @Option(help: "Your account: its key file, 64 hex digits, or ICRC-1 account text.") var account: String
    @Option(help: "The router's HTTP address, e.g. http://127.0.0.1:8080 (its OpenAI base URL works too).") var router: String
    @Option(help: "Your client's log of x-emc-request-id values, one per line.") var log: String?
    @OptionGroup var node: NodeOption
    @OptionGroup var output: OutputOption

    func run() async throws {
        let account = try parseAccountArgument(account)
        let clientLog: Set<UInt64>?
        if let log {
            guard let text = try? String(contentsOfFile: absolute(log), encoding: .utf8) else { throw CLIError("--log \(log): cannot read the file") }
            clientLog = try PayerAudit.requestIDs(inLog: text)
        } else {
            clientLog = nil
        }
        let verdicts = try await PayerAudit(chain: try node.client(), routerURL: router, account: account).run(clientLog: clientLog)
        if output.json {
            printJSON(verdicts.map(\.json))
        } else if verdicts.isEmpty {
            say("the router has no settlement batches on chain")
        } else {
            printTable(["BATCH", "STATUS", "LEAVES", "CHARGED (EMC)", "VERDICT"], verdicts.map { v in
                ["\(v.batch)", v.status, "\(v.leaves)", Amount(baseUnits: v.charged).description, v.ok ? "ok" : "FAULT"]
            })
            for v in verdicts { for f in v.findings { say("batch \(v.batch): \(f.code): \(f.message)") } }
        }
        if verdicts.contains(where: { !$0.ok }) { throw ExitCode(1) }
    }
}

// MARK: - Benchmarks

struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Benchmarks.", subcommands: [ChainBenchCommand.self, SettleBenchCommand.self])

    struct SettleBenchCommand: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "settle",
            abstract: "Settlement batch over synthetic receipts: build time, memory, settle size, ledger apply, proof size, watchtower.",
            discussion: "Receipts are random bytes (no signatures), except one node's, which are signed for the watchtower audit; a release build gives the real figures.")
        @Option(help: "Synthetic receipts in the batch.") var receipts: Int = 1_000_000
        @Option(help: "(payer, node) pairs they spread over.") var pairs: Int = 1_000
        @Option(help: "Bytes per receipt.") var receiptBytes: Int = 300

        func run() throws {
            say(try SettleBench.run(receipts: receipts, pairs: pairs, receiptSize: receiptBytes, progress: say).description)
        }
    }

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
