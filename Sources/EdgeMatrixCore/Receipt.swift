/// Work units of one request, as metered by the compute node from the app's answer.
public struct WorkUnits: Hashable, Sendable, Codable {
    public var promptTokens: UInt64
    public var completionTokens: UInt64
    /// Items for non-token work: embeddings inputs, images, REST calls.
    public var items: UInt64

    public init(promptTokens: UInt64 = 0, completionTokens: UInt64 = 0, items: UInt64 = 0) {
        self.promptTokens = promptTokens
        self.completionTokens = completionTokens
        self.items = items
    }

    enum CodingKeys: String, CodingKey {
        case promptTokens = "prompt_tokens"
        case completionTokens = "completion_tokens"
        case items
    }

    /// Per field, the smaller of the two.
    public func fieldwiseMin(_ other: WorkUnits) -> WorkUnits {
        WorkUnits(promptTokens: min(promptTokens, other.promptTokens), completionTokens: min(completionTokens, other.completionTokens),
                  items: min(items, other.items))
    }

    /// Whether no field is above the same field of `bound`.
    public func isWithin(_ bound: WorkUnits) -> Bool {
        promptTokens <= bound.promptTokens && completionTokens <= bound.completionTokens && items <= bound.items
    }
}

/// The billed-units rule (docs/PROTOCOL.md, "Billed units"). A node controls the `usage` its app reports, so what
/// a receipt bills is, per field, the smaller of the reported usage and a bound computed from the bytes the router
/// relayed. Node and router both use this one function: the node signs `billed(...)`, and the router refuses a
/// receipt whose units exceed `bound(...)` of what it relayed itself.
public enum BilledUnits {
    /// A chat template adds at most this many tokens to a prompt, whatever its length.
    public static let promptTemplateAllowance: UInt64 = 4096

    /// The most units the relayed bytes can carry: every completion token is at least one byte of answer, every
    /// prompt token at least one byte of request (plus the template allowance), every item at least one request
    /// byte (and a request with an empty body is still one item, e.g. a REST GET).
    public static func bound(requestBytes: UInt64, responseBytes: UInt64) -> WorkUnits {
        WorkUnits(promptTokens: requestBytes.addingReportingOverflow(promptTemplateAllowance).overflow
                    ? .max : requestBytes + promptTemplateAllowance,
                  completionTokens: responseBytes,
                  items: max(1, requestBytes))
    }

    /// The bound of the relayed bytes, tightened by `requestBound` (`RequestBound.units` of the forwarded request,
    /// what the router reserved against the payer's escrow) where given.
    public static func bound(requestBytes: UInt64, responseBytes: UInt64, requestBound: WorkUnits?) -> WorkUnits {
        let relayed = bound(requestBytes: requestBytes, responseBytes: responseBytes)
        guard let requestBound else { return relayed }
        return relayed.fieldwiseMin(requestBound)
    }

    /// What a node signs: per field, min(reported, bound).
    public static func billed(reported: WorkUnits, requestBytes: UInt64, responseBytes: UInt64,
                              requestBound: WorkUnits? = nil) -> WorkUnits {
        reported.fieldwiseMin(bound(requestBytes: requestBytes, responseBytes: responseBytes, requestBound: requestBound))
    }
}

/// What a compute node attests about one attempt at one request. Signed by the node, countersigned by the router;
/// the one format settlement, proof of computing and rewards verify. Its identity is (router, sequence, attempt).
public struct ReceiptBody: Hashable, Sendable {
    public static let version: UInt8 = 2
    /// App and model names are at most this long (bounds the receipt; settlement keeps receipts small).
    public static let maxNameBytes = 256

    /// Who pays: the account the request's API key is bound to.
    public var payer: Account
    public var router: PublicKey
    public var node: PublicKey
    /// The router's sequence number for the request: contiguous per router, assigned when it accepted the request.
    public var sequence: UInt64
    /// 0 for the first node that worked on the request, 1 for the node it failed over to, and so on.
    public var attempt: UInt32
    public var app: String
    public var model: String
    /// The node's unit prices in force when the router assigned the request.
    public var prices: UnitPrices
    /// Billed units: min(reported usage, `BilledUnits.bound`) per field.
    public var units: WorkUnits
    /// Milliseconds since the Unix epoch, by the node's clock.
    public var startedAtMillis: UInt64
    public var endedAtMillis: UInt64
    /// `ReceiptBody.requestHash(...)` of the request the router forwarded.
    public var requestHash: Hash32
    /// SHA-256 of the answer body bytes relayed.
    public var responseHash: Hash32
    /// HTTP status the app answered with.
    public var status: UInt16

    public init(payer: Account, router: PublicKey, node: PublicKey, sequence: UInt64, attempt: UInt32, app: String, model: String,
                prices: UnitPrices, units: WorkUnits, startedAtMillis: UInt64, endedAtMillis: UInt64, requestHash: Hash32,
                responseHash: Hash32, status: UInt16) {
        self.payer = payer
        self.router = router
        self.node = node
        self.sequence = sequence
        self.attempt = attempt
        self.app = app
        self.model = model
        self.prices = prices
        self.units = units
        self.startedAtMillis = startedAtMillis
        self.endedAtMillis = endedAtMillis
        self.requestHash = requestHash
        self.responseHash = responseHash
        self.status = status
    }

    public var nodeID: NodeID { node.nodeID }
    public var routerID: NodeID { router.nodeID }

    /// What the request cost at the receipt's prices, in base units (nil if it does not fit in 64 bits).
    public var cost: UInt64? { prices.cost(of: units) }

    /// The request hash both sides compute over what the app receives:
    /// SHA-256(string method ‖ string path ‖ string content_type ‖ bool stream ‖ bytes body).
    public static func requestHash(method: String, path: String, contentType: String, stream: Bool, body: [UInt8]) -> Hash32 {
        var writer = ByteWriter(capacity: body.count + 64)
        writer.write(method)
        writer.write(path)
        writer.write(contentType)
        writer.write(stream)
        writer.write(bytes: body)
        return Hash32.of(writer.bytes)
    }
}

extension ReceiptBody: CanonicalCodable {
    public func encode(to writer: inout ByteWriter) {
        writer.write(Self.version)
        payer.encode(to: &writer)
        router.encode(to: &writer)
        node.encode(to: &writer)
        writer.write(sequence)
        writer.write(attempt)
        writer.write(app)
        writer.write(model)
        prices.encode(to: &writer)
        writer.write(units.promptTokens)
        writer.write(units.completionTokens)
        writer.write(units.items)
        writer.write(startedAtMillis)
        writer.write(endedAtMillis)
        requestHash.encode(to: &writer)
        responseHash.encode(to: &writer)
        writer.write(status)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let version = try reader.readUInt8()
        guard version == Self.version else { throw .invalidValue("receipt version \(version); this node reads version \(Self.version)") }
        payer = try Account(from: &reader)
        router = try PublicKey(from: &reader)
        node = try PublicKey(from: &reader)
        sequence = try reader.readUInt64()
        attempt = try reader.readUInt32()
        app = try Self.readName(&reader)
        model = try Self.readName(&reader)
        prices = try UnitPrices(from: &reader)
        units = WorkUnits(promptTokens: try reader.readUInt64(), completionTokens: try reader.readUInt64(),
                          items: try reader.readUInt64())
        startedAtMillis = try reader.readUInt64()
        endedAtMillis = try reader.readUInt64()
        requestHash = try Hash32(from: &reader)
        responseHash = try Hash32(from: &reader)
        status = try reader.readUInt16()
    }

    /// A name's length is checked before its bytes are read, so a hostile length allocates nothing.
    private static func readName(_ reader: inout ByteReader) throws(DecodingError) -> String {
        let limit = reader.maxFieldLength
        reader.maxFieldLength = min(limit, maxNameBytes)
        defer { reader.maxFieldLength = limit }
        return try reader.readString()
    }
}

public enum ReceiptError: Error, Equatable, CustomStringConvertible, Sendable {
    case malformed(String)
    case badNodeSignature
    case badRouterSignature
    case wrongNode(expected: NodeID, got: NodeID)
    case wrongRouter(expected: NodeID, got: NodeID)

    public var description: String {
        switch self {
        case .malformed(let why): "malformed receipt: \(why)"
        case .badNodeSignature: "receipt's node signature does not verify"
        case .badRouterSignature: "receipt's router signature does not verify"
        case .wrongNode(let expected, let got): "receipt names node \(got) but came from node \(expected)"
        case .wrongRouter(let expected, let got): "receipt names router \(got) but this router is \(expected)"
        }
    }
}

/// A receipt as it travels and is stored: the exact body bytes the node signed, the node's signature and,
/// once accepted, the router's countersignature over `bodyBytes || nodeSignature`.
public struct Receipt: Hashable, Sendable {
    public let bodyBytes: [UInt8]
    public let body: ReceiptBody
    public let nodeSignature: [UInt8]
    public private(set) var routerSignature: [UInt8]?

    /// The compute node's side: encode and sign.
    public init(signing body: ReceiptBody, with nodeKey: SigningKey) {
        self.body = body
        bodyBytes = body.canonicalBytes
        nodeSignature = nodeKey.sign(bodyBytes, domain: .receiptByNode)
        routerSignature = nil
    }

    /// Decodes received bytes; signatures are checked by `verify*`, over these very bytes.
    public init(bodyBytes: [UInt8], nodeSignature: [UInt8], routerSignature: [UInt8]? = nil) throws(ReceiptError) {
        do { body = try ReceiptBody(canonicalBytes: bodyBytes) } catch { throw .malformed(error.description) }
        self.bodyBytes = bodyBytes
        self.nodeSignature = nodeSignature
        self.routerSignature = routerSignature
    }

    public var id: Hash32 { Hash32.of(bodyBytes + nodeSignature) }

    /// A countersigned receipt as a settlement leaf carries it: body bytes ‖ node signature (64) ‖ router
    /// signature (64). Nil until countersigned. The body is what is left after the two fixed-size signatures.
    public var settlementBytes: [UInt8]? {
        guard let routerSignature, nodeSignature.count == 64, routerSignature.count == 64 else { return nil }
        return bodyBytes + nodeSignature + routerSignature
    }

    /// Reads `settlementBytes`. Signatures are not checked here (`verify()` does).
    public init(settlementBytes bytes: [UInt8]) throws(ReceiptError) {
        guard bytes.count > 128 else { throw .malformed("a settled receipt is body ‖ 64-byte node signature ‖ 64-byte router signature; got \(bytes.count) bytes") }
        let bodyEnd = bytes.count - 128
        try self.init(bodyBytes: Array(bytes[..<bodyEnd]), nodeSignature: Array(bytes[bodyEnd..<(bodyEnd + 64)]),
                      routerSignature: Array(bytes[(bodyEnd + 64)...]))
    }

    public func verifyNodeSignature(nodeKey: PublicKey) throws(ReceiptError) {
        guard body.node == nodeKey else { throw .wrongNode(expected: nodeKey.nodeID, got: body.nodeID) }
        guard nodeKey.isValidSignature(nodeSignature, for: bodyBytes, domain: .receiptByNode) else { throw .badNodeSignature }
    }

    /// The router's side: check the node's signature, then countersign.
    public mutating func countersign(nodeKey: PublicKey, routerKey: SigningKey) throws(ReceiptError) {
        try verifyNodeSignature(nodeKey: nodeKey)
        guard body.router == routerKey.publicKey else { throw .wrongRouter(expected: routerKey.nodeID, got: body.routerID) }
        routerSignature = routerKey.sign(bodyBytes + nodeSignature, domain: .receiptByRouter)
    }

    /// The node's side: takes the router's countersignature from its acknowledgement, if it verifies against the
    /// router the body names (the receipt is unchanged otherwise). Returns whether it was attached.
    public mutating func attachRouterSignature(_ signature: [UInt8]) -> Bool {
        guard signature.count == 64,
              body.router.isValidSignature(signature, for: bodyBytes + nodeSignature, domain: .receiptByRouter) else { return false }
        routerSignature = signature
        return true
    }

    /// Checks both signatures against the keys the body names.
    public func verify() throws(ReceiptError) { try verify(nodeKey: body.node, routerKey: body.router) }

    public func verify(nodeKey: PublicKey, routerKey: PublicKey) throws(ReceiptError) {
        try verifyNodeSignature(nodeKey: nodeKey)
        guard body.router == routerKey else { throw .wrongRouter(expected: routerKey.nodeID, got: body.routerID) }
        guard let routerSignature,
              routerKey.isValidSignature(routerSignature, for: bodyBytes + nodeSignature, domain: .receiptByRouter)
        else { throw .badRouterSignature }
    }
}
