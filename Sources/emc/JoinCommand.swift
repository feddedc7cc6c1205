import ArgumentParser
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNode
import Foundation

struct Join: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Join the network as a compute node beside your AI app, in one command.",
        discussion: """
        Creates the node key (DATA_DIR/node.key), bonds --stake EMC from the --key account as a compute stake locked \
        for --lock-days, registers the node on chain, probes the app's models (GET /v1/models), picks the routers \
        from the chain's registry, writes DATA_DIR/config.json and serves until Ctrl-C. Running it again reuses the \
        key, stake and registration. Example on the devnet: \
        emc join --role compute --app http://127.0.0.1:8090 --stake 1000 --lock-days 30 --key devnet-data/funded.key
        """)

    enum Role: String, ExpressibleByArgument, CaseIterable { case compute }

    @Option(help: "The role to join as (compute).") var role: Role = .compute
    @Option(help: "Base URL of your OpenAI-compatible app, e.g. http://127.0.0.1:8081.") var app: String
    @Option(help: "EMC to bond as the node's stake (at least the chain's compute minimum, 100 by default).") var stake: String
    @Option(help: "Days the stake stays locked (compute tiers: 7, 30, 90, 180; longer locks weigh more).") var lockDays: UInt32 = 30
    @Option(help: "Key file of the account that owns and pays for the node.") var key: String
    @Option(name: .long, help: "Where the node keeps its key and config.") var dataDir: String = "./emc-compute"
    @Option(help: "Requests served at once.") var maxConcurrent: UInt32 = 8
    @OptionGroup var chain: NodeOption

    func validate() throws {
        guard let url = URL(string: app), url.scheme == "http" || url.scheme == "https", url.host != nil else {
            throw ValidationError("--app must be an http(s) URL such as http://127.0.0.1:8081")
        }
        guard (1...4096).contains(maxConcurrent) else { throw ValidationError("--max-concurrent must be 1...4096") }
        _ = try parseAmountArgument(stake, option: "--stake")
    }

    func run() async throws {
        let logger = bootstrapLogging()
        let owner = try loadSigningKey(key, option: "--key")
        let join = ComputeJoin(appURL: app, stake: try parseAmountArgument(stake, option: "--stake"), lockDays: lockDays, owner: owner,
                               dataDirectory: absolute(dataDir), nodeURL: try chain.client().baseURL, maxConcurrent: maxConcurrent)
        let (nodeKey, configPath) = try await join.prepare { say($0) }
        try await NodeRunner.runCompute(configPath: configPath, key: nodeKey, dataDirectory: absolute(dataDir),
                                        chainURL: try chain.client().baseURL, logger: logger)
    }
}
