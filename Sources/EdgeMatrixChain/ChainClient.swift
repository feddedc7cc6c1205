import AsyncHTTPClient
import EdgeMatrixCore
import EdgeMatrixLedger
import Foundation
import NIOCore

/// A failed call to a validator's HTTP API, with the API's stable code.
public struct ChainClientError: Error, CustomStringConvertible, Sendable {
    public var status: Int
    public var code: String
    public var message: String
    public var description: String { status == 0 ? message : "\(code): \(message) (HTTP \(status))" }
}

/// A small client of the chain's HTTP JSON API (the CLI and tests use it).
public struct ChainClient: Sendable {
    public let baseURL: String
    let http: HTTPClient

    public init(baseURL: String, http: HTTPClient = .shared) {
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
            throw ChainClientError(status: 0, code: "unreachable", message: "cannot reach the node at \(baseURL): \(error)")
        }
        let body = try await response.body.collect(upTo: 64 << 20)
        let object = (try? JSONSerialization.jsonObject(with: Data(buffer: body))) as? [String: Any] ?? [:]
        guard (200..<300).contains(Int(response.status.code)) else {
            let error = object["error"] as? [String: Any]
            throw ChainClientError(status: Int(response.status.code), code: error?["code"] as? String ?? "http_error",
                                   message: error?["message"] as? String ?? String(buffer: body))
        }
        return object
    }

    /// Submits a signed transaction; returns its hash.
    public func submit(_ tx: Transaction) async throws -> String {
        let result = try await post("/txs", body: Array(Hex.encode(tx.encoded).utf8))
        return result["hash"] as? String ?? tx.id.hex
    }

    /// Polls until the transaction is committed or failed; returns the tx JSON.
    public func waitForCommit(hash: String, timeout: Duration = .seconds(60)) async throws -> [String: Any] {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let result = try? await get("/txs/\(hash)"), let status = result["status"] as? String, status != "pending" {
                return result
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw ChainClientError(status: 0, code: "timeout", message: "transaction \(hash) was not committed within \(timeout)")
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

    /// Writes a new genesis for `endpoints.count` validators (endpoint i is validator i's peer address).
    @discardableResult
    public static func create(directory: String, chainID: String, endpoints: [String], overwrite: Bool = false) throws -> Genesis {
        let layout = Layout(directory: directory)
        if !overwrite, FileManager.default.fileExists(atPath: layout.genesisPath) {
            throw ChainError.genesis("\(layout.genesisPath) already exists; pass --force to replace it")
        }
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
                                     fundedAccounts: [Account(owner: funded.publicKey)])
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
