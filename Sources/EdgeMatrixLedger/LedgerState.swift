import EdgeMatrixCore

/// Where a transaction is executed: the block's height and time (ms, agreed by consensus; the ledger never reads
/// a clock) and the transaction's position in the block.
public struct BlockContext: Hashable, Sendable {
    public var height: UInt64
    public var timeMillis: UInt64
    public var txIndex: UInt32

    public init(height: UInt64, timeMillis: UInt64, txIndex: UInt32 = 0) {
        self.height = height
        self.timeMillis = timeMillis
        self.txIndex = txIndex
    }

    public var location: TxLocation { TxLocation(height: height, index: txIndex) }
}

/// What an executed transaction did.
public enum TxEffect: Hashable, Sendable {
    case transferred(from: Account, to: Account, amount: Amount)
    case burned(from: Account, amount: Amount)
    case bonded(stakeID: UInt64)
    case unbonded(stakeID: UInt64, withdrawableAtMillis: UInt64)
    case withdrawn(stakeID: UInt64, amount: Amount, to: Account)
    case nodeRegistered(nodeKey: PublicKey)
    case nodeUpdated(nodeKey: PublicKey)
    case nodeRetired(nodeKey: PublicKey)
    case escrowOpened(payer: Account, router: PublicKey, amount: Amount, balance: Amount)
    case escrowWithdrawalRequested(payer: Account, router: PublicKey, withdrawableAtHeight: UInt64)
    case pricesSet(nodeKey: PublicKey, entries: UInt32)
    case routerFeeSet(nodeKey: PublicKey, feeBps: UInt32)
    case settled(router: PublicKey, batch: UInt64, total: Amount, finalAtHeight: UInt64)
    case challengeUpheld(router: PublicKey, batch: UInt64, code: String, reverted: Amount, slashed: Amount, reward: Amount, compensation: Amount)
    case challengeDismissed(router: PublicKey, batch: UInt64, code: String, bondBurned: Amount)
    /// A compute node noticed `receipts` receipts of `router` worth `amount`; `charged` of it moved to pending.
    /// `dueAtHeight` is the router's deadline; nil when the router had already defaulted and the receipts settled at once.
    case receiptsNoticed(router: PublicKey, node: PublicKey, receipts: UInt32, amount: Amount, charged: Amount, dueAtHeight: UInt64?)
    /// A payer or node asked for a pair's leaves; the router must post them by the end of `dueAtHeight`.
    case dataRequested(router: PublicKey, batch: UInt64, pair: SettlementPair, dueAtHeight: UInt64, bond: Amount)
    /// The router posted leaves of a requested pair: `leaves` of them so far; `complete` when the request closed.
    case dataAnswered(router: PublicKey, batch: UInt64, pair: SettlementPair, leaves: UInt64, complete: Bool)
    /// A compute node filed a receipt worth `worth` that the router must prove in its batch by `dueAtHeight`.
    case omissionQueried(router: PublicKey, batch: UInt64, leaf: SettlementLeafKey, worth: Amount, dueAtHeight: UInt64)
    /// The router proved the queried receipt's leaf; the querier's bond was burned.
    case omissionAnswered(router: PublicKey, batch: UInt64, leaf: SettlementLeafKey, bondBurned: Amount)
}

public struct TxOutcome: Hashable, Sendable {
    public var id: Hash32
    public var location: TxLocation
    /// Fee charged and burned.
    public var fee: Amount
    public var effect: TxEffect
}

public typealias TxResult = Result<TxOutcome, LedgerError>

/// An ICRC-1 metadata value.
public enum MetadataValue: Hashable, Sendable {
    case nat(UInt64)
    case text(String)
}

/// The ledger: balances, stakes, node registry, validator set and the deduplication record. A pure,
/// deterministic value: the same genesis and the same blocks give the same state (and state root) everywhere.
/// A value type, so consensus can execute a proposed block on a copy and throw it away.
///
/// Fees and slashed stake are burned: they leave `totalSupply` and are counted in `burned`.
public struct LedgerState: Sendable {
    public let chainID: String
    public let genesisTimeMillis: UInt64
    public let parameters: LedgerParameters

    /// Height of the last block executed by `applyBlock` (0 = genesis only) and its time.
    public private(set) var height: UInt64 = 0
    public private(set) var lastBlockTimeMillis: UInt64
    public private(set) var totalSupply: Amount
    public private(set) var burned: Amount = .zero
    public private(set) var nextStakeID: UInt64 = 0

    var balances: [Account: UInt64] = [:]
    var stakes: [UInt64: Stake] = [:]
    var nodes: [PublicKey: NodeRecord] = [:]
    /// The validator set in force, as reported to consensus.
    var activeValidators: [PublicKey: UInt64] = [:]
    var dedup: [Hash32: DedupEntry] = [:]
    var usedEvidence: Set<Hash32> = []
    /// Escrows per (payer, router); see Escrow.swift.
    var escrows: [EscrowKey: Escrow] = [:]
    /// Included settlement batches; see SettlementLedger.swift.
    var settlements: [SettlementKey: SettlementRecord] = [:]
    /// Each router's next batch number and first sequence number (absent = batch 0 from sequence 1).
    var settlementCursors: [PublicKey: SettlementCursor] = [:]
    /// Node shares of final settlements by the height their audit window ends, in the order they were made.
    var heldPayouts: [UInt64: [HeldPayout]] = [:]
    /// Receipts compute nodes noticed (kind 14), open or settled; see NodeSettlement.swift.
    var receiptNotices: [ReceiptNoticeKey: ReceiptNotice] = [:]
    /// Routers that missed a settlement deadline, with the height at whose end they did.
    var routerDefaults: [PublicKey: UInt64] = [:]
    /// Data requests (kind 15) of settlements not yet final; see DataRequest.swift.
    var dataRequests: [DataRequestKey: DataRequestRecord] = [:]
    /// Omission queries (kind 17) of settlements not yet final; see OmissionQuery.swift.
    var omissionQueries: [OmissionQueryKey: OmissionQueryRecord] = [:]

    // Indexes derivable from the state above; not part of the state root.
    var stakeUsers: [UInt64: PublicKey] = [:]
    var dedupBuckets: [UInt64: [Hash32]] = [:]
    /// Sum of `balance` over each router's escrows (for the cap); zero totals are dropped.
    var routerEscrowTotals: [PublicKey: UInt64] = [:]
    /// Escrow keys by the height their withdrawal comes due (entries may be stale: a top-up cancels a request).
    var escrowWithdrawalsDue: [UInt64: [EscrowKey]] = [:]
    /// Pending settlement keys by the height their challenge window ends (derivable from `settlements`).
    var settlementsDue: [UInt64: [SettlementKey]] = [:]
    /// Income per node and epoch, for `earnings(node:)` (derivable from the blocks).
    var nodeEarnings: [PublicKey: [UInt64: NodeEarnings]] = [:]
    /// Open notices per router (derivable from `receiptNotices`).
    var openNotices: [PublicKey: Set<ReceiptNoticeKey>] = [:]
    /// Notice keys by the height their deadline ends (entries may be stale: lapsed or settled since).
    var noticesDue: [UInt64: [ReceiptNoticeKey]] = [:]
    /// The payer of every noticed request (derivable from `receiptNotices`).
    var noticedRequests: [NoticedRequest: Account] = [:]
    /// Data request keys by the height their deadline ends (entries may be stale: answered since).
    var dataRequestsDue: [UInt64: [DataRequestKey]] = [:]
    /// Omission query keys by the height their deadline ends.
    var omissionQueriesDue: [UInt64: [OmissionQueryKey]] = [:]

    struct DedupEntry: Hashable, Sendable {
        var location: TxLocation
        var createdAtMillis: UInt64
    }

    static let dedupBucketMillis: UInt64 = 60_000

    // MARK: Genesis

    /// Builds the state of block 0. The genesis is validated first.
    public init(genesis: Genesis) throws(GenesisError) {
        try genesis.validate()
        chainID = genesis.chainID
        genesisTimeMillis = genesis.genesisTimeMillis
        parameters = genesis.parameters
        lastBlockTimeMillis = genesis.genesisTimeMillis
        totalSupply = genesis.parameters.totalSupply
        for allocation in genesis.allocations { balances[allocation.account] = allocation.amount.baseUnits }
        for (i, v) in genesis.validators.enumerated() {
            let id = nextStakeID
            nextStakeID += 1
            stakes[id] = Stake(id: id, owner: v.owner, role: .validator, amount: v.stake, lockDays: v.lockDays,
                               bondedAtMillis: genesis.genesisTimeMillis,
                               unlocksAtMillis: genesis.genesisTimeMillis + UInt64(v.lockDays) * LedgerParameters.millisPerDay,
                               status: .bonded)
            nodes[v.nodeKey] = NodeRecord(nodeKey: v.nodeKey, owner: v.owner.owner, role: .validator, endpoints: v.endpoints,
                                          stakeID: id, registeredAt: TxLocation(height: 0, index: UInt32(i)), status: .active)
            stakeUsers[id] = v.nodeKey
        }
        for validator in selectValidators() { activeValidators[validator.nodeKey] = validator.power }
    }

    // MARK: Queries (ICRC-1 and more)

    public var name: String { parameters.tokenName }
    public var symbol: String { parameters.tokenSymbol }
    public var decimals: UInt8 { parameters.decimals }
    public var fee: Amount { parameters.transferFee }
    public var mintingAccount: Account? { .minting }

    public func balance(of account: Account) -> Amount { Amount(baseUnits: balances[account] ?? 0) }

    /// ICRC-1 metadata, sorted by key.
    public var metadata: [(key: String, value: MetadataValue)] {
        [("icrc1:decimals", .nat(UInt64(decimals))), ("icrc1:fee", .nat(fee.baseUnits)),
         ("icrc1:max_memo_length", .nat(UInt64(parameters.maxMemoBytes))), ("icrc1:name", .text(name)),
         ("icrc1:symbol", .text(symbol))]
    }

    /// Every non-zero balance of `owner`'s (sub)accounts, default subaccount first.
    public func balances(ownedBy owner: PublicKey) -> [(account: Account, balance: Amount)] {
        balances.filter { $0.key.owner == owner }.map { (account: $0.key, balance: Amount(baseUnits: $0.value)) }
            .sorted { $0.account < $1.account }
    }

    public func stake(id: UInt64) -> Stake? { stakes[id] }

    /// All stakes whose owner key is `owner` (any subaccount), by id.
    public func stakes(ownedBy owner: PublicKey) -> [Stake] {
        stakes.values.filter { $0.owner.owner == owner }.sorted { $0.id < $1.id }
    }

    public func node(_ nodeKey: PublicKey) -> NodeRecord? { nodes[nodeKey] }

    /// Every registered node (retired ones too), ordered by node key bytes.
    public var allNodes: [NodeRecord] { nodes.values.sorted { $0.nodeKey.rawRepresentation.lexicographicallyPrecedes($1.nodeKey.rawRepresentation) } }

    /// The validator set in force, ordered by node key bytes.
    public var validators: [StakedValidator] {
        activeValidators.map { StakedValidator(nodeKey: $0.key, power: $0.value) }
            .sorted { $0.nodeKey.rawRepresentation.lexicographicallyPrecedes($1.nodeKey.rawRepresentation) }
    }

    /// Whether a registered node may serve its role now: active, backed by a bonded stake of its role of at least the
    /// role's minimum (a slash can take it below), and, for a router, not defaulted (docs/SETTLEMENT.md § 10). Routers
    /// admit only such compute nodes; compute nodes joining pick only such routers.
    public func isEligible(_ nodeKey: PublicKey) -> Bool {
        guard let node = nodes[nodeKey], node.status == .active, routerDefaults[nodeKey] == nil,
              let stake = stakes[node.stakeID] else { return false }
        return stake.status == .bonded && stake.role == node.role
            && stake.amount >= parameters.staking.requirement(for: node.role).minimumStake
    }

    /// Whether equivocation evidence with this id has already slashed (it never slashes twice).
    public func isEvidenceUsed(_ id: Hash32) -> Bool { usedEvidence.contains(id) }

    /// Where a transaction id was executed, while it is inside the deduplication window.
    public func location(ofTransaction id: Hash32) -> TxLocation? { dedup[id]?.location }

    public func isEpochBoundary(_ height: UInt64) -> Bool { height > 0 && height % parameters.epochLengthBlocks == 0 }

    // MARK: Applying transactions

    /// Checks a transaction against the current state without changing anything (mempool admission).
    public func check(_ tx: Transaction, context: BlockContext) -> LedgerError? {
        // The copy is free (copy-on-write) because a dry run never writes.
        var copy = self
        if case .failure(let error) = copy.execute(tx, context: context, commit: false) { return error }
        return nil
    }

    /// Decodes and applies wire bytes; a decoding failure is `.malformed` and changes nothing.
    public mutating func apply(bytes: [UInt8], context: BlockContext) -> TxResult {
        let tx: Transaction
        do { tx = try Transaction(decoding: bytes) } catch { return .failure(.malformed(error.description)) }
        return apply(tx, context: context)
    }

    /// Applies one transaction. Every check runs before the first change, so a refused transaction changes nothing.
    public mutating func apply(_ tx: Transaction, context: BlockContext) -> TxResult {
        execute(tx, context: context, commit: true)
    }

    /// With `commit == false` every check runs and nothing is written.
    private mutating func execute(_ tx: Transaction, context: BlockContext, commit: Bool) -> TxResult {
        let body = tx.body
        guard body.chainID == chainID else { return .failure(.wrongChain(expected: chainID, got: body.chainID)) }
        guard tx.hasValidSignature else { return .failure(.badSignature) }

        // ICRC-1 time checks, then deduplication over the window.
        let now = context.timeMillis
        let window = parameters.dedupWindowMillis.addingSaturating(parameters.permittedDriftMillis)
        if body.createdAtMillis.addingSaturating(window) < now { return .failure(.tooOld) }
        if body.createdAtMillis > now.addingSaturating(parameters.permittedDriftMillis) {
            return .failure(.createdInFuture(ledgerTime: now))
        }
        let id = tx.id
        if let original = dedup[id] { return .failure(.duplicate(duplicateOf: original.location)) }

        let result: Result<(fee: Amount, effect: TxEffect), LedgerError>
        switch body.kind {
        case .transfer(let t): result = applyTransfer(t, signer: tx.signer, commit: commit)
        case .bond(let b): result = applyBond(b, signer: tx.signer, now: now, commit: commit)
        case .unbond(let stakeID): result = applyUnbond(stakeID, signer: tx.signer, commit: commit)
        case .withdraw(let stakeID): result = applyWithdraw(stakeID, signer: tx.signer, now: now, commit: commit)
        case .registerNode(let r): result = applyRegister(r, signer: tx.signer, location: context.location, commit: commit)
        case .updateNode(let u): result = applyUpdate(u, signer: tx.signer, commit: commit)
        case .retireNode(let key): result = applyRetire(key, signer: tx.signer, commit: commit)
        case .escrowOpen(let o): result = applyEscrowOpen(o, signer: tx.signer, commit: commit)
        case .escrowWithdraw(let w): result = applyEscrowWithdraw(w, signer: tx.signer, height: context.height, commit: commit)
        case .setPrices(let p): result = applySetPrices(p, signer: tx.signer, commit: commit)
        case .setRouterFee(let f): result = applySetRouterFee(f, signer: tx.signer, commit: commit)
        case .settle(let batch): result = applySettle(batch, signer: tx.signer, height: context.height, tx: id, commit: commit)
        case .challengeSettlement(let c): result = applyChallenge(c, signer: tx.signer, commit: commit)
        case .nodeSettle(let n): result = applyNodeSettle(n, signer: tx.signer, height: context.height, tx: id, commit: commit)
        case .dataRequest(let r): result = applyDataRequest(r, signer: tx.signer, height: context.height, tx: id, commit: commit)
        case .dataResponse(let r): result = applyDataResponse(r, signer: tx.signer, height: context.height, commit: commit)
        case .omissionQuery(let q): result = applyOmissionQuery(q, signer: tx.signer, height: context.height, tx: id, commit: commit)
        case .omissionAnswer(let a): result = applyOmissionAnswer(a, signer: tx.signer, height: context.height, commit: commit)
        }
        switch result {
        case .failure(let error):
            return .failure(error)
        case .success(let (fee, effect)):
            guard commit else { return .success(TxOutcome(id: id, location: context.location, fee: fee, effect: effect)) }
            burn(fee.baseUnits)  // fees are burned
            dedup[id] = DedupEntry(location: context.location, createdAtMillis: body.createdAtMillis)
            dedupBuckets[body.createdAtMillis / Self.dedupBucketMillis, default: []].append(id)
            return .success(TxOutcome(id: id, location: context.location, fee: fee, effect: effect))
        }
    }

    // MARK: Balances

    func checkAffordable(_ account: Account, _ amount: UInt64, fee: UInt64) -> LedgerError? {
        let balance = balances[account] ?? 0
        let (total, overflow) = amount.addingReportingOverflow(fee)
        if overflow { return .insufficientFunds(balance: Amount(baseUnits: balance)) }
        return balance >= total ? nil : .insufficientFunds(balance: Amount(baseUnits: balance))
    }

    mutating func debit(_ account: Account, _ amount: UInt64) {
        let remaining = balances[account, default: 0] - amount
        // Zero balances are dropped so that the state (and its root) holds no empty accounts.
        balances[account] = remaining == 0 ? nil : remaining
    }

    /// Takes `amount` out of the supply for good (fees, slashes, protocol fees). Callers burn only what they
    /// have just taken out of a balance, stake or escrow, so it is ≤ the supply.
    mutating func burn(_ amount: UInt64) {
        totalSupply = Amount(baseUnits: totalSupply.baseUnits - amount)
        burned = Amount(baseUnits: burned.baseUnits + amount)
    }

    mutating func credit(_ account: Account, _ amount: UInt64) {
        guard amount > 0 else { return }
        balances[account, default: 0] += amount
    }

    // MARK: Transfers (ICRC-1)

    private mutating func applyTransfer(_ t: Transfer, signer: PublicKey, commit: Bool) -> Result<(fee: Amount, effect: TxEffect), LedgerError> {
        let from = Account(owner: signer, subaccount: t.fromSubaccount)
        if let memo = t.memo, memo.count > Int(parameters.maxMemoBytes) {
            return .failure(.genericError(code: LedgerError.GenericCode.memoTooLong,
                                          message: "memo is \(memo.count) bytes; the limit is \(parameters.maxMemoBytes)"))
        }
        if t.to == .minting {
            // ICRC-1 burn: no fee, and at least the transfer fee in amount.
            if let fee = t.fee, fee != .zero { return .failure(.badFee(expectedFee: .zero)) }
            guard t.amount >= parameters.transferFee else { return .failure(.badBurn(minBurnAmount: parameters.transferFee)) }
            if let error = checkAffordable(from, t.amount.baseUnits, fee: 0) { return .failure(error) }
            guard commit else { return .success((.zero, .burned(from: from, amount: t.amount))) }
            debit(from, t.amount.baseUnits)
            totalSupply = Amount(baseUnits: totalSupply.baseUnits - t.amount.baseUnits)
            burned = Amount(baseUnits: burned.baseUnits + t.amount.baseUnits)
            return .success((.zero, .burned(from: from, amount: t.amount)))
        }
        let fee = parameters.transferFee
        if let given = t.fee, given != fee { return .failure(.badFee(expectedFee: fee)) }
        if let error = checkAffordable(from, t.amount.baseUnits, fee: fee.baseUnits) { return .failure(error) }
        guard commit else { return .success((fee, .transferred(from: from, to: t.to, amount: t.amount))) }
        debit(from, t.amount.baseUnits + fee.baseUnits)
        credit(t.to, t.amount.baseUnits)
        return .success((fee, .transferred(from: from, to: t.to, amount: t.amount)))
    }

    // MARK: Staking

    private mutating func applyBond(_ b: Bond, signer: PublicKey, now: UInt64, commit: Bool) -> Result<(fee: Amount, effect: TxEffect), LedgerError> {
        let from = Account(owner: signer, subaccount: b.fromSubaccount)
        let requirement = parameters.staking.requirement(for: b.role)
        guard b.amount >= requirement.minimumStake else {
            return .failure(.stakeBelowMinimum(role: b.role, minimum: requirement.minimumStake, got: b.amount))
        }
        guard b.lockDays >= requirement.minimumLockDays else {
            return .failure(.lockTooShort(role: b.role, minimumDays: requirement.minimumLockDays, got: b.lockDays))
        }
        let fee = parameters.transferFee
        if let error = checkAffordable(from, b.amount.baseUnits, fee: fee.baseUnits) { return .failure(error) }
        let id = nextStakeID
        guard commit else { return .success((fee, .bonded(stakeID: id))) }
        nextStakeID += 1
        debit(from, b.amount.baseUnits + fee.baseUnits)
        stakes[id] = Stake(id: id, owner: from, role: b.role, amount: b.amount, lockDays: b.lockDays, bondedAtMillis: now,
                           unlocksAtMillis: now.addingSaturating(UInt64(b.lockDays) * LedgerParameters.millisPerDay), status: .bonded)
        return .success((fee, .bonded(stakeID: id)))
    }

    private mutating func applyUnbond(_ id: UInt64, signer: PublicKey, commit: Bool) -> Result<(fee: Amount, effect: TxEffect), LedgerError> {
        guard var stake = stakes[id] else { return .failure(.unknownStake(id: id)) }
        guard stake.owner.owner == signer else { return .failure(.notStakeOwner(id: id)) }
        guard stake.status == .bonded else { return .failure(.stakeNotBonded(id: id)) }
        if let user = stakeUsers[id] { return .failure(.stakeInUse(id: id, nodeKey: user)) }
        let fee = parameters.transferFee
        if let error = checkAffordable(stake.owner, 0, fee: fee.baseUnits) { return .failure(error) }
        guard commit else { return .success((fee, .unbonded(stakeID: id, withdrawableAtMillis: stake.unlocksAtMillis))) }
        debit(stake.owner, fee.baseUnits)
        stake.status = .unbonding
        stakes[id] = stake
        return .success((fee, .unbonded(stakeID: id, withdrawableAtMillis: stake.unlocksAtMillis)))
    }

    private mutating func applyWithdraw(_ id: UInt64, signer: PublicKey, now: UInt64, commit: Bool) -> Result<(fee: Amount, effect: TxEffect), LedgerError> {
        guard let stake = stakes[id] else { return .failure(.unknownStake(id: id)) }
        guard stake.owner.owner == signer else { return .failure(.notStakeOwner(id: id)) }
        guard stake.status == .unbonding else { return .failure(.stakeNotUnbonded(id: id)) }
        guard now >= stake.unlocksAtMillis else { return .failure(.stakeLocked(id: id, unlocksAtMillis: stake.unlocksAtMillis)) }
        // The fee may come out of the returned stake itself.
        let fee = parameters.transferFee
        let balance = balances[stake.owner] ?? 0
        guard balance + stake.amount.baseUnits >= fee.baseUnits else {
            return .failure(.insufficientFunds(balance: Amount(baseUnits: balance)))
        }
        guard commit else { return .success((fee, .withdrawn(stakeID: id, amount: stake.amount, to: stake.owner))) }
        credit(stake.owner, stake.amount.baseUnits)
        debit(stake.owner, fee.baseUnits)
        stakes[id] = nil
        return .success((fee, .withdrawn(stakeID: id, amount: stake.amount, to: stake.owner)))
    }

    /// A stake may back a node of `role` owned by `owner` (ignoring `exceptNode`, the node being updated).
    private func checkBacking(stakeID: UInt64, owner: PublicKey, role: NodeRole, exceptNode: PublicKey?) -> LedgerError? {
        guard let stake = stakes[stakeID] else { return .unknownStake(id: stakeID) }
        guard stake.owner.owner == owner else { return .notStakeOwner(id: stakeID) }
        guard stake.status == .bonded else { return .stakeNotBonded(id: stakeID) }
        guard stake.role == role else { return .stakeRoleMismatch(id: stakeID, stakeRole: stake.role, nodeRole: role) }
        if let user = stakeUsers[stakeID], user != exceptNode { return .stakeInUse(id: stakeID, nodeKey: user) }
        return nil
    }

    // MARK: Node registry

    private mutating func applyRegister(_ r: NodeRegistration, signer: PublicKey, location: TxLocation, commit: Bool) -> Result<(fee: Amount, effect: TxEffect), LedgerError> {
        let s = r.statement
        // Both signatures: the envelope (owner) was checked already; the node key must have signed a statement
        // naming this owner on this chain, so nobody can register a node id they do not hold.
        guard s.owner == signer, s.chainID == chainID else { return .failure(.registrationOwnerMismatch) }
        guard r.hasValidNodeSignature else { return .failure(.badNodeSignature) }
        if let problem = NodeRegistrationStatement.endpointProblem(s.endpoints) { return .failure(.invalidEndpoints(problem)) }
        guard nodes[s.nodeKey] == nil else { return .failure(.nodeAlreadyRegistered(nodeKey: s.nodeKey)) }
        if let error = checkBacking(stakeID: s.stakeID, owner: signer, role: s.role, exceptNode: nil) { return .failure(error) }
        let fee = parameters.transferFee
        let payer = Account(owner: signer)
        if let error = checkAffordable(payer, 0, fee: fee.baseUnits) { return .failure(error) }
        guard commit else { return .success((fee, .nodeRegistered(nodeKey: s.nodeKey))) }
        debit(payer, fee.baseUnits)
        nodes[s.nodeKey] = NodeRecord(nodeKey: s.nodeKey, owner: signer, role: s.role, endpoints: s.endpoints,
                                      stakeID: s.stakeID, registeredAt: location, status: .active)
        stakeUsers[s.stakeID] = s.nodeKey
        return .success((fee, .nodeRegistered(nodeKey: s.nodeKey)))
    }

    private mutating func applyUpdate(_ u: NodeUpdate, signer: PublicKey, commit: Bool) -> Result<(fee: Amount, effect: TxEffect), LedgerError> {
        guard var node = nodes[u.nodeKey] else { return .failure(.unknownNode(nodeKey: u.nodeKey)) }
        guard node.owner == signer else { return .failure(.notNodeOwner(nodeKey: u.nodeKey)) }
        guard node.status == .active else { return .failure(.nodeRetired(nodeKey: u.nodeKey)) }
        if let endpoints = u.endpoints, let problem = NodeRegistrationStatement.endpointProblem(endpoints) {
            return .failure(.invalidEndpoints(problem))
        }
        if let stakeID = u.stakeID,
           let error = checkBacking(stakeID: stakeID, owner: signer, role: node.role, exceptNode: u.nodeKey) {
            return .failure(error)
        }
        let fee = parameters.transferFee
        let payer = Account(owner: signer)
        if let error = checkAffordable(payer, 0, fee: fee.baseUnits) { return .failure(error) }
        guard commit else { return .success((fee, .nodeUpdated(nodeKey: u.nodeKey))) }
        debit(payer, fee.baseUnits)
        if let endpoints = u.endpoints { node.endpoints = endpoints }
        if let stakeID = u.stakeID {
            stakeUsers[node.stakeID] = nil
            node.stakeID = stakeID
            stakeUsers[stakeID] = u.nodeKey
        }
        nodes[u.nodeKey] = node
        return .success((fee, .nodeUpdated(nodeKey: u.nodeKey)))
    }

    private mutating func applyRetire(_ key: PublicKey, signer: PublicKey, commit: Bool) -> Result<(fee: Amount, effect: TxEffect), LedgerError> {
        guard var node = nodes[key] else { return .failure(.unknownNode(nodeKey: key)) }
        guard node.owner == signer else { return .failure(.notNodeOwner(nodeKey: key)) }
        guard node.status == .active else { return .failure(.nodeRetired(nodeKey: key)) }
        let fee = parameters.transferFee
        let payer = Account(owner: signer)
        if let error = checkAffordable(payer, 0, fee: fee.baseUnits) { return .failure(error) }
        guard commit else { return .success((fee, .nodeRetired(nodeKey: key))) }
        debit(payer, fee.baseUnits)
        node.status = .retired
        nodes[key] = node
        stakeUsers[node.stakeID] = nil
        return .success((fee, .nodeRetired(nodeKey: key)))
    }

    // MARK: Slashing

    /// Burns `fractionBps` of the stake behind validator `nodeKey` (also while unbonding or retired: the stake is
    /// slashable until withdrawn). With `evidenceID`, the same evidence never slashes twice. If the stake falls
    /// below the validator minimum, the validator leaves the set at the next epoch boundary.
    public mutating func slash(validator nodeKey: PublicKey, fractionBps: UInt32, evidenceID: Hash32? = nil) -> Result<SlashOutcome, LedgerError> {
        guard let node = nodes[nodeKey], node.role == .validator, var stake = stakes[node.stakeID] else {
            return .failure(.unknownValidator(nodeKey: nodeKey))
        }
        if let evidenceID, usedEvidence.contains(evidenceID) { return .failure(.evidenceAlreadyUsed(evidenceID)) }
        let product = stake.amount.baseUnits.multipliedFullWidth(by: UInt64(min(fractionBps, 10_000)))
        let slashed = UInt64(10_000).dividingFullWidth(product).quotient
        stake.amount = Amount(baseUnits: stake.amount.baseUnits - slashed)
        stakes[stake.id] = stake
        burn(slashed)
        if let evidenceID { usedEvidence.insert(evidenceID) }
        return .success(SlashOutcome(validator: nodeKey, stakeID: stake.id, slashed: Amount(baseUnits: slashed), remaining: stake.amount))
    }

    // MARK: Blocks and epochs

    /// Start of a block: forgets deduplication entries that can only be TooOld from now on.
    public mutating func beginBlock(_ context: BlockContext) {
        let cutoff = context.timeMillis.subtractingSaturating(parameters.dedupWindowMillis.addingSaturating(parameters.permittedDriftMillis))
        // A bucket goes once all of it is older than the cutoff; the result does not depend on iteration order.
        for bucket in dedupBuckets.keys where (bucket + 1) * Self.dedupBucketMillis <= cutoff {
            for id in dedupBuckets[bucket] ?? [] { dedup[id] = nil }
            dedupBuckets[bucket] = nil
        }
    }

    /// The deterministic per-height step, run after the block's transactions and before `endBlock`: everything
    /// that falls due at `height` happens here, in a fixed order (docs/SETTLEMENT.md § 5): escrow withdrawals,
    /// then data requests whose deadline passed unanswered (the pair's charge reverts), then omission queries left
    /// unanswered (upheld), then settlements whose challenge window ends (money moves), then routers whose settlement deadline passed
    /// (their nodes' notices settle), then node payouts whose audit window ends.
    /// Nothing here may read a clock or depend on dictionary order.
    public mutating func finishHeight(_ height: UInt64) -> [BlockEvent] {
        var events = [BlockEvent]()
        events += returnDueEscrows(height: height)
        events += resolveDueDataRequests(height: height)
        events += resolveDueOmissionQueries(height: height)
        events += finaliseDueSettlements(height: height)
        events += defaultLateRouters(height: height)
        events += releaseDuePayouts(height: height)
        return events
    }

    /// End of a block: at an epoch boundary the validator set is recomputed from stakes and registrations and
    /// the changes are returned (power 0 = removed), ordered by node key; otherwise nothing changes.
    public mutating func endBlock(height: UInt64) -> [StakedValidator] {
        guard isEpochBoundary(height) else { return [] }
        let next = selectValidators()
        // A chain without validators could never make another block; keep the current set instead.
        guard !next.isEmpty else { return [] }
        var nextPowers = [PublicKey: UInt64]()
        for v in next { nextPowers[v.nodeKey] = v.power }
        var updates = [StakedValidator]()
        for key in Set(nextPowers.keys).union(activeValidators.keys) where nextPowers[key] != activeValidators[key] {
            updates.append(StakedValidator(nodeKey: key, power: nextPowers[key] ?? 0))
        }
        activeValidators = nextPowers
        return updates.sorted { $0.nodeKey.rawRepresentation.lexicographicallyPrecedes($1.nodeKey.rawRepresentation) }
    }

    /// The validator set the current stakes call for: active validator nodes whose stake is bonded and at least
    /// the minimum, highest power first (ties by node key), at most `maxValidators`.
    func selectValidators() -> [StakedValidator] {
        let minimum = parameters.staking.validator.minimumStake
        var candidates = [StakedValidator]()
        for node in nodes.values where node.role == .validator && node.status == .active {
            guard let stake = stakes[node.stakeID], stake.status == .bonded, stake.amount >= minimum else { continue }
            let power = stake.power(parameters.staking).scaled
            if power > 0 { candidates.append(StakedValidator(nodeKey: node.nodeKey, power: power)) }
        }
        candidates.sort {
            $0.power != $1.power ? $0.power > $1.power
                : $0.nodeKey.rawRepresentation.lexicographicallyPrecedes($1.nodeKey.rawRepresentation)
        }
        return Array(candidates.prefix(Int(parameters.staking.maxValidators)))
    }

    /// Executes a whole block: begin (dedup pruning), misbehaviour slashing, every transaction in order, end
    /// (epoch validator changes), then the state root. Heights must follow one another and time must not go back.
    public mutating func applyBlock(txs: [Transaction], misbehaviour: [Misbehaviour] = [], context: BlockContext) throws(BlockError) -> BlockResult {
        try runBlock(txs.map { .success($0) }, misbehaviour: misbehaviour, context: context)
    }

    /// `applyBlock` over wire bytes; an undecodable entry is a `.malformed` result at its position and changes nothing.
    public mutating func applyBlock(rawTxs: [[UInt8]], misbehaviour: [Misbehaviour] = [], context: BlockContext) throws(BlockError) -> BlockResult {
        let entries: [Result<Transaction, LedgerError>] = rawTxs.map { bytes in
            do throws(TransactionDecodingError) { return .success(try Transaction(decoding: bytes)) } catch { return .failure(.malformed(error.description)) }
        }
        return try runBlock(entries, misbehaviour: misbehaviour, context: context)
    }

    private mutating func runBlock(_ entries: [Result<Transaction, LedgerError>], misbehaviour: [Misbehaviour],
                                   context: BlockContext) throws(BlockError) -> BlockResult {
        guard context.height == height + 1 else { throw .unexpectedHeight(expected: height + 1, got: context.height) }
        guard context.timeMillis >= lastBlockTimeMillis else {
            throw .timeWentBackwards(previousMillis: lastBlockTimeMillis, gotMillis: context.timeMillis)
        }
        beginBlock(context)
        let slashes = misbehaviour.map {
            slash(validator: $0.validator, fractionBps: parameters.slashFractionBps, evidenceID: $0.evidenceID)
        }
        var results = [TxResult]()
        results.reserveCapacity(entries.count)
        for (i, entry) in entries.enumerated() {
            switch entry {
            case .success(let tx):
                results.append(apply(tx, context: BlockContext(height: context.height, timeMillis: context.timeMillis, txIndex: UInt32(i))))
            case .failure(let error):
                results.append(.failure(error))
            }
        }
        let events = finishHeight(context.height)
        let updates = endBlock(height: context.height)
        height = context.height
        lastBlockTimeMillis = context.timeMillis
        return BlockResult(txResults: results, slashes: slashes, validatorUpdates: updates, events: events, stateRoot: stateRoot())
    }
}

public struct BlockResult: Sendable {
    public var txResults: [TxResult]
    public var slashes: [Result<SlashOutcome, LedgerError>]
    /// Non-empty only at epoch boundaries.
    public var validatorUpdates: [StakedValidator]
    /// What the ledger did by itself at the end of the block (escrow returns; settlements as they finish), in order.
    public var events: [BlockEvent]
    public var stateRoot: Hash32
}

public enum BlockError: Error, Hashable, Sendable, CustomStringConvertible {
    case unexpectedHeight(expected: UInt64, got: UInt64)
    case timeWentBackwards(previousMillis: UInt64, gotMillis: UInt64)

    public var description: String {
        switch self {
        case .unexpectedHeight(let expected, let got): "block height \(got) does not follow the ledger's height; expected \(expected)"
        case .timeWentBackwards(let previous, let got): "block time \(got) ms is before the previous block's \(previous) ms"
        }
    }
}

extension UInt64 {
    func addingSaturating(_ other: UInt64) -> UInt64 {
        let (sum, overflow) = addingReportingOverflow(other)
        return overflow ? .max : sum
    }

    func subtractingSaturating(_ other: UInt64) -> UInt64 { self > other ? self - other : 0 }
}
