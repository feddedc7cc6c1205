import AsyncHTTPClient
import EdgeMatrixCore
import EdgeMatrixLedger
import Foundation
import NIOCore

/// A failed call to a validator's HTTP API, with the API's stable code (`unreachable`, `timeout` and
/// `invalid_response` come from the client itself).
public struct ChainClientError: Error, CustomStringConvertible, Sendable {
    public var status: Int
    public var code: String
    public var message: String
    public var description: String { status == 0 ? message : "\(code): \(message) (HTTP \(status))" }

    public init(status: Int, code: String, message: String) {
        self.status = status
        self.code = code
        self.message = message
    }
}

/// A small client of the chain's HTTP JSON API (the CLI and tests use it). Everything the node answers is
/// treated as untrusted: bodies are size-capped, and anything that is not the expected JSON is a typed error.
public struct ChainClient: Sendable {
    /// Largest answer read from a node.
    public static let maxResponseBytes = 64 << 20

    public let baseURL: String
    let http: HTTPClient

    /// One process-wide client that fails at once when a node refuses the connection (instead of retrying until
    /// the request's deadline), so that callers who poll the chain, such as a router settling while every
    /// validator is away, keep their own cadence.
    public static let defaultHTTP: HTTPClient = {
        var configuration = HTTPClient.Configuration()
        configuration.connectionPool.retryConnectionEstablishment = false
        configuration.timeout.connect = .seconds(5)
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }()

    public init(baseURL: String, http: HTTPClient = ChainClient.defaultHTTP) {
        var url = baseURL
        while url.hasSuffix("/") { url.removeLast() }
        self.baseURL = url
        self.http = http
    }

    public func get(_ path: String) async throws -> [String: Any] {
        try await call(HTTPClientRequest(url: baseURL + path))
    }

    public func post(_ path: String, body: [UInt8], contentType: String = "text/plain") async throws -> [String: Any] {
        var request = HTTPClientRequest(url: baseURL + path)
        request.method = .POST
        request.headers.add(name: "content-type", value: contentType)
        request.body = .bytes(ByteBuffer(bytes: body))
        return try await call(request)
    }

    private func call(_ request: HTTPClientRequest) async throws -> [String: Any] {
        let response: HTTPClientResponse
        do { response = try await http.execute(request, timeout: .seconds(15)) } catch {
            throw ChainClientError(status: 0, code: "unreachable",
                                   message: "cannot reach the node at \(baseURL) (\(error)); check --node / EMC_NODE_URL and that the validator runs")
        }
        let body: ByteBuffer
        do { body = try await response.body.collect(upTo: Self.maxResponseBytes) } catch {
            throw ChainClientError(status: 0, code: "invalid_response",
                                   message: "the node at \(baseURL) sent an answer that broke off or exceeded \(Self.maxResponseBytes >> 20) MiB (\(error))")
        }
        let status = Int(exactly: response.status.code) ?? 0
        let object = (try? JSONSerialization.jsonObject(with: Data(buffer: body))) as? [String: Any]
        guard (200..<300).contains(status) else {
            let error = object?["error"] as? [String: Any]
            throw ChainClientError(status: status, code: error?["code"] as? String ?? "http_error",
                                   message: error?["message"] as? String ?? String(String(buffer: body).prefix(500)))
        }
        guard let object else {
            throw ChainClientError(status: status, code: "invalid_response",
                                   message: "the node at \(baseURL) answered \(request.url.dropFirst(baseURL.count)) with something that is not a JSON object; is it an EdgeMatrix validator?")
        }
        return object
    }

    /// `GET /status`.
    public func status() async throws -> [String: Any] { try await get("/status") }

    /// The chain id the node reports (what every transaction must be signed for).
    public func chainID() async throws -> String {
        guard let id = try await status()["chain_id"] as? String, !id.isEmpty else {
            throw ChainClientError(status: 0, code: "invalid_response", message: "the node at \(baseURL) did not report a chain id")
        }
        return id
    }

    /// `GET /nodes`: every registered node (retired ones too), as the API returns them.
    public func nodes() async throws -> [[String: Any]] { try await field("nodes", of: "/nodes", as: "a `nodes` array") }

    /// `GET /stakes/{account}`: every stake whose owner key is `owner` (any subaccount).
    public func stakes(ownedBy owner: PublicKey) async throws -> [[String: Any]] {
        try await field("stakes", of: "/stakes/\(Self.pathComponent(Account(owner: owner).description))", as: "a `stakes` array")
    }

    /// `GET /params`: the `parameters` object, keyed exactly as in the genesis JSON.
    public func parameters() async throws -> [String: Any] { try await field("parameters", of: "/params", as: "a `parameters` object") }

    /// `GET /escrow/{account}`: every escrow of exactly this account (one per router).
    public func escrows(of account: Account) async throws -> [[String: Any]] {
        try await field("escrows", of: "/escrow/\(Self.pathComponent(account.description))", as: "an `escrows` array")
    }

    /// `GET /escrows?router=KEY`: every escrow held with a router.
    public func escrows(router: PublicKey) async throws -> [[String: Any]] {
        try await field("escrows", of: "/escrows?router=\(router.hex)", as: "an `escrows` array")
    }

    /// `GET /settlements[?router=KEY]`: included settlement batches, in router then batch order.
    public func settlements(router: PublicKey? = nil) async throws -> [[String: Any]] {
        try await field("settlements", of: router.map { "/settlements?router=\($0.hex)" } ?? "/settlements", as: "a `settlements` array")
    }

    /// `GET /settlements/cursor/KEY`: where the router's next batch must start.
    public func settlementCursor(router: PublicKey) async throws -> (nextBatch: UInt64, nextSequence: UInt64) {
        let answer = try await get("/settlements/cursor/\(router.hex)")
        guard let batch = (answer["next_batch"] as? NSNumber)?.uint64Value,
              let sequence = (answer["next_sequence"] as? NSNumber)?.uint64Value
        else { throw ChainClientError(status: 0, code: "invalid_response", message: "GET /settlements/cursor did not return next_batch and next_sequence") }
        return (batch, sequence)
    }

    /// `GET /notices[?router=KEY][&node=KEY]`: receipts compute nodes noticed or settled themselves (kind 14).
    public func notices(router: PublicKey? = nil, node: PublicKey? = nil) async throws -> [[String: Any]] {
        let query = [router.map { "router=\($0.hex)" }, node.map { "node=\($0.hex)" }].compactMap { $0 }.joined(separator: "&")
        return try await field("notices", of: query.isEmpty ? "/notices" : "/notices?" + query, as: "a `notices` array")
    }

    /// `GET /data-requests[?router=KEY]`: data requests (kind 15) and omission queries (kind 17) of settlements not yet final.
    public func dataRequests(router: PublicKey? = nil) async throws -> (dataRequests: [[String: Any]], omissionQueries: [[String: Any]]) {
        let path = router.map { "/data-requests?router=\($0.hex)" } ?? "/data-requests"
        return (try await field("data_requests", of: path, as: "a `data_requests` array"),
                try await field("omission_queries", of: path, as: "an `omission_queries` array"))
    }

    /// `GET /settlements/cursor/KEY`'s `defaulted_at_height`: the height at which the router missed a deadline, or nil.
    public func routerDefaultHeight(router: PublicKey) async throws -> UInt64? {
        (try await get("/settlements/cursor/\(router.hex)")["defaulted_at_height"] as? NSNumber)?.uint64Value
    }

    /// `GET /earnings/KEY`: income per epoch of a node, or of every node an owner key owns.
    public func earnings(of key: PublicKey) async throws -> [[String: Any]] {
        try await field("earnings", of: "/earnings/\(key.hex)", as: "an `earnings` array")
    }

    /// One field of a `GET` answer, which must have type `T` (`what` names it in the error).
    private func field<T>(_ name: String, of path: String, as what: String) async throws -> T {
        guard let value = try await get(path)[name] as? T else {
            let route = path.split(separator: "/").first.map { "/" + $0.split(separator: "?")[0] } ?? path
            throw ChainClientError(status: 0, code: "invalid_response", message: "GET \(route) did not return \(what)")
        }
        return value
    }

    /// Percent-encodes one path segment.
    public static func pathComponent(_ text: String) -> String {
        var allowed = CharacterSet.alphanumerics
        allowed.insert(charactersIn: "-._~")
        return text.addingPercentEncoding(withAllowedCharacters: allowed) ?? text
    }

    /// Submits a signed transaction; returns its hash (computed here: a node that reports another one is refused).
    public func submit(_ tx: Transaction) async throws -> String {
        let result = try await post("/txs", body: Array(Hex.encode(tx.encoded).utf8))
        let hash = tx.id.hex
        if let reported = result["hash"] as? String, reported != hash {
            throw ChainClientError(status: 0, code: "invalid_response",
                                   message: "the node reported hash \(reported.prefix(80)) for transaction \(hash); is it an EdgeMatrix validator of this version?")
        }
        return hash
    }

    /// Polls until the transaction is committed or failed; returns the tx JSON. Returns only once the node's
    /// readable state includes the transaction's block too (a validator indexes a block's transactions a moment
    /// before it publishes the block's state), so a query right after sees the transaction's effects.
    public func waitForCommit(hash: String, timeout: Duration = .seconds(60)) async throws -> [String: Any] {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let result = try? await get("/txs/\(hash)"), let status = result["status"] as? String, status != "pending" {
                let height = result["height"] as? Int ?? 0
                while ContinuousClock.now < deadline, (try? await self.status()["height"] as? Int) ?? 0 < height {
                    try await Task.sleep(for: .milliseconds(50))
                }
                return result
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw ChainClientError(status: 0, code: "timeout", message: "transaction \(hash) was not committed within \(timeout); query it later with `emc query tx \(hash)`")
    }
}

/// Creates (or reuses) a devnet: genesis.json, one key per validator under validator-N/node.key, and a funded account key.
public enum DevnetGenesis {
    public struct Layout: Sendable {
        public var directory: String
        public var genesisPath: String { directory + "/genesis.json" }
        public var fundedKeyPath: String { directory + "/funded.key" }
        public func validatorDirectory(_ index: Int) -> String { directory + "/validator-\(index)" }
        public func validatorKeyPath(_ index: Int) -> String { validatorDirectory(index) + "/node.key" }
        public init(directory: String) { self.directory = directory }
    }

    /// Epochs of a devnet: 20 blocks (about 20 s) instead of mainnet's 900, so validator-set changes show quickly.
    public static let epochLengthBlocks: UInt64 = 20

    /// Writes a new genesis for `endpoints.count` validators (endpoint i is validator i's peer address).
    @discardableResult
    /// `configure` may change any parameter after the devnet defaults are set; the result is validated as every
    /// genesis is (the error names the field, e.g. `parameters.protocol_fee_bps`) before anything is written.
    public static func create(directory: String, chainID: String, endpoints: [String], overwrite: Bool = false,
                              epochLengthBlocks: UInt64 = DevnetGenesis.epochLengthBlocks,
                              configure: (inout LedgerParameters) -> Void = { _ in }) throws -> Genesis {
        let layout = Layout(directory: directory)
        if !overwrite, FileManager.default.fileExists(atPath: layout.genesisPath) {
            throw ChainError.genesis("\(layout.genesisPath) already exists; pass --force to replace it")
        }
        // Devnet timing: short epochs and windows (challenge and audit half an epoch), so settlements finish in seconds.
        var parameters = LedgerParameters.devnet(epochLengthBlocks: epochLengthBlocks)
        configure(&parameters)
        // Check the parameters before any key is written (the full genesis is validated again below).
        let probe = Genesis.devnet(chainID: chainID, genesisTimeMillis: 0,
                                   validators: [.init(nodeKey: SigningKey().publicKey, owner: SigningKey().publicKey)], parameters: parameters)
        do { try probe.validate() } catch { throw ChainError.genesis("\(error)") }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var validators = [Genesis.DevnetValidator]()
        for (i, endpoint) in endpoints.enumerated() {
            let nodeKey = SigningKey()
            let owner = SigningKey()
            try KeyFile.write(nodeKey, to: layout.validatorKeyPath(i + 1), overwrite: true)
            try KeyFile.write(owner, to: layout.validatorDirectory(i + 1) + "/owner.key", overwrite: true)
            validators.append(.init(nodeKey: nodeKey.publicKey, owner: owner.publicKey, endpoints: [endpoint]))
        }
        let funded = SigningKey()
        try KeyFile.write(funded, to: layout.fundedKeyPath, overwrite: true)
        let genesis = Genesis.devnet(chainID: chainID, genesisTimeMillis: wallClockMillis(), validators: validators,
                                     fundedAccounts: [Account(owner: funded.publicKey)], parameters: parameters)
        do { try genesis.validate() } catch { throw ChainError.genesis("\(error)") }
        try genesis.encodedJSON().write(to: URL(fileURLWithPath: layout.genesisPath), options: .atomic)
        return genesis
    }

    /// The genesis in `directory`, created on first use.
    public static func loadOrCreate(directory: String, chainID: String, endpoints: [String]) throws -> Genesis {
        let layout = Layout(directory: directory)
        if FileManager.default.fileExists(atPath: layout.genesisPath) {
            return try ValidatorConfiguration.loadGenesis(path: layout.genesisPath)
        }
        return try create(directory: directory, chainID: chainID, endpoints: endpoints)
    }
}
