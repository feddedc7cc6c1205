import AsyncHTTPClient
import EdgeMatrixChain
import EdgeMatrixCore
import EdgeMatrixRouter
import Foundation
import Logging
import Metrics
import NIOCore
import ServiceLifecycle

/// Keeps a router's admitted compute nodes equal to the chain's registry: it reads `GET /nodes` from a validator at
/// start, then again on every block the validator announces on `/events/blocks`, so a node that is retired or
/// slashed below its role's minimum is dropped within one block. While the chain is unreachable the last set holds.
public struct RegistryFollower: Service {
    let nodeURL: String
    let admitted: RegisteredNodes
    let prices: RegistryPriceBook?
    let escrows: ChainEscrows?
    let logger: Logger
    private let refreshes = Counter(label: "emc_router_registry_refreshes_total")
    private let failures = Counter(label: "emc_router_registry_failures_total")

    public init(nodeURL: String, admitted: RegisteredNodes, prices: RegistryPriceBook? = nil, escrows: ChainEscrows? = nil, logger: Logger) {
        self.escrows = escrows
        self.nodeURL = nodeURL.hasSuffix("/") ? String(nodeURL.dropLast()) : nodeURL
        self.admitted = admitted
        self.prices = prices
        self.logger = logger
    }

    /// The eligible compute nodes in a `/nodes` answer.
    static func eligibleComputeNodes(_ nodes: [[String: Any]]) -> Set<PublicKey> {
        Set(nodes.compactMap { node in
            guard node["role"] as? String == "compute", node["status"] as? String == "active", node["eligible"] as? Bool == true,
                  let hex = node["node_key"] as? String else { return nil }
            return try? PublicKey(hex: hex)
        })
    }

    func refresh(_ client: ChainClient) async throws {
        let answer = try await client.get("/nodes")
        guard let nodes = answer["nodes"] as? [[String: Any]], let height = (answer["height"] as? NSNumber)?.uint64Value else {
            throw RegistryFollowerError.malformedAnswer
        }
        prices?.update(RegistryPriceBook.priceLists(nodes))
        if let escrows {
            escrows.update(try await client.escrows(router: escrows.router))
        }
        admitted.update(Self.eligibleComputeNodes(nodes), height: height)
        refreshes.increment()
    }

    public func run() async throws {
        let client = ChainClient(baseURL: nodeURL)
        await cancelWhenGracefulShutdown {
            var failuresInARow = 0
            while !Task.isCancelled {
                do {
                    try await refresh(client)
                    failuresInARow = 0
                    // Then once per block, as the validator announces it.
                    var request = HTTPClientRequest(url: nodeURL + "/events/blocks")
                    request.method = .GET
                    let response = try await HTTPClient.shared.execute(request, timeout: .hours(24))
                    guard response.status == .ok else { throw RegistryFollowerError.status(Int(response.status.code)) }
                    var pending = ""
                    for try await chunk in response.body {
                        pending += String(buffer: chunk)
                        guard pending.utf8.count < 1 << 20 else { throw RegistryFollowerError.oversizedEvent }
                        while let end = pending.range(of: "\n\n") {
                            pending.removeSubrange(pending.startIndex..<end.upperBound)
                            try await refresh(client)
                        }
                    }
                } catch {
                    if Task.isCancelled { break }
                    failures.increment()
                    failuresInARow += 1
                    if failuresInARow == 1 || failuresInARow % 30 == 0 {
                        logger.warning("cannot follow the node registry; keeping the last admitted set",
                                       metadata: ["chain": "\(nodeURL)", "error": "\(error)", "height": "\(admitted.height.map(String.init) ?? "none")"])
                    }
                    try? await Task.sleep(for: .milliseconds(min(200 * failuresInARow, 2_000)))
                }
            }
        }
        admitted.finish()
    }
}

enum RegistryFollowerError: Error {
    case status(Int)
    case oversizedEvent
    case malformedAnswer
}
