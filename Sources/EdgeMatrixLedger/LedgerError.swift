import EdgeMatrixCore

/// Where a transaction sits on chain: block height and position in the block.
public struct TxLocation: Hashable, Comparable, Sendable, Codable, CustomStringConvertible {
    public var height: UInt64
    public var index: UInt32

    public init(height: UInt64, index: UInt32) {
        self.height = height
        self.index = index
    }

    public var description: String { "block \(height) tx \(index)" }
    public static func < (lhs: TxLocation, rhs: TxLocation) -> Bool { (lhs.height, lhs.index) < (rhs.height, rhs.index) }
}

/// Why a transaction was refused. The first six are ICRC-1's TransferError kinds with their payloads;
/// the rest cover signatures, staking and the node registry. A refused transaction changes nothing.
public enum LedgerError: Error, Hashable, Sendable, CustomStringConvertible {
    // ICRC-1
    case badFee(expectedFee: Amount)
    case badBurn(minBurnAmount: Amount)
    case insufficientFunds(balance: Amount)
    case tooOld
    case createdInFuture(ledgerTime: UInt64)
    case duplicate(duplicateOf: TxLocation)
    case genericError(code: UInt64, message: String)
    // Envelope
    case malformed(String)
    case badSignature
    case wrongChain(expected: String, got: String)
    // Staking
    case stakeBelowMinimum(role: NodeRole, minimum: Amount, got: Amount)
    case lockTooShort(role: NodeRole, minimumDays: UInt32, got: UInt32)
    case unknownStake(id: UInt64)
    case notStakeOwner(id: UInt64)
    case stakeNotBonded(id: UInt64)
    case stakeNotUnbonded(id: UInt64)
    case stakeLocked(id: UInt64, unlocksAtMillis: UInt64)
    case stakeInUse(id: UInt64, nodeKey: PublicKey)
    case stakeRoleMismatch(id: UInt64, stakeRole: NodeRole, nodeRole: NodeRole)
    // Registry
    case badNodeSignature
    case registrationOwnerMismatch
    case nodeAlreadyRegistered(nodeKey: PublicKey)
    case unknownNode(nodeKey: PublicKey)
    case notNodeOwner(nodeKey: PublicKey)
    case nodeRetired(nodeKey: PublicKey)
    case invalidEndpoints(String)
    case wrongNodeRole(nodeKey: PublicKey, role: NodeRole, expected: NodeRole)
    // Escrow and prices
    case zeroAmount(field: String)
    case escrowCapExceeded(router: PublicKey, cap: Amount, held: Amount)
    case unknownEscrow(payer: Account, router: PublicKey)
    case escrowWithdrawalPending(router: PublicKey, withdrawableAtHeight: UInt64)
    case escrowNothingAvailable(router: PublicKey, pending: Amount)
    case escrowInsufficient(payer: Account, router: PublicKey, available: Amount, needed: Amount)
    case invalidPriceList(field: String, reason: String)
    case invalidRouterFee(got: UInt32, maximum: UInt32)
    case settlementOutOfOrder(router: PublicKey, expected: SettlementCursor, gotBatch: UInt64, gotFirstSequence: UInt64)
    case unknownSettlement(router: PublicKey, batch: UInt64)
    case challengeWindowClosed(router: PublicKey, batch: UInt64, finalAtHeight: UInt64)
    // Node settlement (kind 14)
    case routerDefaulted(router: PublicKey, atHeight: UInt64)
    case receiptRefused(index: UInt32, code: String, message: String)
    case noticeLimitReached(router: PublicKey, limit: UInt64)
    // Withheld data (kinds 15 and 16)
    case unknownPair(router: PublicKey, batch: UInt64, pair: SettlementPair)
    case notPairParty(pair: SettlementPair)
    case dataAlreadyRequested(router: PublicKey, batch: UInt64, pair: SettlementPair, status: String)
    case dataRequestTooLate(router: PublicKey, batch: UInt64, lastHeight: UInt64)
    case noOpenDataRequest(router: PublicKey, batch: UInt64, pair: SettlementPair)
    case dataResponseRefused(code: String, message: String)
    // Interactive omission (kinds 17 and 18)
    case omissionQueryRefused(code: String, message: String)
    case omissionAnswerRefused(code: String, message: String)
    // Consensus-reported misbehaviour
    case unknownValidator(nodeKey: PublicKey)
    case evidenceAlreadyUsed(Hash32)

    /// Generic-error codes (ICRC-1 leaves the numbering to the ledger).
    public enum GenericCode {
        public static let memoTooLong: UInt64 = 1
        public static let amountOverflow: UInt64 = 2
        public static let mintingDisabled: UInt64 = 3
        public static let invalidParameter: UInt64 = 4
    }

    /// The ICRC-1 style name of the error kind, for APIs and logs.
    public var kind: String {
        switch self {
        case .badFee: "BadFee"
        case .badBurn: "BadBurn"
        case .insufficientFunds: "InsufficientFunds"
        case .tooOld: "TooOld"
        case .createdInFuture: "CreatedInFuture"
        case .duplicate: "Duplicate"
        case .genericError: "GenericError"
        case .malformed: "Malformed"
        case .badSignature: "BadSignature"
        case .wrongChain: "WrongChain"
        case .stakeBelowMinimum: "StakeBelowMinimum"
        case .lockTooShort: "LockTooShort"
        case .unknownStake: "UnknownStake"
        case .notStakeOwner: "NotStakeOwner"
        case .stakeNotBonded: "StakeNotBonded"
        case .stakeNotUnbonded: "StakeNotUnbonded"
        case .stakeLocked: "StakeLocked"
        case .stakeInUse: "StakeInUse"
        case .stakeRoleMismatch: "StakeRoleMismatch"
        case .badNodeSignature: "BadNodeSignature"
        case .registrationOwnerMismatch: "RegistrationOwnerMismatch"
        case .nodeAlreadyRegistered: "NodeAlreadyRegistered"
        case .unknownNode: "UnknownNode"
        case .notNodeOwner: "NotNodeOwner"
        case .nodeRetired: "NodeRetired"
        case .invalidEndpoints: "InvalidEndpoints"
        case .wrongNodeRole: "WrongNodeRole"
        case .zeroAmount: "ZeroAmount"
        case .escrowCapExceeded: "EscrowCapExceeded"
        case .unknownEscrow: "UnknownEscrow"
        case .escrowWithdrawalPending: "EscrowWithdrawalPending"
        case .escrowNothingAvailable: "EscrowNothingAvailable"
        case .escrowInsufficient: "EscrowInsufficient"
        case .invalidPriceList: "InvalidPriceList"
        case .invalidRouterFee: "InvalidRouterFee"
        case .settlementOutOfOrder: "SettlementOutOfOrder"
        case .unknownSettlement: "UnknownSettlement"
        case .challengeWindowClosed: "ChallengeWindowClosed"
        case .routerDefaulted: "RouterDefaulted"
        case .receiptRefused: "ReceiptRefused"
        case .noticeLimitReached: "NoticeLimitReached"
        case .unknownPair: "UnknownPair"
        case .notPairParty: "NotPairParty"
        case .dataAlreadyRequested: "DataAlreadyRequested"
        case .dataRequestTooLate: "DataRequestTooLate"
        case .noOpenDataRequest: "NoOpenDataRequest"
        case .dataResponseRefused: "DataResponseRefused"
        case .omissionQueryRefused: "OmissionQueryRefused"
        case .omissionAnswerRefused: "OmissionAnswerRefused"
        case .unknownValidator: "UnknownValidator"
        case .evidenceAlreadyUsed: "EvidenceAlreadyUsed"
        }
    }

    public var description: String {
        switch self {
        case .badFee(let expected): "BadFee: the fee must be \(expected) EMC (or omit it to pay the ledger fee)"
        case .badBurn(let minimum): "BadBurn: burns must be at least \(minimum) EMC and carry no fee"
        case .insufficientFunds(let balance): "InsufficientFunds: the account holds \(balance) EMC, less than the amount plus fee"
        case .tooOld: "TooOld: created_at_time is older than the 24 h deduplication window; sign the transaction again with the current time"
        case .createdInFuture(let now): "CreatedInFuture: created_at_time is ahead of the ledger time \(now) ms by more than the permitted drift; check the clock and sign again"
        case .duplicate(let original): "Duplicate: this transaction was already executed at \(original)"
        case .genericError(let code, let message): "GenericError \(code): \(message)"
        case .malformed(let why): "malformed transaction: \(why)"
        case .badSignature: "the transaction's signature does not verify for its signer over the bytes sent; sign the exact bytes you send"
        case .wrongChain(let expected, let got): "transaction is for chain '\(got)' but this is '\(expected)'; sign it for the right chain"
        case .stakeBelowMinimum(let role, let minimum, let got): "a \(role) stake needs at least \(minimum) EMC, got \(got) EMC"
        case .lockTooShort(let role, let minimum, let got): "a \(role) stake must be locked at least \(minimum) days, got \(got)"
        case .unknownStake(let id): "no stake with id \(id)"
        case .notStakeOwner(let id): "stake \(id) belongs to another account; sign with its owner's key"
        case .stakeNotBonded(let id): "stake \(id) is already unbonding"
        case .stakeNotUnbonded(let id): "stake \(id) is still bonded; unbond it first, then withdraw when its lock ends"
        case .stakeLocked(let id, let at): "stake \(id) is locked until \(at) ms of chain time; withdraw after that"
        case .stakeInUse(let id, let key): "stake \(id) backs node \(key.nodeID); retire that node (or move it to another stake) first"
        case .stakeRoleMismatch(let id, let stakeRole, let nodeRole): "stake \(id) is a \(stakeRole) stake and cannot back a \(nodeRole) node; bond a \(nodeRole) stake"
        case .badNodeSignature: "the node key's signature over the registration does not verify; the node itself must sign its registration"
        case .registrationOwnerMismatch: "the registration names a different owner (or chain) than the transaction's signer; the node must sign a statement naming you"
        case .nodeAlreadyRegistered(let key): "node \(key.nodeID) is already registered (retired nodes cannot return; use a new node key)"
        case .unknownNode(let key): "no node \(key.nodeID) is registered"
        case .notNodeOwner(let key): "node \(key.nodeID) belongs to another owner; sign with its owner's key"
        case .nodeRetired(let key): "node \(key.nodeID) is retired"
        case .invalidEndpoints(let why): "invalid endpoints: \(why)"
        case .wrongNodeRole(let key, let role, let expected): "node \(key.nodeID) is a \(role) node; this needs a \(expected) node"
        case .zeroAmount(let field): "\(field) must be more than 0"
        case .escrowCapExceeded(let router, let cap, let held):
            "router \(router.nodeID) may hold at most \(cap) EMC of escrow in total (router_escrow_cap_multiple × its bonded stake) and already holds \(held) EMC; open at most \(Amount(baseUnits: cap.baseUnits.subtractingSaturating(held.baseUnits))) EMC, or choose another router"
        case .unknownEscrow(let payer, let router): "account \(payer) has no escrow with router \(router.nodeID); open one with `emc tx escrow open`"
        case .escrowWithdrawalPending(let router, let height):
            "the escrow with router \(router.nodeID) is already being withdrawn: it returns at the end of block \(height)"
        case .escrowNothingAvailable(let router, let pending):
            "nothing to withdraw from the escrow with router \(router.nodeID): all of it (\(pending) EMC) is pending in settlements; ask again once they finish"
        case .escrowInsufficient(let payer, let router, let available, let needed):
            "the escrow of \(payer) with router \(router.nodeID) has \(available) EMC available, less than the \(needed) EMC charged"
        case .invalidPriceList(let field, let reason): "invalid price list: \(field) \(reason)"
        case .invalidRouterFee(let got, let maximum):
            "router_fee_bps \(got) is too high: at most \(maximum) (10000 minus the protocol fee), so that a node's share is never negative"
        case .settlementOutOfOrder(let router, let expected, let batch, let first):
            "router \(router.nodeID)'s next settlement must be batch \(expected.nextBatch) starting at sequence \(expected.nextSequence); got batch \(batch) starting at \(first) (already settled, or a gap)"
        case .unknownSettlement(let router, let batch): "router \(router.nodeID) has no settlement batch \(batch) on chain"
        case .challengeWindowClosed(let router, let batch, let height):
            "the challenge window of router \(router.nodeID)'s batch \(batch) closed at the end of block \(height); it is final"
        case .routerDefaulted(let router, let height):
            "router \(router.nodeID) missed a settlement deadline at the end of block \(height): it may no longer settle or take escrow, and its compute nodes settle their own receipts"
        case .receiptRefused(let index, let code, let message): "receipt \(index) refused (\(code)): \(message)"
        case .noticeLimitReached(let router, let limit):
            "router \(router.nodeID) already has \(limit) noticed receipts waiting for its deadline; wait for them to settle or lapse"
        case .unknownPair(let router, let batch, let pair): "router \(router.nodeID)'s batch \(batch) has no pair \(pair)"
        case .notPairParty(let pair):
            "only the pair's payer account owner, its compute node or that node's owner may ask for the leaves of pair \(pair)"
        case .dataAlreadyRequested(let router, let batch, let pair, let status):
            "the leaves of pair \(pair) of router \(router.nodeID)'s batch \(batch) were already requested (\(status))"
        case .dataRequestTooLate(let router, let batch, let last):
            "a data request or omission query on router \(router.nodeID)'s batch \(batch) must be filed by block \(last), so that its deadline ends before the challenge window"
        case .noOpenDataRequest(let router, let batch, let pair):
            "no open data request for pair \(pair) of router \(router.nodeID)'s batch \(batch)"
        case .dataResponseRefused(let code, let message): "data response refused (\(code)): \(message)"
        case .omissionQueryRefused(let code, let message): "omission query refused (\(code)): \(message)"
        case .omissionAnswerRefused(let code, let message): "omission answer refused (\(code)): \(message)"
        case .unknownValidator(let key): "no validator node \(key.nodeID) with a stake to slash"
        case .evidenceAlreadyUsed(let id): "evidence \(id) was already used to slash"
        }
    }
}
