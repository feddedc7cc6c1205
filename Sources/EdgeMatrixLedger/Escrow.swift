import EdgeMatrixCore

/// Opens an escrow of the signer's (sub)account with a router, or tops it up: `amount` moves from the account into
/// the escrow. Refused when it would take the router's total escrow above k × its bonded stake. A top-up cancels a
/// withdrawal that is waiting.
public struct EscrowOpen: Hashable, Sendable {
    public var fromSubaccount: Subaccount?
    /// The router's node key.
    public var router: PublicKey
    public var amount: Amount

    public init(fromSubaccount: Subaccount? = nil, router: PublicKey, amount: Amount) {
        self.fromSubaccount = (fromSubaccount?.isDefault ?? true) ? nil : fromSubaccount
        self.router = router
        self.amount = amount
    }
}

/// Asks for the escrow of the signer's (sub)account with a router back. One transaction: after
/// `escrowWithdrawDelayBlocks` (one epoch plus the challenge window) the ledger itself returns what is then
/// neither spent nor pending to the account, at the end of that block.
public struct EscrowWithdraw: Hashable, Sendable {
    public var subaccount: Subaccount?
    public var router: PublicKey

    public init(subaccount: Subaccount? = nil, router: PublicKey) {
        self.subaccount = (subaccount?.isDefault ?? true) ? nil : subaccount
        self.router = router
    }
}

/// Sets a compute node's price list (replacing the old one). Signed by the node's owner.
public struct SetPrices: Hashable, Sendable {
    public var nodeKey: PublicKey
    public var prices: PriceList

    public init(nodeKey: PublicKey, prices: PriceList) {
        self.nodeKey = nodeKey
        self.prices = prices
    }
}

/// Sets a router's fee in basis points of what it settles. Signed by the router node's owner.
public struct SetRouterFee: Hashable, Sendable {
    public var nodeKey: PublicKey
    public var feeBps: UInt32

    public init(nodeKey: PublicKey, feeBps: UInt32) {
        self.nodeKey = nodeKey
        self.feeBps = feeBps
    }
}

/// An escrow is keyed by the paying account and the router's node key.
public struct EscrowKey: Hashable, Sendable, Comparable {
    public var payer: Account
    public var router: PublicKey

    public init(payer: Account, router: PublicKey) {
        self.payer = payer
        self.router = router
    }

    /// Canonical key bytes: payer (Account encoding) ‖ router raw[32]. Sorting by them orders by payer, then router.
    public var keyBytes: [UInt8] { payer.canonicalBytes + router.rawRepresentation }

    public static func < (lhs: EscrowKey, rhs: EscrowKey) -> Bool { lhs.keyBytes.lexicographicallyPrecedes(rhs.keyBytes) }
}

/// EMC a payer holds with one router to pay for requests.
///
/// - `balance`: everything in the escrow, `pending` included;
/// - `pending`: moved there by settlements that are still inside their challenge window (spent unless reverted);
/// - `available` = balance − pending: what a router may still charge, and what a withdrawal returns;
/// - `withdrawableAtHeight`: set by a withdrawal request; at the end of that block `available` goes back to the payer.
public struct Escrow: Hashable, Sendable {
    public let payer: Account
    public let router: PublicKey
    public internal(set) var balance: Amount
    public internal(set) var pending: Amount
    public internal(set) var withdrawableAtHeight: UInt64?

    public init(payer: Account, router: PublicKey, balance: Amount = .zero, pending: Amount = .zero, withdrawableAtHeight: UInt64? = nil) {
        self.payer = payer
        self.router = router
        self.balance = balance
        self.pending = pending
        self.withdrawableAtHeight = withdrawableAtHeight
    }

    public var key: EscrowKey { EscrowKey(payer: payer, router: router) }
    /// `pending ≤ balance` always holds; the subtraction saturates rather than trap should it ever not.
    public var available: Amount { Amount(baseUnits: balance.baseUnits.subtractingSaturating(pending.baseUnits)) }
}

/// What the ledger did on its own at the end of a block (not caused by a transaction of that block).
public enum BlockEvent: Hashable, Sendable {
    /// A requested escrow withdrawal came due: `amount` went back to the payer; `remaining` stays (pending).
    case escrowReturned(payer: Account, router: PublicKey, amount: Amount, remaining: Amount)
    /// A settlement's challenge window ended: its escrow charges were spent, `routerFees` paid to the router
    /// owner and `burned` (protocol fees, plus any share without a recipient) burned; node shares are now held.
    case settlementFinal(SettlementKey, total: Amount, routerFees: Amount, burned: Amount)
    /// A held node share came out of its audit window and was paid to the node owner.
    case payoutReleased(HeldPayout)
    /// `router` missed a settlement deadline: its open notices (`receipts` of them) settled, `paid` leaving the
    /// escrows, `burned` of it burned (protocol fees); the node shares are now held.
    case routerDefaulted(router: PublicKey, receipts: UInt64, paid: Amount, burned: Amount)
    /// A data request's deadline passed unanswered: `reverted` went back to the payer's escrow and the router was
    /// slashed `slashed` (`reward` to the requester, `compensation` to the node owner, the rest burned).
    case dataWithheld(DataRequestKey, reverted: Amount, slashed: Amount, reward: Amount, compensation: Amount)
    /// An omission query's deadline passed unanswered: the router was slashed `slashed` (`compensation` to the node
    /// owner for the receipt's worth, `reward` to the querier, the rest burned).
    case omissionUpheld(OmissionQueryKey, slashed: Amount, reward: Amount, compensation: Amount)
}

// MARK: - Applying escrow and pricing transactions

extension LedgerState {
    typealias Applied = Result<(fee: Amount, effect: TxEffect), LedgerError>

    /// The most escrow `router` may hold in total: k × its bonded router stake (0 without one), saturating.
    public func escrowCap(router: PublicKey) -> Amount {
        guard let node = nodes[router], node.role == .router, node.status == .active,
              let stake = stakes[node.stakeID], stake.status == .bonded, stake.role == .router else { return .zero }
        let (cap, overflow) = stake.amount.baseUnits.multipliedReportingOverflow(by: UInt64(parameters.routerEscrowCapMultiple))
        return Amount(baseUnits: overflow ? .max : cap)
    }

    /// Total escrow (pending included) that all payers hold with `router`.
    public func escrowHeld(router: PublicKey) -> Amount { Amount(baseUnits: routerEscrowTotals[router] ?? 0) }

    /// The escrow of `payer` with `router`, if any.
    public func escrow(payer: Account, router: PublicKey) -> Escrow? { escrows[EscrowKey(payer: payer, router: router)] }

    /// Every escrow of exactly this account, ordered by router key bytes.
    public func escrows(of payer: Account) -> [Escrow] {
        escrows.values.filter { $0.payer == payer }.sorted { $0.key < $1.key }
    }

    /// Every escrow held with `router`, ordered by payer.
    public func escrows(withRouter router: PublicKey) -> [Escrow] {
        escrows.values.filter { $0.router == router }.sorted { $0.key < $1.key }
    }

    /// A node that must exist, be active and have `role` (the escrow's router, a priced compute node, …).
    func activeNode(_ key: PublicKey, role: NodeRole) -> Result<NodeRecord, LedgerError> {
        guard let node = nodes[key] else { return .failure(.unknownNode(nodeKey: key)) }
        guard node.status == .active else { return .failure(.nodeRetired(nodeKey: key)) }
        guard node.role == role else { return .failure(.wrongNodeRole(nodeKey: key, role: node.role, expected: role)) }
        return .success(node)
    }

    mutating func applyEscrowOpen(_ o: EscrowOpen, signer: PublicKey, commit: Bool) -> Applied {
        let payer = Account(owner: signer, subaccount: o.fromSubaccount)
        guard o.amount > .zero else { return .failure(.zeroAmount(field: "amount")) }
        if case .failure(let error) = activeNode(o.router, role: .router) { return .failure(error) }
        if let height = routerDefaults[o.router] { return .failure(.routerDefaulted(router: o.router, atHeight: height)) }
        let cap = escrowCap(router: o.router).baseUnits
        let held = routerEscrowTotals[o.router] ?? 0
        let (total, overflow) = held.addingReportingOverflow(o.amount.baseUnits)
        guard !overflow, total <= cap else {
            return .failure(.escrowCapExceeded(router: o.router, cap: Amount(baseUnits: cap), held: Amount(baseUnits: held)))
        }
        let fee = parameters.transferFee
        if let error = checkAffordable(payer, o.amount.baseUnits, fee: fee.baseUnits) { return .failure(error) }
        let key = EscrowKey(payer: payer, router: o.router)
        var escrow = escrows[key] ?? Escrow(payer: payer, router: o.router)
        guard let balance = escrow.balance.adding(o.amount) else {
            return .failure(.genericError(code: LedgerError.GenericCode.amountOverflow, message: "the escrow balance would overflow"))
        }
        escrow.balance = balance
        escrow.withdrawableAtHeight = nil  // a top-up cancels a waiting withdrawal
        let effect = TxEffect.escrowOpened(payer: payer, router: o.router, amount: o.amount, balance: balance)
        guard commit else { return .success((fee, effect)) }
        debit(payer, o.amount.baseUnits + fee.baseUnits)
        escrows[key] = escrow
        routerEscrowTotals[o.router] = total
        return .success((fee, effect))
    }

    mutating func applyEscrowWithdraw(_ w: EscrowWithdraw, signer: PublicKey, height: UInt64, commit: Bool) -> Applied {
        let payer = Account(owner: signer, subaccount: w.subaccount)
        let key = EscrowKey(payer: payer, router: w.router)
        guard var escrow = escrows[key] else { return .failure(.unknownEscrow(payer: payer, router: w.router)) }
        if let due = escrow.withdrawableAtHeight { return .failure(.escrowWithdrawalPending(router: w.router, withdrawableAtHeight: due)) }
        guard escrow.available > .zero else { return .failure(.escrowNothingAvailable(router: w.router, pending: escrow.pending)) }
        let (due, overflow) = height.addingReportingOverflow(parameters.escrowWithdrawDelayBlocks)
        guard !overflow else {
            return .failure(.genericError(code: LedgerError.GenericCode.amountOverflow, message: "the withdrawal height would overflow"))
        }
        // The fee comes from the account, or out of the escrow itself when the account cannot pay it.
        let fee = parameters.transferFee
        let feeFromEscrow = checkAffordable(payer, 0, fee: fee.baseUnits) != nil
        if feeFromEscrow, escrow.available.baseUnits <= fee.baseUnits {
            return .failure(.insufficientFunds(balance: balance(of: payer)))
        }
        let effect = TxEffect.escrowWithdrawalRequested(payer: payer, router: w.router, withdrawableAtHeight: due)
        guard commit else { return .success((fee, effect)) }
        if feeFromEscrow {
            escrow.balance = Amount(baseUnits: escrow.balance.baseUnits - fee.baseUnits)
            let total = (routerEscrowTotals[w.router] ?? 0).subtractingSaturating(fee.baseUnits)
            routerEscrowTotals[w.router] = total == 0 ? nil : total
        } else {
            debit(payer, fee.baseUnits)
        }
        escrow.withdrawableAtHeight = due
        escrows[key] = escrow
        escrowWithdrawalsDue[due, default: []].append(key)
        return .success((fee, effect))
    }

    mutating func applySetPrices(_ s: SetPrices, signer: PublicKey, commit: Bool) -> Applied {
        guard var node = nodes[s.nodeKey] else { return .failure(.unknownNode(nodeKey: s.nodeKey)) }
        guard node.owner == signer else { return .failure(.notNodeOwner(nodeKey: s.nodeKey)) }
        if case .failure(let error) = activeNode(s.nodeKey, role: .compute) { return .failure(error) }
        if let (field, reason) = s.prices.problem() { return .failure(.invalidPriceList(field: field, reason: reason)) }
        let fee = parameters.transferFee
        let payer = Account(owner: signer)
        if let error = checkAffordable(payer, 0, fee: fee.baseUnits) { return .failure(error) }
        let effect = TxEffect.pricesSet(nodeKey: s.nodeKey, entries: UInt32(clamping: s.prices.entries.count))
        guard commit else { return .success((fee, effect)) }
        debit(payer, fee.baseUnits)
        node.priorPrices = node.prices
        node.prices = s.prices
        nodes[s.nodeKey] = node
        return .success((fee, effect))
    }

    mutating func applySetRouterFee(_ s: SetRouterFee, signer: PublicKey, commit: Bool) -> Applied {
        guard var node = nodes[s.nodeKey] else { return .failure(.unknownNode(nodeKey: s.nodeKey)) }
        guard node.owner == signer else { return .failure(.notNodeOwner(nodeKey: s.nodeKey)) }
        if case .failure(let error) = activeNode(s.nodeKey, role: .router) { return .failure(error) }
        // The node's share, amount − router fee − protocol fee, must never be negative.
        let maximum = 10_000 - min(parameters.protocolFeeBps, 10_000)
        guard s.feeBps <= maximum else { return .failure(.invalidRouterFee(got: s.feeBps, maximum: maximum)) }
        let fee = parameters.transferFee
        let payer = Account(owner: signer)
        if let error = checkAffordable(payer, 0, fee: fee.baseUnits) { return .failure(error) }
        let effect = TxEffect.routerFeeSet(nodeKey: s.nodeKey, feeBps: s.feeBps)
        guard commit else { return .success((fee, effect)) }
        debit(payer, fee.baseUnits)
        node.routerFeeBps = s.feeBps
        nodes[s.nodeKey] = node
        return .success((fee, effect))
    }

    // MARK: Settlement hooks

    /// A settlement's charge at inclusion: `amount` of the escrow's `available` becomes `pending`. With
    /// `commit == false` only checks. Refused (changing nothing) without such an escrow or with too little available.
    mutating func escrowCharge(_ key: EscrowKey, _ amount: Amount, commit: Bool = true) -> LedgerError? {
        guard var escrow = escrows[key] else { return .unknownEscrow(payer: key.payer, router: key.router) }
        guard amount <= escrow.available else {
            return .escrowInsufficient(payer: key.payer, router: key.router, available: escrow.available, needed: amount)
        }
        guard commit else { return nil }
        escrow.pending = Amount(baseUnits: escrow.pending.baseUnits + amount.baseUnits)  // ≤ balance, so no overflow
        escrows[key] = escrow
        return nil
    }

    /// A charge that stood its challenge window: `amount` leaves the escrow (from `pending` and `balance`) and is
    /// returned for the caller to split. An escrow left at 0 is deleted. Refused (changing nothing) if `amount`
    /// is more than is pending.
    mutating func escrowSpend(_ key: EscrowKey, _ amount: Amount) -> LedgerError? {
        guard var escrow = escrows[key], amount <= escrow.pending else {
            return .escrowInsufficient(payer: key.payer, router: key.router, available: escrows[key]?.pending ?? .zero, needed: amount)
        }
        escrow.pending = Amount(baseUnits: escrow.pending.baseUnits - amount.baseUnits)
        escrow.balance = Amount(baseUnits: escrow.balance.baseUnits - amount.baseUnits)
        let total = (routerEscrowTotals[key.router] ?? 0).subtractingSaturating(amount.baseUnits)
        routerEscrowTotals[key.router] = total == 0 ? nil : total
        escrows[key] = escrow.balance == .zero && escrow.withdrawableAtHeight == nil ? nil : escrow
        return nil
    }

    /// A charge that was reverted by a challenge: `amount` goes from `pending` back to `available`.
    mutating func escrowUncharge(_ key: EscrowKey, _ amount: Amount) -> LedgerError? {
        guard var escrow = escrows[key], amount <= escrow.pending else {
            return .escrowInsufficient(payer: key.payer, router: key.router, available: escrows[key]?.pending ?? .zero, needed: amount)
        }
        escrow.pending = Amount(baseUnits: escrow.pending.baseUnits - amount.baseUnits)
        escrows[key] = escrow
        return nil
    }

    // MARK: End of block

    /// Returns the escrows whose withdrawal comes due at `height`: each gets its `available` back; an escrow left
    /// empty is removed. Processed in escrow-key order, so the result never depends on dictionary order.
    mutating func returnDueEscrows(height: UInt64) -> [BlockEvent] {
        guard let due = escrowWithdrawalsDue.removeValue(forKey: height) else { return [] }
        var events = [BlockEvent]()
        for key in Set(due).sorted() {
            // A top-up since the request cancelled it (and a later request is due at another height).
            guard var escrow = escrows[key], escrow.withdrawableAtHeight == height else { continue }
            let amount = escrow.available
            escrow.balance = escrow.pending
            escrow.withdrawableAtHeight = nil
            credit(key.payer, amount.baseUnits)
            let total = (routerEscrowTotals[key.router] ?? 0).subtractingSaturating(amount.baseUnits)
            routerEscrowTotals[key.router] = total == 0 ? nil : total
            escrows[key] = escrow.balance == .zero ? nil : escrow
            events.append(.escrowReturned(payer: key.payer, router: key.router, amount: amount, remaining: escrow.balance))
        }
        return events
    }
}
