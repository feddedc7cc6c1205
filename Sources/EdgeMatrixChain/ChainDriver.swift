import EdgeMatrixApplication
import EdgeMatrixConsensus
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNetwork
import EdgeMatrixStore
import Logging
import Metrics

/// What the consensus loop consumes, in order, from one stream.
enum ChainInput: Sendable {
    case message(ConsensusMessage)
    case timeout(ScheduledTimeout)
    case synced(value: [UInt8], certificate: CommitCertificate)
    /// Periodic: send our committed height, and with `full` every proposal and vote of the current height again.
    case gossipTick(full: Bool)
}

/// Owns the consensus engine, the WAL, the ledger and the block store; only the consensus loop calls it, one input
/// at a time. Everything others read is published through `ChainView`.
actor ChainDriver {
    let chainID: String
    let key: SigningKey
    let store: BlockStore
    let wal: FileWAL
    let mempool: Mempool
    let view: ChainView
    let peers: PeerNetwork
    let inputs: AsyncStream<ChainInput>.Continuation
    let maxTxsPerBlock: Int
    let logger: Logger

    private var engine: ConsensusEngine
    private var ledger: LedgerState
    private var lastHash: Hash32
    private var pendingEvidence: [Hash32: DuplicateVoteEvidence] = [:]
    /// Proposals already executed on a copy of the ledger (validation or our own proposal), by value hash.
    private var executed: [Hash32: (ledger: LedgerState, result: BlockResult)] = [:]
    private var seen: Set<Hash32> = []
    private var startHeight: Height
    private var pendingUpdates: [StakedValidator]
    let rules: BlockRules
    /// The set that voted at height 1, for evidence from then.
    let genesisValidators: ValidatorSet
    /// Equivocation evidence waiting for a block; bounded, since a Byzantine peer could otherwise grow it.
    static let maxPendingEvidence = 1_000

    private let blocksCommitted = Counter(label: "emc_chain_blocks_committed_total")
    private let txsCommitted = Counter(label: "emc_chain_txs_committed_total")
    private let heightGauge = Gauge(label: "emc_chain_height")
    private let proposalsRefused = Counter(label: "emc_chain_proposals_refused_total")

    init(chainID: String, key: SigningKey, store: BlockStore, wal: FileWAL, mempool: Mempool, view: ChainView,
         peers: PeerNetwork, inputs: AsyncStream<ChainInput>.Continuation, ledger: LedgerState, lastHash: Hash32,
         validators: ValidatorSet, genesisValidators: ValidatorSet, timeouts: TimeoutConfiguration, pendingUpdates: [StakedValidator],
         maxTxsPerBlock: Int, votes: Bool = true, logger: Logger) throws {
        rules = BlockRules(chainID: chainID)
        self.genesisValidators = genesisValidators
        self.chainID = chainID
        self.key = key
        self.store = store
        self.wal = wal
        self.mempool = mempool
        self.view = view
        self.peers = peers
        self.inputs = inputs
        self.maxTxsPerBlock = maxTxsPerBlock
        self.logger = logger
        self.ledger = ledger
        self.lastHash = lastHash
        self.startHeight = ledger.height + 1
        self.pendingUpdates = pendingUpdates
        let records: [WALRecord]
        do { records = try wal.replay() } catch { throw ChainError.wal(error.description) }
        engine = ConsensusEngine(configuration: ConsensusConfiguration(chainID: chainID, timeouts: timeouts),
                                 validators: validators, signer: votes ? (key as any ConsensusSigner) : nil, walRecords: records)
    }

    func start() throws {
        try feed(.start(height: startHeight))
        if !pendingUpdates.isEmpty {
            try feed(.validatorUpdates(effectiveHeight: ledger.height + 2, updates: Self.updates(pendingUpdates)))
            pendingUpdates = []
        }
    }

    func process(_ input: ChainInput) throws {
        switch input {
        case .message(let message):
            guard message.height >= engine.height else { return }
            let id = Hash32.of(message.canonicalBytes)
            guard message.height > engine.height || seen.insert(id).inserted else { return }
            try feed(message.isProposal ? .proposal(message.proposal!) : .vote(message.vote!))
        case .timeout(let timeout):
            try feed(.timeout(timeout))
        case .synced(let value, let certificate):
            guard certificate.height == engine.height else { return }
            try feed(.syncedBlock(value: value, certificate: certificate))
        case .gossipTick(let full):
            if full { for message in engine.gossipMessages { peers.broadcast(.consensus(message.canonicalBytes)) } }
            peers.broadcast(.status(height: ledger.height))
        }
    }

    private func feed(_ first: ConsensusEvent) throws {
        var queue = [first]
        while !queue.isEmpty {
            let event = queue.removeFirst()
            let actions: [ConsensusAction]
            do { actions = try engine.handle(event, wal: wal) } catch { throw ChainError.wal(error.description) }
            for action in actions {
                switch action {
                case .persist:
                    break
                case .broadcast(let message):
                    peers.broadcast(.consensus(message.canonicalBytes))
                case .scheduleTimeout(let timeout):
                    let sink = inputs
                    Task {
                        try? await Task.sleep(for: .milliseconds(Int(min(timeout.durationMs, 3_600_000))))
                        sink.yield(.timeout(timeout))
                    }
                case .requestValue(let height, let round):
                    queue.append(.valueToPropose(height: height, round: round, value: buildBlock(height: height)))
                case .requestValidation(let height, let id, let bytes):
                    queue.append(.validated(height: height, value: id, isValid: validate(height: height, id: id, bytes: bytes)))
                case .commit(let block):
                    queue += try commit(block)
                case .evidence(let evidence):
                    logger.warning("equivocation detected", metadata: ["evidence": "\(evidence)"])
                    if pendingEvidence.count < Self.maxPendingEvidence { pendingEvidence[evidence.id] = evidence }
                case .rejected(let error):
                    logger.debug("consensus input refused", metadata: ["error": "\(error)"])
                }
            }
        }
    }

    // MARK: Blocks

    /// The chain's past as the block rules read it: validator sets and times of committed heights from the store.
    private var history: ChainHistory {
        let store = store
        let genesisValidators = genesisValidators
        let current = (height: engine.height, validators: engine.validators)
        return ChainHistory(
            validatorsAt: { height in
                if height == current.height { return current.validators }
                if height == 1 { return genesisValidators }
                guard height < current.height, let parent = try? store.block(at: height - 1) else { return nil }
                return try? ValidatorSet(canonicalBytes: parent.nextValidators)
            },
            timeAt: { height in (try? store.block(at: height))?.timeMillis })
    }

    /// Drops evidence that can never go into a block (expired, used, invalid at its own height) from the pool.
    private func admissibleEvidence(height: Height, time: UInt64) -> [DuplicateVoteEvidence] {
        let (admissible, dropped) = rules.admissibleEvidence(Array(pendingEvidence.values), height: height, time: time,
                                                             ledger: ledger, history: history)
        for (id, why) in dropped {
            pendingEvidence[id] = nil
            logger.info("evidence dropped from the pool", metadata: ["evidence": "\(id.hex.prefix(12))", "reason": "\(why)"])
        }
        return admissible
    }

    private func buildBlock(height: Height) -> [UInt8] {
        let time = max(wallClockMillis(), ledger.lastBlockTimeMillis + 1)
        let candidates = mempool.take(max: maxTxsPerBlock)
        let evidence = admissibleEvidence(height: height, time: time)
        var raw = candidates.map(\.bytes)
        var block = ChainBlock(height: height, timeMillis: time, proposer: key.nodeID, transactions: raw, evidence: evidence)
        var executed = try? rules.execute(block, on: ledger).get()
        if let first = executed {
            // Leave out what fails now (it would fail in the block too) and drop it from the mempool.
            var failed = [Hash32]()
            var keep = [[UInt8]]()
            for (i, outcome) in first.result.txResults.enumerated() {
                if case .success = outcome { keep.append(raw[i]) } else { failed.append(candidates[i].id) }
            }
            if !failed.isEmpty {
                mempool.remove(failed)
                raw = keep
                block.transactions = raw
                executed = try? rules.execute(block, on: ledger).get()
            }
        }
        let bytes = block.canonicalBytes
        if let executed { self.executed[Hash32.of(bytes)] = executed }
        return bytes
    }

    private func validate(height: Height, id: Hash32, bytes: [UInt8]) -> Bool {
        switch rules.validate(bytes, height: height, ledger: ledger, validators: engine.validators, now: wallClockMillis(), history: history) {
        case .success(let outcome):
            executed[id] = (outcome.ledger, outcome.result)
            return true
        case .failure(let violation):
            proposalsRefused.increment()
            logger.warning("proposal refused", metadata: ["height": "\(height)", "reason": "\(violation)"])
            return false
        }
    }

    private func commit(_ committed: CommittedBlock) throws -> [ConsensusEvent] {
        let height = committed.height
        let hash = committed.certificate.value
        let block: ChainBlock
        do { block = try ChainBlock(canonicalBytes: committed.value) } catch {
            throw ChainError.corruptBlock(height: height, reason: "committed value does not decode: \(error)")
        }
        let newLedger: LedgerState
        let result: BlockResult
        if let cached = executed[hash], cached.ledger.height == height {
            (newLedger, result) = cached
        } else {
            switch rules.execute(block, on: ledger) {
            case .success(let outcome): (newLedger, result) = outcome
            case .failure(let violation):
                throw ChainError.corruptBlock(height: height, reason: "committed block cannot be executed: \(violation)")
            }
        }
        var stored = [StoredTx]()
        var applied = [Hash32]()
        var failed = [(id: Hash32, bytes: [UInt8])]()
        stored.reserveCapacity(block.transactions.count)
        for (i, raw) in block.transactions.enumerated() {
            guard let tx = try? Transaction(decoding: raw), i < result.txResults.count else { continue }
            let id = tx.id
            switch result.txResults[i] {
            case .success:
                applied.append(id)
                stored.append(StoredTx(hash: id, height: height, index: UInt32(i), ok: true))
            case .failure(let error):
                failed.append((id, raw))
                stored.append(StoredTx(hash: id, height: height, index: UInt32(i), ok: false, error: error.description, errorCode: errorCode(error)))
            }
        }
        do {
            try store.append(StoredBlock(height: height, hash: hash, timeMillis: block.timeMillis, value: committed.value,
                                         certificate: committed.certificate.canonicalBytes,
                                         nextValidators: committed.nextValidators.canonicalBytes, stateRoot: result.stateRoot,
                                         txCount: block.transactions.count), txs: stored)
        } catch {
            throw ChainError.storage("cannot store block \(height): \(error)")
        }
        ledger = newLedger
        lastHash = hash
        do { try wal.prune(below: height + 1) } catch { throw ChainError.wal(error.description) }
        mempool.removeCommitted(applied: applied, failed: failed)
        for e in block.evidence { pendingEvidence[e.id] = nil }
        executed.removeAll()
        seen.removeAll()
        blocksCommitted.increment()
        txsCommitted.increment(by: block.transactions.count)
        heightGauge.record(Int64(clamping: height))
        view.publish(ChainSnapshot(ledger: newLedger, height: height, blockHash: hash, stateRoot: result.stateRoot,
                                   timeMillis: block.timeMillis, validators: committed.nextValidators),
                     event: BlockEvent(height: height, hash: hash, timeMillis: block.timeMillis, txCount: block.transactions.count,
                                       stateRoot: result.stateRoot))
        logger.debug("committed", metadata: ["height": "\(height)", "txs": "\(block.transactions.count)", "hash": "\(hash.hex.prefix(12))"])
        peers.broadcast(.status(height: height))
        if result.validatorUpdates.isEmpty { return [] }
        return [.validatorUpdates(effectiveHeight: height + 2, updates: Self.updates(result.validatorUpdates))]
    }

    static func updates(_ list: [StakedValidator]) -> [ValidatorUpdate] {
        list.map { ValidatorUpdate(publicKey: $0.nodeKey, votingPower: $0.power) }
    }
}

extension ConsensusMessage {
    var isProposal: Bool { if case .proposal = self { true } else { false } }
    var proposal: SignedProposal? { if case .proposal(let p) = self { p } else { nil } }
    var vote: SignedVote? { if case .vote(let v) = self { v } else { nil } }
}
