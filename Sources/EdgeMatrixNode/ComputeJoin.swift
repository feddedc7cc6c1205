import AsyncHTTPClient
import EdgeMatrixChain
import EdgeMatrixCompute
import EdgeMatrixCore
import EdgeMatrixLedger
import Foundation
import Logging
import NIOCore

/// "Deploy a node beside your AI app" in one step: create the node key, bond the stake, register the node, probe the
/// app for its models, pick routers from the chain's registry, write the config, and serve.
public struct ComputeJoin: Sendable {
    public var appURL: String
    public var stake: Amount
    public var lockDays: UInt32
    public var owner: SigningKey
    public var dataDirectory: String
    public var nodeURL: String
    public var maxConcurrent: UInt32

    public init(appURL: String, stake: Amount, lockDays: UInt32, owner: SigningKey, dataDirectory: String, nodeURL: String,
                maxConcurrent: UInt32 = 8) {
        self.appURL = appURL.hasSuffix("/") ? String(appURL.dropLast()) : appURL
        self.stake = stake
        self.lockDays = lockDays
        self.owner = owner
        self.dataDirectory = dataDirectory
        self.nodeURL = nodeURL
        self.maxConcurrent = maxConcurrent
    }

    public enum Failure: Error, CustomStringConvertible {
        case appUnreachable(String, String)
        case noModels(String)
        case noRouters

        public var description: String {
            switch self {
            case .appUnreachable(let url, let why):
                "the app at \(url) does not answer GET /v1/models (\(why)); start your OpenAI-compatible server first, or check --app"
            case .noModels(let url): "the app at \(url) lists no models in GET /v1/models; load a model into it first"
            case .noRouters: "the chain's registry lists no eligible router with an endpoint yet; try again once a router has registered"
            }
        }
    }

    /// The ids in an OpenAI-compatible `GET /v1/models` answer.
    public static func probeModels(appURL: String) async throws -> [String] {
        var request = HTTPClientRequest(url: appURL + "/v1/models")
        request.method = .GET
        let body: ByteBuffer
        do {
            let response = try await HTTPClient.shared.execute(request, timeout: .seconds(10))
            guard response.status == .ok else { throw Failure.appUnreachable(appURL, "HTTP \(response.status.code)") }
            body = try await response.body.collect(upTo: 4 << 20)
        } catch let error as Failure {
            throw error
        } catch {
            throw Failure.appUnreachable(appURL, "\(error)")
        }
        guard let object = try? JSONSerialization.jsonObject(with: Data(buffer: body)) as? [String: Any],
              let data = object["data"] as? [[String: Any]] else { throw Failure.appUnreachable(appURL, "the answer is not a model list") }
        let models = data.compactMap { $0["id"] as? String }.filter { !$0.isEmpty && $0.utf8.count <= 256 }
        guard !models.isEmpty else { throw Failure.noModels(appURL) }
        return Array(models.prefix(64))
    }

    /// Eligible routers in a `/nodes` answer, at their first HOST:PORT endpoint, with their pinned keys.
    public static func routers(in nodes: [[String: Any]]) -> [ComputeConfiguration.RouterEntry] {
        nodes.compactMap { node in
            guard node["role"] as? String == "router", node["status"] as? String == "active", node["eligible"] as? Bool == true,
                  let hex = node["node_key"] as? String, let key = try? PublicKey(hex: hex),
                  let endpoint = (node["endpoints"] as? [String])?.first(where: {
                      ComputeConfiguration.RouterEntry(address: $0, key: key).hostAndPort != nil
                  }) else { return nil }
            return ComputeConfiguration.RouterEntry(address: endpoint, key: key)
        }
    }

    /// Everything up to serving; returns the node key and the config path it wrote.
    public func prepare(say: @Sendable (String) -> Void) async throws -> (key: SigningKey, configPath: String) {
        // The app first: a wrong --app must not leave a key, a stake or a registration behind.
        let models = try await Self.probeModels(appURL: appURL)
        try FileManager.default.createDirectory(atPath: dataDirectory, withIntermediateDirectories: true)
        let keyPath = dataDirectory + "/node.key"
        let key = try KeyFile.loadOrCreate(at: keyPath)
        say("1/5 node key \(key.nodeID) in \(keyPath)")
        say("2/5 app \(appURL) serves \(models.joined(separator: ", "))")
        let client = ChainClient(baseURL: nodeURL)
        say("3/5 bonding and registering on chain \(nodeURL)")
        try await NodeEnrollment(client: client, owner: owner).enroll(node: key, role: .compute, stake: stake, lockDays: lockDays,
                                                                      endpoints: []) { say("    " + $0) }
        let routers = Self.routers(in: try await client.nodes())
        guard !routers.isEmpty else { throw Failure.noRouters }
        say("4/5 routers from the registry: \(routers.map { "\($0.address) (\($0.key.nodeID.short))" }.joined(separator: ", "))")
        let configuration = ComputeConfiguration(routers: routers, maxConcurrent: maxConcurrent,
                                                 apps: [.init(name: "llm", kind: .openai, baseURL: appURL, models: models)])
        try configuration.validate()
        let configPath = dataDirectory + "/config.json"
        try writeJSON(configuration, to: configPath)
        say("5/5 serving (config in \(configPath)); Ctrl-C stops the node")
        return (key, configPath)
    }
}
