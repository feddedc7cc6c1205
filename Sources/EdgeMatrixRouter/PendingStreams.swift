import Metrics
import Synchronization

/// Tunnel streams that have not proved who they are yet (a control stream before its registration is accepted, a
/// Work stream before its session token), counted per remote IP address. Anyone who completes a TLS handshake can open
/// them, and each holds a task until its deadline: one address may hold at most `maxPerAddress`, and at most
/// `maxAddresses` addresses are tracked at once, so a flood of them costs the router a bounded amount.
final class PendingStreams: Sendable {
    let maxPerAddress: Int
    let maxAddresses: Int
    private let counts = Mutex<[String: Int]>([:])

    init(maxPerAddress: Int, maxAddresses: Int = 4096) {
        self.maxPerAddress = maxPerAddress
        self.maxAddresses = maxAddresses
    }

    /// A held place, given back once by `release` (or when the stream ends).
    final class Ticket: Sendable {
        let address: String
        private let released = Atomic<Bool>(false)
        private let owner: PendingStreams

        fileprivate init(address: String, owner: PendingStreams) {
            self.address = address
            self.owner = owner
        }

        func release() {
            guard !released.exchange(true, ordering: .acquiringAndReleasing) else { return }
            owner.counts.withLock { counts in
                let left = (counts[address] ?? 1) - 1
                counts[address] = left > 0 ? left : nil
            }
        }

        deinit { release() }
    }

    /// A place for one more unauthenticated stream from `peer`, or nil when its address (or the table) is full.
    func admit(peer: String) -> Ticket? {
        let address = Self.address(ofPeer: peer)
        let admitted = counts.withLock { counts -> Bool in
            let current = counts[address] ?? 0
            guard current < maxPerAddress, current > 0 || counts.count < maxAddresses else { return false }
            counts[address] = current + 1
            return true
        }
        guard admitted else {
            Counter(label: "emc_router_tunnel_streams_refused_total").increment()
            return nil
        }
        return Ticket(address: address, owner: self)
    }

    func count(address: String) -> Int { counts.withLock { $0[address] ?? 0 } }

    /// The IP address in a gRPC peer description (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`): the port is left out,
    /// so one host's many connections count together.
    static func address(ofPeer peer: String) -> String {
        guard let colon = peer.lastIndex(of: ":"), peer.hasPrefix("ipv4:") || peer.hasPrefix("ipv6:") else { return peer }
        return String(peer[..<colon])
    }
}
