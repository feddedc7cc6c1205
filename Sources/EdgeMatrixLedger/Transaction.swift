import EdgeMatrixCore

/// Hard limits of the transaction format, enforced while decoding (before any parameter is known).
public enum TransactionLimits {
    /// Largest body of every kind but `settle`.
    public static let maxTransactionBytes = 16 * 1024
    /// Largest body of a `settle` transaction (a batch of up to `SettlementBatch.maxEntries` pairs), and so the
    /// largest envelope the decoder reads at all.
    public static let maxSettleTransactionBytes = 1 << 20
    /// Decoder bound for memos; the chain's own limit (`LedgerParameters.maxMemoBytes`, 32 by default) is checked on apply.
    public static let maxMemoBytes = 256
    public static let maxEndpoints = 8
    public static let maxEndpointBytes = 256
    public static let maxChainIDBytes = 64
}

/// ICRC-1 transfer. `fee` is optional as in ICRC-1: when present it must equal the ledger fee.
public struct Transfer: Hashable, Sendable {
    public var fromSubaccount: Subaccount?
    public var to: Account
    public var amount: Amount
    public var fee: Amount?
    public var memo: [UInt8]?

    public init(fromSubaccount: Subaccount? = nil, to: Account, amount: Amount, fee: Amount? = nil, memo: [UInt8]? = nil) {
        self.fromSubaccount = (fromSubaccount?.isDefault ?? true) ? nil : fromSubaccount
        self.to = to
        self.amount = amount
        self.fee = fee
        self.memo = memo
    }
}

/// Locks `amount` from the signer's (sub)account as stake for `role` for `lockDays` days.
public struct Bond: Hashable, Sendable {
    public var fromSubaccount: Subaccount?
    public var role: NodeRole
    public var amount: Amount
    public var lockDays: UInt32

    public init(fromSubaccount: Subaccount? = nil, role: NodeRole, amount: Amount, lockDays: UInt32) {
        self.fromSubaccount = (fromSubaccount?.isDefault ?? true) ? nil : fromSubaccount
        self.role = role
        self.amount = amount
        self.lockDays = lockDays
    }
}

/// What a node key declares when it joins the registry: which owner, chain, role, endpoints and stake.
/// The node key signs these bytes (domain `.nodeRegistration`), so nobody can register a node id they do not hold.
public struct NodeRegistrationStatement: Hashable, Sendable {
    /// Distinguishes ledger registrations from any other message a node key signs in the same domain.
    static let magic = "edgematrix-ledger/register-node/v1"

    public var chainID: String
    public var owner: PublicKey
    public var nodeKey: PublicKey
    public var role: NodeRole
    public var endpoints: [String]
    public var stakeID: UInt64

    public init(chainID: String, owner: PublicKey, nodeKey: PublicKey, role: NodeRole, endpoints: [String], stakeID: UInt64) {
        self.chainID = chainID
        self.owner = owner
        self.nodeKey = nodeKey
        self.role = role
        self.endpoints = endpoints
        self.stakeID = stakeID
    }

    /// nil if the endpoints are acceptable; otherwise what is wrong with them.
    public static func endpointProblem(_ endpoints: [String]) -> String? {
        guard endpoints.count <= TransactionLimits.maxEndpoints else { return "at most \(TransactionLimits.maxEndpoints) endpoints, got \(endpoints.count)" }
        for (i, e) in endpoints.enumerated() {
            guard !e.isEmpty, e.utf8.count <= TransactionLimits.maxEndpointBytes,
                  e.unicodeScalars.allSatisfy({ $0.isASCII && $0.value > 0x20 && $0.value < 0x7f }) else {
                return "endpoint \(i) must be 1 to \(TransactionLimits.maxEndpointBytes) printable ASCII characters without spaces, e.g. https://node.example:8443"
            }
        }
        guard Set(endpoints).count == endpoints.count else { return "endpoints must not repeat" }
        return nil
    }
}

extension NodeRegistrationStatement: CanonicalCodable {
    public func encode(to writer: inout ByteWriter) {
        writer.write(Self.magic)
        writer.write(chainID)
        owner.encode(to: &writer)
        nodeKey.encode(to: &writer)
        writer.write(role.tag)
        writer.write(Endpoints.encode(endpoints))
        writer.write(stakeID)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        guard try reader.readBoundedString(max: 64) == Self.magic else { throw .invalidValue("not a ledger node registration statement") }
        chainID = try reader.readBoundedString(max: TransactionLimits.maxChainIDBytes)
        owner = try PublicKey(from: &reader)
        nodeKey = try PublicKey(from: &reader)
        role = try NodeRole(tag: try reader.readUInt8())
        endpoints = try Endpoints.decode(try reader.readBoundedString(max: TransactionLimits.maxEndpoints * (TransactionLimits.maxEndpointBytes + 1)))
        stakeID = try reader.readUInt64()
    }
}

/// Endpoints travel as one newline-separated string (endpoints never contain whitespace).
enum Endpoints {
    static func encode(_ endpoints: [String]) -> String { endpoints.joined(separator: "\n") }
    static func decode(_ text: String) throws(DecodingError) -> [String] {
        text.isEmpty ? [] : text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
    }
}

/// A registration as carried in a transaction: the statement's exact bytes and the node key's signature over them.
public struct NodeRegistration: Hashable, Sendable {
    public let statementBytes: [UInt8]
    public let statement: NodeRegistrationStatement
    public let nodeSignature: [UInt8]

    /// The node's side: encode the statement and sign it with the node key.
    public init(statement: NodeRegistrationStatement, nodeKey: SigningKey) {
        self.statement = statement
        statementBytes = statement.canonicalBytes
        nodeSignature = nodeKey.sign(statementBytes, domain: .nodeRegistration)
    }

    /// From received parts; the signature is checked on apply, over these very bytes.
    public init(statementBytes: [UInt8], nodeSignature: [UInt8]) throws(DecodingError) {
        statement = try NodeRegistrationStatement(canonicalBytes: statementBytes)
        self.statementBytes = statementBytes
        self.nodeSignature = nodeSignature
    }

    public var hasValidNodeSignature: Bool {
        statement.nodeKey.isValidSignature(nodeSignature, for: statementBytes, domain: .nodeRegistration)
    }
}

/// Changes a registered node's endpoints and/or the stake backing it. Signed by the node's owner.
public struct NodeUpdate: Hashable, Sendable {
    public var nodeKey: PublicKey
    public var endpoints: [String]?
    public var stakeID: UInt64?

    public init(nodeKey: PublicKey, endpoints: [String]? = nil, stakeID: UInt64? = nil) {
        self.nodeKey = nodeKey
        self.endpoints = endpoints
        self.stakeID = stakeID
    }
}

public enum TransactionKind: Hashable, Sendable {
    case transfer(Transfer)
    case bond(Bond)
    /// Stops a stake counting (from the next epoch for validators); funds stay locked until the lock ends.
    case unbond(stakeID: UInt64)
    /// Returns an unbonded stake whose lock has ended to its owner account.
    case withdraw(stakeID: UInt64)
    case registerNode(NodeRegistration)
    case updateNode(NodeUpdate)
    case retireNode(nodeKey: PublicKey)
    /// Opens or tops up the signer's escrow with a router (docs/SETTLEMENT.md).
    case escrowOpen(EscrowOpen)
    /// Schedules the return of the signer's escrow with a router after the withdrawal delay.
    case escrowWithdraw(EscrowWithdraw)
    /// Replaces a compute node's price list.
    case setPrices(SetPrices)
    /// Sets a router's fee in basis points.
    case setRouterFee(SetRouterFee)
    /// A router settles one batch of countersigned receipts (docs/SETTLEMENT.md, docs/PROTOCOL.md § 12).
    case settle(SettlementBatch)
    /// A fraud proof against a pending settlement, with a bond (docs/SETTLEMENT.md § 9).
    case challengeSettlement(SettlementChallenge)
    /// A compute node notices (or, after its router defaulted, settles) its own countersigned receipts (docs/SETTLEMENT.md § 10).
    case nodeSettle(NodeSettlement)
    /// A payer or compute node asks a router for a pending pair's leaves, with a bond (docs/SETTLEMENT.md § 11).
    case dataRequest(DataRequest)
    /// The router posts a requested pair's leaves, in ordered chunks (docs/SETTLEMENT.md § 11).
    case dataResponse(DataResponse)
    /// A compute node asks the router to prove its receipt is in a pending batch, with a bond (docs/SETTLEMENT.md § 12).
    case omissionQuery(OmissionQuery)
    /// The router proves a queried receipt's leaf (docs/SETTLEMENT.md § 12).
    case omissionAnswer(OmissionAnswer)

    public var name: String {
        switch self {
        case .transfer: "transfer"
        case .bond: "bond"
        case .unbond: "unbond"
        case .withdraw: "withdraw"
        case .registerNode: "register_node"
        case .updateNode: "update_node"
        case .retireNode: "retire_node"
        case .escrowOpen: "escrow_open"
        case .escrowWithdraw: "escrow_withdraw"
        case .setPrices: "set_prices"
        case .setRouterFee: "set_router_fee"
        case .settle: "settle"
        case .challengeSettlement: "challenge_settlement"
        case .nodeSettle: "node_settle"
        case .dataRequest: "data_request"
        case .dataResponse: "data_response"
        case .omissionQuery: "omission_query"
        case .omissionAnswer: "omission_answer"
        }
    }
}

/// What the signer signs. `createdAtMillis` is ICRC-1's created_at_time (in milliseconds here) and is
/// mandatory for every kind: with the dedup window it is the replay protection.
public struct TransactionBody: Hashable, Sendable {
    public static let version: UInt8 = 1

    public var chainID: String
    public var createdAtMillis: UInt64
    public var kind: TransactionKind

    public init(chainID: String, createdAtMillis: UInt64, kind: TransactionKind) {
        self.chainID = chainID
        self.createdAtMillis = createdAtMillis
        self.kind = kind
    }
}

extension TransactionBody: CanonicalCodable {
    public func encode(to writer: inout ByteWriter) {
        writer.write(Self.version)
        writer.write(chainID)
        writer.write(createdAtMillis)
        switch kind {
        case .transfer(let t):
            writer.write(UInt8(1))
            writer.writeOptionalSubaccount(t.fromSubaccount)
            t.to.encode(to: &writer)
            t.amount.encode(to: &writer)
            if let fee = t.fee { writer.write(true); fee.encode(to: &writer) } else { writer.write(false) }
            writer.write(optional: t.memo)
        case .bond(let b):
            writer.write(UInt8(2))
            writer.writeOptionalSubaccount(b.fromSubaccount)
            writer.write(b.role.tag)
            b.amount.encode(to: &writer)
            writer.write(b.lockDays)
        case .unbond(let id):
            writer.write(UInt8(3))
            writer.write(id)
        case .withdraw(let id):
            writer.write(UInt8(4))
            writer.write(id)
        case .registerNode(let r):
            writer.write(UInt8(5))
            writer.write(bytes: r.statementBytes)
            writer.write(bytes: r.nodeSignature)
        case .updateNode(let u):
            writer.write(UInt8(6))
            u.nodeKey.encode(to: &writer)
            if let endpoints = u.endpoints { writer.write(true); writer.write(Endpoints.encode(endpoints)) } else { writer.write(false) }
            if let stakeID = u.stakeID { writer.write(true); writer.write(stakeID) } else { writer.write(false) }
        case .retireNode(let key):
            writer.write(UInt8(7))
            key.encode(to: &writer)
        case .escrowOpen(let o):
            writer.write(UInt8(8))
            writer.writeOptionalSubaccount(o.fromSubaccount)
            o.router.encode(to: &writer)
            o.amount.encode(to: &writer)
        case .escrowWithdraw(let w):
            writer.write(UInt8(9))
            writer.writeOptionalSubaccount(w.subaccount)
            w.router.encode(to: &writer)
        case .setPrices(let p):
            writer.write(UInt8(10))
            p.nodeKey.encode(to: &writer)
            p.prices.encode(to: &writer)
        case .setRouterFee(let f):
            writer.write(UInt8(11))
            f.nodeKey.encode(to: &writer)
            writer.write(f.feeBps)
        case .settle(let batch):
            writer.write(UInt8(12))
            batch.encode(to: &writer)
        case .challengeSettlement(let c):
            writer.write(UInt8(13))
            c.router.encode(to: &writer)
            writer.write(c.batchNumber)
            c.claim.encode(to: &writer)
        case .nodeSettle(let n):
            writer.write(UInt8(14))
            n.encode(to: &writer)
        case .dataRequest(let r):
            writer.write(UInt8(15))
            r.encode(to: &writer)
        case .dataResponse(let r):
            writer.write(UInt8(16))
            r.encode(to: &writer)
        case .omissionQuery(let q):
            writer.write(UInt8(17))
            q.encode(to: &writer)
        case .omissionAnswer(let a):
            writer.write(UInt8(18))
            a.encode(to: &writer)
        }
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let version = try reader.readUInt8()
        guard version == Self.version else { throw .invalidValue("transaction body version \(version) (this ledger reads version \(Self.version))") }
        chainID = try reader.readBoundedString(max: TransactionLimits.maxChainIDBytes)
        createdAtMillis = try reader.readUInt64()
        let tag = try reader.readUInt8()
        switch tag {
        case 1:
            let from = try reader.readOptionalSubaccount()
            let to = try Account(from: &reader)
            let amount = try Amount(from: &reader)
            let fee: Amount? = try reader.readBool() ? try Amount(from: &reader) : nil
            var memo: [UInt8]? = nil
            if try reader.readBool() {
                let length = Int(try reader.readUInt32())
                guard length <= TransactionLimits.maxMemoBytes else { throw .lengthTooLarge(length, limit: TransactionLimits.maxMemoBytes) }
                memo = try reader.readRaw(count: length)
            }
            kind = .transfer(Transfer(fromSubaccount: from, to: to, amount: amount, fee: fee, memo: memo))
        case 2:
            let from = try reader.readOptionalSubaccount()
            let role = try NodeRole(tag: try reader.readUInt8())
            kind = .bond(Bond(fromSubaccount: from, role: role, amount: try Amount(from: &reader), lockDays: try reader.readUInt32()))
        case 3: kind = .unbond(stakeID: try reader.readUInt64())
        case 4: kind = .withdraw(stakeID: try reader.readUInt64())
        case 5:
            let statement = try reader.readBoundedBytes(max: 4096)
            let signature = try reader.readBoundedBytes(max: 64)
            kind = .registerNode(try NodeRegistration(statementBytes: statement, nodeSignature: signature))
        case 6:
            let key = try PublicKey(from: &reader)
            let endpoints: [String]? = try reader.readBool()
                ? try Endpoints.decode(try reader.readBoundedString(max: TransactionLimits.maxEndpoints * (TransactionLimits.maxEndpointBytes + 1)))
                : nil
            let stakeID: UInt64? = try reader.readBool() ? try reader.readUInt64() : nil
            kind = .updateNode(NodeUpdate(nodeKey: key, endpoints: endpoints, stakeID: stakeID))
        case 7: kind = .retireNode(nodeKey: try PublicKey(from: &reader))
        case 8:
            let from = try reader.readOptionalSubaccount()
            let router = try PublicKey(from: &reader)
            kind = .escrowOpen(EscrowOpen(fromSubaccount: from, router: router, amount: try Amount(from: &reader)))
        case 9:
            let subaccount = try reader.readOptionalSubaccount()
            kind = .escrowWithdraw(EscrowWithdraw(subaccount: subaccount, router: try PublicKey(from: &reader)))
        case 10:
            let key = try PublicKey(from: &reader)
            kind = .setPrices(SetPrices(nodeKey: key, prices: try PriceList(from: &reader)))
        case 11:
            let key = try PublicKey(from: &reader)
            kind = .setRouterFee(SetRouterFee(nodeKey: key, feeBps: try reader.readUInt32()))
        case 12: kind = .settle(try SettlementBatch(from: &reader))
        case 13:
            let router = try PublicKey(from: &reader)
            let batch = try reader.readUInt64()
            kind = .challengeSettlement(SettlementChallenge(router: router, batchNumber: batch, claim: try SettlementClaim(from: &reader)))
        case 14: kind = .nodeSettle(try NodeSettlement(from: &reader))
        case 15: kind = .dataRequest(try DataRequest(from: &reader))
        case 16: kind = .dataResponse(try DataResponse(from: &reader))
        case 17: kind = .omissionQuery(try OmissionQuery(from: &reader))
        case 18: kind = .omissionAnswer(try OmissionAnswer(from: &reader))
        default: throw .invalidValue("transaction kind \(tag) (expected 1 to 18)")
        }
    }
}

/// A signed transaction as it travels: the exact body bytes, the signer's key and an Ed25519 signature over
/// `SigningDomain.transaction.message(bodyBytes)`. The signature is verified over these received bytes; the body
/// is never re-encoded for verification.
public struct Transaction: Hashable, Sendable {
    public static let envelopeVersion: UInt8 = 1

    public let bodyBytes: [UInt8]
    public let body: TransactionBody
    public let signer: PublicKey
    public let signature: [UInt8]

    /// The client's side: encode and sign.
    public init(signing body: TransactionBody, with key: SigningKey) {
        self.body = body
        bodyBytes = body.canonicalBytes
        signer = key.publicKey
        signature = key.sign(bodyBytes, domain: .transaction)
    }

    /// From received parts. Does not verify the signature (`apply` does, and so does `hasValidSignature`).
    public init(bodyBytes: [UInt8], signer: PublicKey, signature: [UInt8]) throws(TransactionDecodingError) {
        guard bodyBytes.count <= TransactionLimits.maxSettleTransactionBytes else {
            throw .tooLarge(bytes: bodyBytes.count, limit: TransactionLimits.maxSettleTransactionBytes)
        }
        guard signature.count == 64 else { throw .malformed("signature must be 64 bytes, got \(signature.count)") }
        do {
            var reader = ByteReader(bodyBytes, maxFieldLength: TransactionLimits.maxTransactionBytes)
            body = try TransactionBody(from: &reader)
            try reader.expectEnd()
        } catch { throw .malformed(error.description) }
        // Only settlement batches, challenges, node settlements, data responses and omission queries and answers
        // (which carry receipts and witnesses) may exceed the ordinary limit.
        switch body.kind {
        case .settle, .challengeSettlement, .nodeSettle, .dataResponse, .omissionQuery, .omissionAnswer: break
        default:
            guard bodyBytes.count <= TransactionLimits.maxTransactionBytes else {
                throw .tooLarge(bytes: bodyBytes.count, limit: TransactionLimits.maxTransactionBytes)
            }
        }
        self.bodyBytes = bodyBytes
        self.signer = signer
        self.signature = signature
    }

    /// Decodes the wire form produced by `encoded`. Never traps; any defect is a `TransactionDecodingError`.
    public init(decoding bytes: [UInt8]) throws(TransactionDecodingError) {
        guard bytes.count <= TransactionLimits.maxSettleTransactionBytes + 128 else {
            throw .tooLarge(bytes: bytes.count, limit: TransactionLimits.maxSettleTransactionBytes)
        }
        let body: [UInt8], signer: PublicKey, signature: [UInt8]
        do throws(DecodingError) {
            var reader = ByteReader(bytes, maxFieldLength: TransactionLimits.maxSettleTransactionBytes)
            let version = try reader.readUInt8()
            guard version == Self.envelopeVersion else { throw .invalidValue("transaction envelope version \(version)") }
            body = try reader.readBytes()
            signer = try PublicKey(from: &reader)
            signature = try reader.readRaw(count: 64)
            try reader.expectEnd()
        } catch { throw .malformed(error.description) }
        try self.init(bodyBytes: body, signer: signer, signature: signature)
    }

    /// Wire form: version ‖ u32-length body ‖ signer (32) ‖ signature (64).
    public var encoded: [UInt8] {
        var writer = ByteWriter(capacity: bodyBytes.count + 104)
        writer.write(Self.envelopeVersion)
        writer.write(bytes: bodyBytes)
        signer.encode(to: &writer)
        writer.writeRaw(signature)
        return writer.bytes
    }

    /// Transaction id: SHA-256(signer ‖ body bytes). It leaves the signature out (CryptoKit on Apple platforms
    /// randomises Ed25519 signatures), so re-signing the same body is still the same transaction for deduplication.
    public var id: Hash32 { Hash32.of(signer.rawRepresentation + bodyBytes) }

    public var hasValidSignature: Bool { signer.isValidSignature(signature, for: bodyBytes, domain: .transaction) }
}

public enum TransactionDecodingError: Error, Equatable, Sendable, CustomStringConvertible {
    case malformed(String)
    case tooLarge(bytes: Int, limit: Int)

    public var description: String {
        switch self {
        case .malformed(let why): "malformed transaction: \(why); build transactions with the EdgeMatrix SDK or `emc tx`"
        case .tooLarge(let bytes, let limit): "transaction is \(bytes) bytes; the limit is \(limit)"
        }
    }
}

// MARK: - Encoding helpers

extension ByteWriter {
    mutating func writeOptionalSubaccount(_ subaccount: Subaccount?) {
        if let subaccount { write(true); writeRaw(subaccount.bytes) } else { write(false) }
    }
}

extension ByteReader {
    mutating func readOptionalSubaccount() throws(DecodingError) -> Subaccount? {
        guard try readBool() else { return nil }
        let raw = try readRaw(count: Subaccount.byteCount)
        guard raw.contains(where: { $0 != 0 }) else { throw .invalidValue("the all-zero subaccount must be encoded as absent") }
        return Subaccount(bytes: raw)
    }

    mutating func readBoundedBytes(max: Int) throws(DecodingError) -> [UInt8] {
        let length = Int(try readUInt32())
        guard length <= max else { throw .lengthTooLarge(length, limit: max) }
        return try readRaw(count: length)
    }

    mutating func readBoundedString(max: Int) throws(DecodingError) -> String {
        let raw = try readBoundedBytes(max: max)
        guard let string = String(validating: raw, as: UTF8.self) else { throw .invalidUTF8 }
        return string
    }
}
