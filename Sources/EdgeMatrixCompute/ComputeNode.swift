import AsyncHTTPClient
import EdgeMatrixCore
import EdgeMatrixNetwork
import Foundation
import Logging
import Metrics
import ServiceLifecycle
import Synchronization

/// A compute node: fronts local apps, dials out to its routers, serves what they assign and signs a receipt
/// for every finished request.
public final class ComputeNode: Service, WorkServer {
    public static let version = "0.1.0"

    let configuration: ComputeConfiguration
    let key: SigningKey
    let apps: [String: any LocalApp]
    let appOrder: [String]
    let hardware: HardwareInfo
    let logger: Logger
    /// Receipts awaiting acknowledgement; durable when opened on the node's data dir (`ReceiptOutbox(path:)`).
    public let outbox: ReceiptOutbox
    /// A single-threaded model server busy generating can miss a probe, so an app is marked unhealthy only
    /// after several misses in a row, and a request it answers resets the count.
    struct AppHealth {
        var probe: AppProbe?
        var failedProbes = 0
    }

    private let health = Mutex<[String: AppHealth]>([:])
    static let unhealthyAfterFailedProbes = 3
    private let inFlightCount = Atomic<UInt32>(0)

    public init(configuration: ComputeConfiguration, key: SigningKey, apps: [any LocalApp],
                hardware: HardwareInfo = HardwareProbe.probe(), outbox: ReceiptOutbox = ReceiptOutbox(),
                logger: Logger = Logger(label: "emc.compute")) {
        self.configuration = configuration
        self.outbox = outbox
        self.key = key
        self.apps = Dictionary(uniqueKeysWithValues: apps.map { ($0.name, $0) })
        appOrder = apps.map(\.name)
        self.hardware = hardware
        self.logger = logger
    }

    /// Builds HTTP adapters for every app in the config.
    public convenience init(configuration: ComputeConfiguration, key: SigningKey, httpClient: HTTPClient,
                            outbox: ReceiptOutbox = ReceiptOutbox(), logger: Logger = Logger(label: "emc.compute")) {
        self.init(configuration: configuration, key: key,
                  apps: configuration.apps.map { HTTPLocalApp(entry: $0, client: httpClient) }, outbox: outbox, logger: logger)
    }

    public var nodeID: NodeID { key.nodeID }

    public func run() async throws {
        await probeApps()
        logger.info("compute node starting", metadata: [
            "node": "\(nodeID)", "apps": "\(appOrder)", "routers": "\(configuration.routers.map(\.address))",
            "cpus": "\(hardware.cpuCores)", "gpus": "\(hardware.gpus.map(\.name))",
        ])
        let interval = Duration.seconds(configuration.probeIntervalSeconds ?? 5)
        await withDiscardingTaskGroup { group in
            group.addTask { [self] in
                while !Task.isCancelled {
                    try? await Task.sleep(for: interval)
                    await probeApps()
                }
            }
            for router in configuration.routers {
                let tunnel = TunnelClient(router: router, nodeKey: key, maxConcurrent: Int(configuration.maxConcurrent),
                                          server: self, outbox: outbox, heartbeat: .seconds(2), logger: logger)
                group.addTask { await tunnel.run() }
            }
            // Stop dialing and serving when the service group shuts down.
            try? await gracefulShutdown()
            group.cancelAll()
        }
    }

    func probeApps() async {
        for name in appOrder {
            let result = await apps[name]!.probe()
            if Task.isCancelled { return }
            let (previous, current) = health.withLock { health -> (AppProbe?, AppProbe) in
                var entry = health[name, default: AppHealth()]
                let previous = entry.probe
                entry.failedProbes = result.healthy ? 0 : entry.failedProbes + 1
                if result.healthy || entry.failedProbes >= Self.unhealthyAfterFailedProbes || previous == nil {
                    entry.probe = result
                }
                health[name] = entry
                return (previous, entry.probe!)
            }
            if previous?.healthy != current.healthy {
                if current.healthy {
                    logger.info("local app healthy", metadata: ["app": "\(name)", "models": "\(current.models)"])
                } else {
                    logger.warning("local app unhealthy", metadata: ["app": "\(name)", "detail": "\(current.detail)"])
                }
            }
        }
    }

    public func descriptor() async -> NodeDescriptor {
        let current = health.withLock { $0 }
        let descriptors = appOrder.map { name in
            AppDescriptor(name: name, kind: apps[name]!.kind, models: current[name]?.probe?.models ?? [],
                          healthy: current[name]?.probe?.healthy ?? false)
        }
        return NodeDescriptor(apps: descriptors, maxConcurrent: configuration.maxConcurrent, hardware: hardware,
                              version: Self.version)
    }

    public func healthyApps() async -> [String] {
        let current = health.withLock { $0 }
        return appOrder.filter { current[$0]?.probe?.healthy == true }
    }

    public func inFlight() -> UInt32 { inFlightCount.load(ordering: .relaxed) }

    public func serve(_ work: WorkRequest, router: PublicKey, emit: @Sendable (NodeWorkMessage) async -> Void) async {
        guard let app = apps[work.app] else {
            await emit(.failed(code: "unknown_app", message: "this node has no app named '\(work.app)'"))
            return
        }
        inFlightCount.add(1, ordering: .relaxed)
        defer { inFlightCount.subtract(1, ordering: .relaxed) }
        let started = wallClockMillis()
        let requestHash = ReceiptBody.requestHash(method: work.method, path: work.path, contentType: work.contentType,
                                                  stream: work.stream, body: work.body)
        let answer: LocalAnswer
        do {
            answer = try await app.send(work)
        } catch {
            Counter(label: "emc_compute_requests_total", dimensions: [("app", work.app), ("outcome", "unreachable")]).increment()
            logger.warning("local app failed", metadata: ["app": "\(work.app)", "request": "\(work.requestID)", "error": "\(error)"])
            await emit(.failed(code: "app_unreachable", message: "\(error)"))
            return
        }
        health.withLock { $0[work.app]?.failedProbes = 0 }
        await emit(.head(status: answer.status, contentType: answer.contentType))
        var hasher = StreamingHasher()
        var relayedBytes: UInt64 = 0
        var collected = [UInt8]()
        let keepAnswer = app.metersAnswerBytes
        do {
            for try await buffer in answer.body {
                let bytes = Array(buffer: buffer)
                hasher.update(bytes)
                relayedBytes += UInt64(bytes.count)
                // Kept only to read the usage block; bounded so a huge answer cannot exhaust memory.
                if keepAnswer, collected.count < 8 << 20 { collected.append(contentsOf: bytes) }
                await emit(.chunk(bytes))
            }
        } catch {
            Counter(label: "emc_compute_requests_total", dimensions: [("app", work.app), ("outcome", "aborted")]).increment()
            if !Task.isCancelled {
                await emit(.failed(code: "app_stream_broken", message: "\(error)"))
            }
            return
        }
        let isSSE = answer.contentType.hasPrefix("text/event-stream")
        // The app reports usage; the node bills no more than the bytes it relayed can carry, nor than the request's own
        // bound that the router reserved (max_tokens, inputs); the router checks the same.
        let units = BilledUnits.billed(reported: app.meter(work, answer: collected, isSSE: isSSE),
                                       requestBytes: UInt64(work.body.count), responseBytes: relayedBytes,
                                       requestBound: RequestBound.units(path: work.path, body: work.body))
        let body = ReceiptBody(payer: work.payer, router: router, node: key.publicKey, sequence: work.sequence, attempt: work.attempt,
                               app: work.app, model: work.model, prices: work.prices, units: units, startedAtMillis: started,
                               endedAtMillis: wallClockMillis(), requestHash: requestHash, responseHash: hasher.finalize(),
                               status: answer.status)
        let receipt = Receipt(signing: body, with: key)
        Counter(label: "emc_compute_requests_total", dimensions: [("app", work.app), ("outcome", "ok")]).increment()
        await emit(.end(receiptBody: receipt.bodyBytes, nodeSignature: receipt.nodeSignature))
    }

    /// A clock set before 1970 reads as 0 rather than trapping.
}
