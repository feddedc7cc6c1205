import EdgeMatrixCore
import Metrics
import Synchronization

/// Limits on peers that a validator serves read-only: TLS-bound keys that the chain does not admit as validators
/// (full nodes, explorers, validators that are still syncing before registration). They may call `GetBlocks` and
/// hold a Gossip stream for status frames; nothing they send reaches the consensus loop or the mempool.
public struct ReadOnlyPeerLimits: Sendable, Equatable {
    /// Distinct read-only keys served at once. A key idle (no open stream, no call) for `idleEviction` makes room.
    public var maxPeers: Int
    /// `GetBlocks` calls per second per key (token bucket), and the bucket's size.
    public var callsPerSecond: Int
    public var burst: Int
    /// Blocks per `GetBlocks` answer to a read-only peer (validators get up to 200).
    public var maxBlocksPerCall: Int
    /// `GetBlocks` calls of all read-only peers in flight at once: reads from the block store for outsiders never
    /// take more than this many threads from validator traffic.
    public var maxConcurrentCalls: Int
    /// Gossip streams per read-only key (a syncing node needs one per validator it dials from one key: one here).
    public var maxStreamsPerPeer: Int
    /// How long a key must have been idle before another key may take its place (its bucket is full again by then,
    /// so dropping it gives a returning key nothing).
    public var idleEviction: Duration

    public init(maxPeers: Int = 64, callsPerSecond: Int = 20, burst: Int = 20, maxBlocksPerCall: Int = 100,
                maxConcurrentCalls: Int = 8, maxStreamsPerPeer: Int = 2, idleEviction: Duration = .seconds(2)) {
        self.maxPeers = max(maxPeers, 0)
        self.callsPerSecond = min(max(callsPerSecond, 1), 1_000_000)
        self.burst = min(max(burst, 1), 1_000_000)
        self.maxBlocksPerCall = min(max(maxBlocksPerCall, 1), 200)
        self.maxConcurrentCalls = max(maxConcurrentCalls, 1)
        self.maxStreamsPerPeer = max(maxStreamsPerPeer, 1)
        self.idleEviction = idleEviction
    }
}

/// Why a read-only peer was refused; `code` is the stable string sent in the gRPC status message and the
/// `rejected` frame, and the `reason` label of `emc_chain_read_only_refused_total`.
public enum ReadOnlyRefusal: Error, Sendable, Equatable, CaseIterable, CustomStringConvertible {
    /// More distinct read-only keys than `maxPeers` are active.
    case tooManyPeers
    /// The key's `GetBlocks` bucket is empty.
    case rateLimited
    /// `maxConcurrentCalls` read-only calls are already in flight.
    case busy
    /// The key already holds `maxStreamsPerPeer` Gossip streams.
    case tooManyStreams
    /// A read-only peer sent a consensus frame (proposal or vote).
    case consensusFrame
    /// A read-only peer sent a transaction frame.
    case transactionFrame

    public var code: String {
        switch self {
        case .tooManyPeers: "too_many_read_only_peers"
        case .rateLimited: "rate_limited"
        case .busy: "read_only_busy"
        case .tooManyStreams: "too_many_streams"
        case .consensusFrame, .transactionFrame: "read_only_peer"
        }
    }

    var reason: String {
        switch self {
        case .tooManyPeers: "too_many_peers"
        case .rateLimited: "rate_limited"
        case .busy: "busy"
        case .tooManyStreams: "too_many_streams"
        case .consensusFrame: "consensus_frame"
        case .transactionFrame: "tx_frame"
        }
    }

    public var message: String {
        switch self {
        case .tooManyPeers: "this validator serves no more read-only peers now; retry later"
        case .rateLimited: "too many GetBlocks calls from this read-only key; retry after a short wait"
        case .busy: "too many read-only GetBlocks calls in flight; retry later"
        case .tooManyStreams: "this read-only key already holds its Gossip streams"
        case .consensusFrame: "a key outside the validator set may not send consensus frames"
        case .transactionFrame: "a key outside the validator set may not gossip transactions; use POST /txs"
        }
    }

    /// `code: message`, as the gRPC status message carries it.
    public var description: String { "\(code): \(message)" }
}

/// The table of read-only peers: admission (bounded by `maxPeers`), a `GetBlocks` token bucket per key, a bound on
/// calls in flight and streams per key, and counts of every refusal (also exported as
/// `emc_chain_read_only_refused_total{reason}`). Every map here is bounded by `maxPeers`.
public final class ReadOnlyPeers: Sendable {
    public let limits: ReadOnlyPeerLimits

    private struct Entry {
        /// Tokens in thousandths of a call.
        var milliTokens: Int
        var refilled: ContinuousClock.Instant
        var lastActive: ContinuousClock.Instant
        var streams = 0
        var calls = 0
    }

    private struct State {
        var entries: [NodeID: Entry] = [:]
        var inFlight = 0
        var refusals: [ReadOnlyRefusal: Int] = [:]
    }

    private let state = Mutex(State())

    public init(limits: ReadOnlyPeerLimits = ReadOnlyPeerLimits()) {
        self.limits = limits
    }

    /// Read-only keys in the table now.
    public var count: Int { state.withLock { $0.entries.count } }

    /// How many times `refusal` was answered since start.
    public func refusals(_ refusal: ReadOnlyRefusal) -> Int { state.withLock { $0.refusals[refusal] ?? 0 } }

    /// Whether `key` could be admitted now (checked in the TLS handshake, without taking a place).
    public func canAdmit(_ key: NodeID, now: ContinuousClock.Instant = .now) -> Bool {
        state.withLock { s in
            s.entries[key] != nil || s.entries.count < limits.maxPeers || s.entries.contains { isIdle($0.value, now: now) }
        }
    }

    /// Starts a `GetBlocks` call: admits the key if there is room, takes a token and a slot. Balanced by `endCall`.
    public func beginCall(_ key: NodeID, now: ContinuousClock.Instant = .now) throws(ReadOnlyRefusal) {
        let refusal: ReadOnlyRefusal? = state.withLock { s in
            guard var entry = admit(key, in: &s, now: now) else { return .tooManyPeers }
            refill(&entry, now: now)
            entry.lastActive = now
            defer { s.entries[key] = entry }
            guard entry.milliTokens >= 1000 else { return .rateLimited }
            guard s.inFlight < limits.maxConcurrentCalls else { return .busy }
            entry.milliTokens -= 1000
            entry.calls += 1
            s.inFlight += 1
            return nil
        }
        if let refusal { record(refusal); throw refusal }
    }

    public func endCall(_ key: NodeID, now: ContinuousClock.Instant = .now) {
        state.withLock { s in
            s.inFlight = max(s.inFlight - 1, 0)
            guard var entry = s.entries[key] else { return }
            entry.calls = max(entry.calls - 1, 0)
            entry.lastActive = now
            s.entries[key] = entry
        }
    }

    /// Opens a Gossip stream for a read-only key. Balanced by `closeStream`.
    public func openStream(_ key: NodeID, now: ContinuousClock.Instant = .now) throws(ReadOnlyRefusal) {
        let refusal: ReadOnlyRefusal? = state.withLock { s in
            guard var entry = admit(key, in: &s, now: now) else { return .tooManyPeers }
            entry.lastActive = now
            defer { s.entries[key] = entry }
            guard entry.streams < limits.maxStreamsPerPeer else { return .tooManyStreams }
            entry.streams += 1
            return nil
        }
        if let refusal { record(refusal); throw refusal }
    }

    public func closeStream(_ key: NodeID, now: ContinuousClock.Instant = .now) {
        state.withLock { s in
            guard var entry = s.entries[key] else { return }
            entry.streams = max(entry.streams - 1, 0)
            entry.lastActive = now
            s.entries[key] = entry
        }
    }

    /// Counts a refusal decided elsewhere (a frame a read-only peer may not send).
    public func record(_ refusal: ReadOnlyRefusal) {
        state.withLock { $0.refusals[refusal, default: 0] += 1 }
        Counter(label: "emc_chain_read_only_refused_total", dimensions: [("reason", refusal.reason)]).increment()
    }

    // MARK: Inside the lock

    private func isIdle(_ entry: Entry, now: ContinuousClock.Instant) -> Bool {
        entry.streams == 0 && entry.calls == 0 && now - entry.lastActive >= limits.idleEviction
    }

    /// The key's entry, a new full one if there is room (after dropping idle keys), or nil when the table is full.
    private func admit(_ key: NodeID, in s: inout State, now: ContinuousClock.Instant) -> Entry? {
        if let entry = s.entries[key] { return entry }
        if s.entries.count >= limits.maxPeers {
            for (id, entry) in s.entries where isIdle(entry, now: now) { s.entries[id] = nil }
        }
        guard s.entries.count < limits.maxPeers else { return nil }
        return Entry(milliTokens: limits.burst * 1000, refilled: now, lastActive: now)
    }

    private func refill(_ entry: inout Entry, now: ContinuousClock.Instant) {
        guard now > entry.refilled else { return }
        let elapsed = (now - entry.refilled).components
        // Milliseconds, saturating: a clock jump or a long idle only fills the bucket.
        let ms = elapsed.seconds >= Int64(Int32.max) ? Int64(Int32.max) : elapsed.seconds * 1000 + elapsed.attoseconds / 1_000_000_000_000_000
        let capacity = limits.burst * 1000
        let added = ms.multipliedReportingOverflow(by: Int64(limits.callsPerSecond))
        let tokens = added.overflow ? Int64(capacity) : min(Int64(entry.milliTokens) + added.partialValue, Int64(capacity))
        entry.milliTokens = Int(tokens)
        entry.refilled = now
    }
}
