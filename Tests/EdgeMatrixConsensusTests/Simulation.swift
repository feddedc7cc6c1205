import EdgeMatrixConsensus
import EdgeMatrixCore
import Foundation

/// A whole validator network in one process, driven by one seed: a virtual clock in milliseconds, a network
/// with random delay, loss, duplication, reordering and healing partitions, crashes with restart from the WAL,
/// and up to f Byzantine validators (silent, or equivocating on every proposal and vote). Everything random comes
/// from the seed, and nothing iterates a dictionary, so a seed replays exactly.
final class Simulation {
    enum Behavior: CustomStringConvertible {
        case honest, silent, equivocator
        var description: String { self == .honest ? "honest" : self == .silent ? "silent" : "equivocator" }
    }

    struct Scenario: CustomStringConvertible {
        var seed: UInt64
        var validators: Int
        var powers: [UInt64]
        var behaviors: [Behavior]
        /// Global stabilisation time: from then on no loss, no partitions, bounded delay, every node up.
        var gst: UInt64
        var lossPerMille: Int
        var duplicatePerMille: Int
        var maxDelayBeforeGST: Int
        var maxDelayAfterGST: Int
        var partitions: [(start: UInt64, end: UInt64, side: [Bool])]
        var crashes: [(node: Int, at: UInt64, restart: UInt64)]
        /// A stake change the application decides at genesis, effective at height 3.
        var powerChange: (node: Int, power: UInt64)?
        var heightsAfterGST: Int
        var livenessBoundMs: UInt64
        /// Run the real chain application (blocks, block rules, ledger, evidence, epochs) instead of opaque values.
        var ledger = false

        var description: String {
            "seed \(seed): n=\(validators) powers=\(powers) faults=\(behaviors) gst=\(gst)ms loss=\(lossPerMille)‰ "
                + "dup=\(duplicatePerMille)‰ delay≤\(maxDelayBeforeGST)ms partitions=\(partitions.map { "\($0.start)-\($0.end)" }) "
                + "crashes=\(crashes.map { "n\($0.node)@\($0.at)-\($0.restart)" })"
        }

        /// Draws a scenario from a seed. Byzantine power always stays below 1/3.
        init(seed: UInt64, heightsAfterGST: Int = 2) {
            var rng = Xoshiro256(seed: seed ^ 0x5EED_0F_C0_5E_5E)
            self.seed = seed
            let n = seed % 2 == 0 ? 4 : 7
            validators = n
            self.heightsAfterGST = heightsAfterGST
            livenessBoundMs = 30_000
            powers = rng.chance(500) ? Array(repeating: 1, count: n) : (0..<n).map { _ in UInt64(rng.int(1...4)) }
            let total = powers.reduce(0, +)
            behaviors = Array(repeating: .honest, count: n)
            var faultyPower: UInt64 = 0
            let wanted = rng.int(0...(n - 1) / 3)
            var faulty = 0
            for i in (0..<n).shuffled(using: &rng) where faulty < wanted && (faultyPower + powers[i]) * 3 < total {
                behaviors[i] = rng.chance(500) ? .silent : .equivocator
                faultyPower += powers[i]
                faulty += 1
            }
            gst = UInt64(rng.int(500...4000))
            lossPerMille = rng.pick([0, 50, 150, 300])
            duplicatePerMille = rng.pick([0, 50, 200])
            maxDelayBeforeGST = rng.pick([20, 100, 400, 1000])
            maxDelayAfterGST = rng.int(5...60)
            partitions = []
            for _ in 0..<rng.int(0...2) {
                let start = UInt64(rng.int(0...Int(gst)))
                let end = min(gst, start + UInt64(rng.int(200...3000)))
                partitions.append((start, end, (0..<n).map { _ in rng.chance(500) }))
            }
            crashes = []
            let kinds = behaviors
            let honest = (0..<n).filter { kinds[$0] == .honest }
            for _ in 0..<rng.int(0...2) {
                let at = UInt64(rng.int(0...Int(gst)))
                crashes.append((rng.pick(honest), at, min(gst, at + UInt64(rng.int(50...2500)))))
            }
            if rng.chance(300), let node = honest.first {
                powerChange = (node, powers[node] + 1)  // more honest power keeps the faulty share below 1/3
            }
        }
    }

    struct Outcome {
        var failures: [String] = []
        var heights: [Int] = []
        var livenessMs: UInt64?
        var events = 0
        var evidence = 0
        /// With the ledger: transfers proposed and evidence committed on chain.
        var transfers = 0
        var evidenceCommitted = 0
    }

    // MARK: State

    struct Node {
        var behavior: Behavior
        var key: SigningKey
        var signer: CachingSigner
        var engine: ConsensusEngine?
        var up = true
        var incarnation = 0
        let wal = InMemoryWAL()
        /// The application's durable store: decided blocks and the state-root chain over them.
        var blocks: [CommittedBlock] = []
        var roots: [Hash32] = []
        var syncBlockedUntil: UInt64 = 0
        /// Set by a crash that strikes in the middle of the next batch of actions.
        var crashAfterActions: Int?
    }

    enum Payload {
        case deliver(to: Int, from: Int, ConsensusMessage)
        case timer(node: Int, incarnation: Int, ScheduledTimeout)
        case validated(node: Int, incarnation: Int, Height, Hash32, Bool)
        case gossip(node: Int)
        case crash(node: Int)
        case restart(node: Int)
        case syncRequest(to: Int, from: Int, Height)
        case syncResponse(to: Int, [CommittedBlock])
        case gst
    }

    let scenario: Scenario
    let configuration: ConsensusConfiguration
    let genesis: ValidatorSet
    let application: SimulatedLedger?
    let cache = SignatureCache()
    var rng: Xoshiro256
    var nodes: [Node] = []
    var queue = EventQueue<Payload>()
    var now: UInt64 = 0
    var outcome = Outcome()
    var trace: Bool
    var targetHeight: Int?
    /// Safety bookkeeping: the one value decided at each height, and every message each honest validator ever
    /// signed per (height, round, kind), across restarts.
    var decided: [Height: Hash32] = [:]
    var signedByHonest: [String: Hash32] = [:]

    init(_ scenario: Scenario, trace: Bool = false) {
        self.scenario = scenario
        self.trace = trace
        rng = Xoshiro256(seed: scenario.seed)
        let timeouts = TimeoutConfiguration(proposeMs: 300, proposeDeltaMs: 100, prevoteMs: 150, prevoteDeltaMs: 50,
                                            precommitMs: 150, precommitDeltaMs: 50, commitMs: 800)
        configuration = ConsensusConfiguration(chainID: SimulatedLedger.chainID, timeouts: timeouts)
        let keys = (0..<scenario.validators).map { i -> SigningKey in
            var mix = SeededRandom(seed: UInt64(i) &* 0x1000_0000_01 &+ 7)
            let seed = (0..<4).flatMap { _ in withUnsafeBytes(of: mix.next().bigEndian, Array.init) }
            return try! SigningKey(seed: seed)
        }
        if scenario.ledger {
            let application = SimulatedLedger(nodeKeys: keys, powers: scenario.powers, powerChange: scenario.powerChange, seed: scenario.seed)
            self.application = application
            genesis = application.genesisValidators
        } else {
            application = nil
            genesis = try! ValidatorSet(keys.indices.map { (publicKey: keys[$0].publicKey, votingPower: scenario.powers[$0]) })
        }
        for i in keys.indices {
            nodes.append(Node(behavior: scenario.behaviors[i], key: keys[i], signer: CachingSigner(key: keys[i], cache: cache)))
        }
    }

    var honest: [Int] { nodes.indices.filter { nodes[$0].behavior == .honest } }

    // MARK: Run

    func run() -> Outcome {
        for i in nodes.indices {
            if nodes[i].behavior == .silent { nodes[i].up = false; continue }
            boot(i)
            queue.push(at: UInt64(rng.int(100...400)), .gossip(node: i))
        }
        for crash in scenario.crashes {
            queue.push(at: crash.at, .crash(node: crash.node))
            queue.push(at: crash.restart, .restart(node: crash.node))
        }
        queue.push(at: scenario.gst, .gst)
        while let (time, payload) = queue.pop() {
            now = time
            outcome.events += 1
            if let target = targetHeight {
                if honest.allSatisfy({ nodes[$0].blocks.count >= target }) {
                    outcome.livenessMs = now - scenario.gst
                    break
                }
                if now > scenario.gst + scenario.livenessBoundMs {
                    fail("liveness: by \(scenario.livenessBoundMs) ms after GST honest heights are "
                        + "\(honest.map { nodes[$0].blocks.count }), target \(target)")
                    break
                }
            }
            if !outcome.failures.isEmpty { break }
            dispatch(payload)
        }
        checkStateRoots()
        outcome.heights = nodes.map { $0.blocks.count }
        outcome.transfers = application?.transfersProposed ?? 0
        outcome.evidenceCommitted = application?.evidenceCommitted ?? 0
        return outcome
    }

    private func dispatch(_ payload: Payload) {
        switch payload {
        case .deliver(let to, let from, let message):
            guard nodes[to].up, let height = nodes[to].engine?.height else { return }
            if trace { print("\(now) n\(to) <- n\(from) \(message)") }
            if message.height > height { requestSync(node: to, peer: from) }
            if message.height == height { process(to, .init(message)) }
        case .timer(let node, let incarnation, let timeout):
            guard nodes[node].up, nodes[node].incarnation == incarnation else { return }
            if trace { print("\(now) n\(node) fires \(timeout)") }
            process(node, .timeout(timeout))
        case .validated(let node, let incarnation, let height, let value, let valid):
            guard nodes[node].up, nodes[node].incarnation == incarnation else { return }
            process(node, .validated(height: height, value: value, isValid: valid))
        case .gossip(let node):
            // Tendermint's liveness assumes gossip: what one correct node received, all eventually receive. Over
            // a lossy network that takes re-sending: each tick a node sends all it holds at its height to one
            // random peer (an equivocator re-sends only its own messages, equivocating again).
            if nodes[node].up, let engine = nodes[node].engine {
                let peer = (node + rng.int(1...nodes.count - 1)) % nodes.count
                if nodes[node].behavior == .equivocator {
                    for message in engine.ownSignedMessages { equivocate(node, message, only: peer) }
                } else {
                    for message in engine.gossipMessages { transmit(from: node, to: peer, .deliver(to: peer, from: node, message)) }
                }
            }
            queue.push(at: now + UInt64(rng.int(200...400)), .gossip(node: node))
        case .crash(let node):
            guard nodes[node].up else { return }
            if rng.chance(500) {
                nodes[node].crashAfterActions = rng.int(0...3)  // strike in the middle of the next batch
            } else {
                crash(node)
            }
        case .restart(let node):
            nodes[node].crashAfterActions = nil  // a mid-batch crash that never got its batch did not happen
            guard !nodes[node].up else { return }
            if trace { print("\(now) n\(node) restarts at height \(nodes[node].blocks.count + 1)") }
            nodes[node].up = true
            boot(node)
        case .syncRequest(let to, let from, let height):
            guard nodes[to].up else { return }
            let blocks = nodes[to].blocks.dropFirst(Int(height) - 1).prefix(8)
            if !blocks.isEmpty { transmit(from: to, to: from, .syncResponse(to: from, Array(blocks))) }
        case .syncResponse(let to, let blocks):
            guard nodes[to].up else { return }
            for block in blocks where nodes[to].up && block.height == nodes[to].engine?.height {
                process(to, .syncedBlock(value: block.value, certificate: block.certificate))
            }
        case .gst:
            for i in honest {
                nodes[i].crashAfterActions = nil
                if !nodes[i].up { nodes[i].up = true; boot(i) }
            }
            let tip = honest.map { nodes[$0].blocks.count }.max() ?? 0
            targetHeight = tip + scenario.heightsAfterGST
            if trace { print("\(now) GST: target height \(targetHeight!)") }
        }
    }

    /// Starts (or restarts) a node from its durable state: committed blocks, their validator sets, and the WAL.
    private func boot(_ i: Int) {
        nodes[i].incarnation += 1
        nodes[i].crashAfterActions = nil
        let validators = nodes[i].blocks.last?.nextValidators ?? genesis
        var engine = ConsensusEngine(configuration: configuration, validators: validators, signer: nodes[i].signer,
                                     verifier: cache, walRecords: nodes[i].wal.replay())
        let height = Height(nodes[i].blocks.count + 1)
        if let application {
            if let pending = application.pendingUpdates(i) {
                _ = engine.handle(.validatorUpdates(effectiveHeight: pending.effectiveHeight, updates: pending.updates))
            }
        } else if let change = scenario.powerChange, height < 3 {
            _ = engine.handle(.validatorUpdates(effectiveHeight: 3, updates: [
                ValidatorUpdate(publicKey: nodes[change.node].key.publicKey, votingPower: change.power),
            ]))
        }
        nodes[i].engine = engine
        process(i, .start(height: height))
    }

    private func crash(_ i: Int) {
        if trace { print("\(now) n\(i) crashes") }
        nodes[i].up = false
        nodes[i].engine = nil
        nodes[i].incarnation += 1
        nodes[i].crashAfterActions = nil
        application?.crashed(i)
    }

    // MARK: A node handling one event and carrying out its actions, like a real host

    private func process(_ i: Int, _ event: ConsensusEvent) {
        guard nodes[i].up, var engine = nodes[i].engine else { return }
        let actions = engine.handle(event)
        nodes[i].engine = engine
        var followUps = [ConsensusEvent]()
        for (index, action) in actions.enumerated() {
            if let cut = nodes[i].crashAfterActions, index >= cut { crash(i); return }
            switch action {
            case .persist(let record):
                nodes[i].wal.append([record])
            case .broadcast(let message):
                if trace { print("\(now) n\(i) -> \(message)") }
                if nodes[i].behavior == .equivocator { equivocate(i, message) } else { recordSigned(i, message); broadcast(from: i, message) }
            case .scheduleTimeout(let timeout):
                queue.push(at: now + timeout.durationMs, .timer(node: i, incarnation: nodes[i].incarnation, timeout))
            case .requestValue(let height, let round):
                followUps.append(.valueToPropose(height: height, round: round, value: makeValue(i, height, round)))
            case .requestValidation(let height, let value, let bytes):
                let valid = application?.isValid(i, bytes, height: height, now: now, engineValidators: engine.validators)
                    ?? isValid(bytes, height: height)
                queue.push(at: now + UInt64(rng.int(0...30)),
                           .validated(node: i, incarnation: nodes[i].incarnation, height, value, valid))
            case .commit(let block):
                if let updates = commit(i, block) {
                    followUps.append(.validatorUpdates(effectiveHeight: block.height + 2, updates: updates))
                }
            case .evidence(let evidence):
                outcome.evidence += 1
                application?.evidence(i, evidence)
                if let offender = nodes.firstIndex(where: { $0.key.nodeID == evidence.validator }),
                   nodes[offender].behavior == .honest {
                    fail("n\(i) produced evidence against honest n\(offender): \(evidence)")
                }
                if (try? evidence.verify(chainID: configuration.chainID, validators: engine.validators, verifier: cache)) == nil,
                   engine.height == evidence.height {
                    fail("n\(i) produced evidence that does not verify: \(evidence)")
                }
            case .rejected:
                break  // Byzantine noise, or stale messages after validator changes
            }
        }
        nodes[i].crashAfterActions = nil
        for event in followUps { process(i, event) }
    }

    /// Returns validator updates for the engine (ledger mode, at epoch boundaries).
    private func commit(_ i: Int, _ block: CommittedBlock) -> [ValidatorUpdate]? {
        let expected = Height(nodes[i].blocks.count + 1)
        guard block.height == expected else { fail("n\(i) committed height \(block.height), expected \(expected)"); return nil }
        let validators = nodes[i].blocks.last?.nextValidators ?? genesis
        do {
            try block.certificate.verify(block: block.value, height: block.height, chainID: configuration.chainID,
                                         validators: validators, verifier: cache)
        } catch {
            fail("n\(i) committed height \(block.height) with a bad certificate: \(error)")
        }
        let id = Hash32.of(block.value)
        if nodes[i].behavior == .honest {
            if let other = decided[block.height], other != id {
                fail("SAFETY: two values decided at height \(block.height): \(other.hex.prefix(12)) and \(id.hex.prefix(12)) (n\(i))")
            }
            decided[block.height] = id
        }
        var updates: [ValidatorUpdate]?
        if let application {
            // The state root is the ledger's after executing the block, as validators store it.
            switch application.commit(i, block) {
            case .success(let result):
                nodes[i].roots.append(result.root)
                updates = result.updates.isEmpty ? nil : result.updates
            case .failure(let failure):
                fail("n\(i): \(failure.message)")
                return nil
            }
        } else {
            if !isValid(block.value, height: block.height) { fail("n\(i) committed an invalid value at \(block.height)") }
            nodes[i].roots.append(Hash32.of((nodes[i].roots.last ?? .zero).bytes + id.bytes))
        }
        nodes[i].blocks.append(block)
        nodes[i].wal.prune(below: block.height + 1)
        if trace { print("\(now) n\(i) COMMITS \(block.height) \(id.hex.prefix(8))") }
        return updates
    }

    private func checkStateRoots() {
        let lowest = honest.map { nodes[$0].roots.count }.min() ?? 0
        for h in 0..<lowest {
            let roots = honest.map { nodes[$0].roots[h] }
            if Set(roots).count > 1 { fail("SAFETY: honest state roots differ at height \(h + 1)") }
        }
    }

    // MARK: Application: values, validity

    /// A value is a small "block": a tag, the height, the proposer and a nonce. Tag 0xBA marks a block the
    /// application rules reject (Byzantine proposers sometimes send one).
    private func makeValue(_ i: Int, _ height: Height, _ round: Round, valid: Bool = true) -> [UInt8] {
        if let application {
            return application.propose(i, height: height, now: now, valid: valid,
                                       engineValidators: nodes[i].engine?.validators ?? genesis, rng: &rng)
        }
        var writer = ByteWriter()
        writer.write(UInt8(valid ? 0xB1 : 0xBA))
        writer.write(height)
        writer.write(round)
        writer.write(UInt8(i))
        writer.write(rng.next())
        return writer.bytes
    }

    private func isValid(_ bytes: [UInt8], height: Height) -> Bool {
        var reader = ByteReader(bytes)
        guard (try? reader.readUInt8()) == 0xB1, let h = try? reader.readUInt64() else { return false }
        return h == height
    }

    // MARK: Byzantine behavior

    /// Sends the honest engine's message to some peers and a conflicting, validly signed one to the others
    /// (sometimes both to the same peer).
    private func equivocate(_ i: Int, _ message: ConsensusMessage, only target: Int? = nil) {
        let conflicting: ConsensusMessage
        let signer = nodes[i].signer
        switch message {
        case .vote(let vote):
            var body = vote.body
            body.value = rng.chance(500) ? nil : Hash32.of(makeValue(i, vote.height, vote.round))
            if body.value == vote.value { body.value = Hash32.of(makeValue(i, vote.height, vote.round)) }
            conflicting = .vote(SignedVote(signing: body, with: signer))
        case .proposal(let proposal):
            let other = makeValue(i, proposal.height, proposal.round, valid: rng.chance(700))
            var body = proposal.body
            body.value = Hash32.of(other)
            conflicting = .proposal(SignedProposal(signing: body, value: other, with: signer))
        }
        for peer in nodes.indices where peer != i && (target == nil || target == peer) {
            let both = rng.chance(200)
            let first = rng.chance(500) ? message : conflicting
            transmit(from: i, to: peer, .deliver(to: peer, from: i, first))
            if both { transmit(from: i, to: peer, .deliver(to: peer, from: i, first == message ? conflicting : message)) }
        }
    }

    // MARK: Network

    private func broadcast(from i: Int, _ message: ConsensusMessage) {
        for peer in nodes.indices where peer != i { transmit(from: i, to: peer, .deliver(to: peer, from: i, message)) }
    }

    private func requestSync(node: Int, peer: Int) {
        guard now >= nodes[node].syncBlockedUntil, let height = nodes[node].engine?.height else { return }
        nodes[node].syncBlockedUntil = now + 200
        transmit(from: node, to: peer, .syncRequest(to: peer, from: node, height))
    }

    /// One message over the simulated network: lost, partitioned, delayed, or duplicated as the scenario says.
    private func transmit(from: Int, to: Int, _ payload: Payload) {
        let stable = now >= scenario.gst
        if !stable {
            if rng.chance(scenario.lossPerMille) { return }
            for p in scenario.partitions where now >= p.start && now < p.end && p.side[from] != p.side[to] { return }
        }
        let maxDelay = stable ? scenario.maxDelayAfterGST : scenario.maxDelayBeforeGST
        queue.push(at: now + UInt64(rng.int(1...maxDelay)), payload)
        if rng.chance(scenario.duplicatePerMille) { queue.push(at: now + UInt64(rng.int(1...maxDelay)), payload) }
    }

    // MARK: Checks

    private func recordSigned(_ i: Int, _ message: ConsensusMessage) {
        let kind: String
        let bodyHash: Hash32
        switch message {
        case .proposal(let p): kind = "proposal"; bodyHash = Hash32.of(p.bodyBytes)
        case .vote(let v): kind = v.type.description; bodyHash = Hash32.of(v.bodyBytes)
        }
        let key = "\(i)/\(message.height)/\(message.round)/\(kind)"
        if let earlier = signedByHonest[key], earlier != bodyHash {
            fail("DOUBLE SIGN: honest n\(i) signed two different \(kind)s at \(message.height)/\(message.round)")
        }
        signedByHonest[key] = bodyHash
    }

    private func fail(_ message: String) {
        outcome.failures.append("\(message) [\(scenario)] at t=\(now)ms — replay with EMC_SIM_SEED=\(scenario.seed)")
    }
}

extension ConsensusEvent {
    init(_ message: ConsensusMessage) {
        switch message {
        case .proposal(let p): self = .proposal(p)
        case .vote(let v): self = .vote(v)
        }
    }
}

// MARK: - Signature cache

/// Ed25519 in a debug build costs about a millisecond per verification, and every message reaches every node
/// several times. Signatures made inside the simulation are real; the cache remembers which (key, bytes,
/// signature) triples are genuine, so each is checked for real only if it was not made here.
final class SignatureCache: SignatureVerifier, @unchecked Sendable {
    private let lock = NSLock()
    private var known: [[UInt8]: [UInt8]] = [:]  // signature -> public key || domain-tagged message

    func remember(_ signature: [UInt8], bytes: [UInt8], domain: SigningDomain, publicKey: PublicKey) {
        lock.withLock { known[signature] = publicKey.rawRepresentation + domain.message(bytes) }
    }

    func isValidSignature(_ signature: [UInt8], for bytes: [UInt8], domain: SigningDomain, publicKey: PublicKey) -> Bool {
        let entry = publicKey.rawRepresentation + domain.message(bytes)
        if lock.withLock({ known[signature] }) == entry { return true }
        guard publicKey.isValidSignature(signature, for: bytes, domain: domain) else { return false }
        lock.withLock { known[signature] = entry }
        return true
    }
}

struct CachingSigner: ConsensusSigner {
    let key: SigningKey
    let cache: SignatureCache
    var publicKey: PublicKey { key.publicKey }

    func sign(_ bytes: [UInt8], domain: SigningDomain) -> [UInt8] {
        let signature = key.sign(bytes, domain: domain)
        cache.remember(signature, bytes: bytes, domain: domain, publicKey: key.publicKey)
        return signature
    }
}

// MARK: - Event queue

/// A binary min-heap on (time, insertion order): simultaneous events run in the order they were scheduled.
struct EventQueue<Payload> {
    private var heap: [(time: UInt64, seq: UInt64, payload: Payload)] = []
    private var nextSeq: UInt64 = 0

    mutating func push(at time: UInt64, _ payload: Payload) {
        heap.append((time, nextSeq, payload))
        nextSeq += 1
        var child = heap.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard less(child, parent) else { break }
            heap.swapAt(child, parent)
            child = parent
        }
    }

    mutating func pop() -> (UInt64, Payload)? {
        guard !heap.isEmpty else { return nil }
        heap.swapAt(0, heap.count - 1)
        let top = heap.removeLast()
        var parent = 0
        while true {
            let left = 2 * parent + 1, right = left + 1
            var smallest = parent
            if left < heap.count, less(left, smallest) { smallest = left }
            if right < heap.count, less(right, smallest) { smallest = right }
            guard smallest != parent else { break }
            heap.swapAt(parent, smallest)
            parent = smallest
        }
        return (top.time, top.payload)
    }

    private func less(_ a: Int, _ b: Int) -> Bool {
        heap[a].time != heap[b].time ? heap[a].time < heap[b].time : heap[a].seq < heap[b].seq
    }
}
