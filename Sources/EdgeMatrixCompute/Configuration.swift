import EdgeMatrixCore
import EdgeMatrixNetwork
import Foundation

/// A compute node's config file (JSON).
///
/// ```json
/// {
///   "routers": [{ "address": "127.0.0.1:7070", "key": "<router public key, 64 hex digits>" }],
///   "max_concurrent": 8,
///   "apps": [
///     { "name": "llm", "kind": "openai", "base_url": "http://127.0.0.1:8081", "models": ["smollm2-135m-instruct"] },
///     { "name": "weather", "kind": "rest", "base_url": "http://127.0.0.1:9000" }
///   ]
/// }
/// ```
public struct ComputeConfiguration: Codable, Sendable, Equatable {
    public struct RouterEntry: Codable, Sendable, Equatable {
        /// `host:port` of the router's tunnel endpoint.
        public var address: String
        /// The router's public key: the node refuses any router that cannot prove it holds it.
        public var key: PublicKey

        public init(address: String, key: PublicKey) {
            self.address = address
            self.key = key
        }

        public var hostAndPort: (host: String, port: Int)? {
            guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]),
                  (1...65535).contains(port) else { return nil }
            return (String(address[..<colon]), port)
        }
    }

    public struct AppEntry: Codable, Sendable, Equatable {
        public var name: String
        public var kind: AppDescriptor.Kind
        public var baseURL: String
        /// Models served (openai apps); when empty, taken from the app's `/v1/models`.
        public var models: [String]?
        /// Path probed for health (rest apps); defaults to `/v1/models` for openai apps and `/` for rest apps.
        public var healthPath: String?

        public init(name: String, kind: AppDescriptor.Kind, baseURL: String, models: [String]? = nil, healthPath: String? = nil) {
            self.name = name
            self.kind = kind
            self.baseURL = baseURL
            self.models = models
            self.healthPath = healthPath
        }

        enum CodingKeys: String, CodingKey {
            case name, kind, models
            case baseURL = "base_url"
            case healthPath = "health_path"
        }
    }

    public var routers: [RouterEntry]
    public var maxConcurrent: UInt32
    public var apps: [AppEntry]
    /// Seconds between health probes of the local apps.
    public var probeIntervalSeconds: Int?

    public init(routers: [RouterEntry], maxConcurrent: UInt32, apps: [AppEntry], probeIntervalSeconds: Int? = nil) {
        self.routers = routers
        self.maxConcurrent = maxConcurrent
        self.apps = apps
        self.probeIntervalSeconds = probeIntervalSeconds
    }

    enum CodingKeys: String, CodingKey {
        case routers, apps
        case maxConcurrent = "max_concurrent"
        case probeIntervalSeconds = "probe_interval_seconds"
    }

    /// Rejects a config that cannot work, naming the field.
    public func validate() throws(ConfigurationError) {
        guard !routers.isEmpty else { throw .invalid(field: "routers", "list at least one router to dial") }
        for (i, router) in routers.enumerated() where router.hostAndPort == nil {
            throw .invalid(field: "routers[\(i)].address", "expected host:port, got '\(router.address)'")
        }
        guard (1...4096).contains(maxConcurrent) else { throw .invalid(field: "max_concurrent", "must be 1...4096") }
        guard !apps.isEmpty else { throw .invalid(field: "apps", "list at least one local app") }
        var names = Set<String>()
        for (i, app) in apps.enumerated() {
            guard !app.name.isEmpty, names.insert(app.name).inserted else {
                throw .invalid(field: "apps[\(i)].name", "app names must be non-empty and unique")
            }
            guard let url = URL(string: app.baseURL), url.scheme == "http" || url.scheme == "https", url.host != nil else {
                throw .invalid(field: "apps[\(i)].base_url", "expected an http(s) URL, got '\(app.baseURL)'")
            }
        }
    }

    public static func load(from path: String) throws -> ComputeConfiguration {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigurationError.unreadable(path: path)
        }
        let config: ComputeConfiguration
        do { config = try JSONDecoder().decode(ComputeConfiguration.self, from: data) } catch {
            throw ConfigurationError.malformed(path: path, reason: "\(error)")
        }
        try config.validate()
        return config
    }
}

public enum ConfigurationError: Error, CustomStringConvertible, Sendable, Equatable {
    case unreadable(path: String)
    case malformed(path: String, reason: String)
    case invalid(field: String, String)

    public var description: String {
        switch self {
        case .unreadable(let path): "cannot read config file \(path)"
        case .malformed(let path, let reason): "config file \(path) is not valid: \(reason)"
        case .invalid(let field, let why): "config field \(field): \(why)"
        }
    }
}
