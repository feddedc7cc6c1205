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
}

/// What a compute node attests about one finished request. Signed by the node, countersigned by the router;
/// the basis of settlement.
public struct ReceiptBody: Hashable, Sendable, Codable {
    public static let version: UInt8 = 1

    public var requestID: String
    public var nodeID: NodeID
    public var routerID: NodeID
    public var app: String
    public var model: String
    public var requestHash: Hash32
    public var responseHash: Hash32
    public var units: WorkUnits
    /// Milliseconds since the Unix epoch, by the node's clock.
    public var startedAtMillis: UInt64
    public var endedAtMillis: UInt64
    /// HTTP status the app answered with.
    public var status: UInt16

    public init(requestID: String, nodeID: NodeID, routerID: NodeID, app: String, model: String, requestHash: Hash32,
                responseHash: Hash32, units: WorkUnits, startedAtMillis: UInt64, endedAtMillis: UInt64, status: UInt16) {
        self.requestID = requestID
        self.nodeID = nodeID
        self.routerID = routerID
        self.app = app
        self.model = model
        self.requestHash = requestHash
        self.responseHash = responseHash
        self.units = units
        self.startedAtMillis = startedAtMillis
        self.endedAtMillis = endedAtMillis
        self.status = status
    }
}

extension ReceiptBody: CanonicalCodable {
    public func encode(to writer: inout ByteWriter) {
        writer.write(Self.version)
        writer.write(requestID)
        nodeID.encode(to: &writer)
        routerID.encode(to: &writer)
        writer.write(app)
        writer.write(model)
        requestHash.encode(to: &writer)
        responseHash.encode(to: &writer)
        writer.write(units.promptTokens)
        writer.write(units.completionTokens)
        writer.write(units.items)
        writer.write(startedAtMillis)
        writer.write(endedAtMillis)
        writer.write(status)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let version = try reader.readUInt8()
        guard version == Self.version else { throw .invalidValue("receipt version \(version)") }
        requestID = try reader.readString()
        nodeID = try NodeID(from: &reader)
        routerID = try NodeID(from: &reader)
        app = try reader.readString()
        model = try reader.readString()
        requestHash = try Hash32(from: &reader)
        responseHash = try Hash32(from: &reader)
        units = WorkUnits(promptTokens: try reader.readUInt64(), completionTokens: try reader.readUInt64(),
                          items: try reader.readUInt64())
        startedAtMillis = try reader.readUInt64()
        endedAtMillis = try reader.readUInt64()
        status = try reader.readUInt16()
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

    public func verifyNodeSignature(nodeKey: PublicKey) throws(ReceiptError) {
        guard body.nodeID == nodeKey.nodeID else { throw .wrongNode(expected: nodeKey.nodeID, got: body.nodeID) }
        guard nodeKey.isValidSignature(nodeSignature, for: bodyBytes, domain: .receiptByNode) else { throw .badNodeSignature }
    }

    /// The router's side: check the node's signature, then countersign.
    public mutating func countersign(nodeKey: PublicKey, routerKey: SigningKey) throws(ReceiptError) {
        try verifyNodeSignature(nodeKey: nodeKey)
        guard body.routerID == routerKey.nodeID else { throw .wrongRouter(expected: routerKey.nodeID, got: body.routerID) }
        routerSignature = routerKey.sign(bodyBytes + nodeSignature, domain: .receiptByRouter)
    }

    public func verify(nodeKey: PublicKey, routerKey: PublicKey) throws(ReceiptError) {
        try verifyNodeSignature(nodeKey: nodeKey)
        guard body.routerID == routerKey.nodeID else { throw .wrongRouter(expected: routerKey.nodeID, got: body.routerID) }
        guard let routerSignature,
              routerKey.isValidSignature(routerSignature, for: bodyBytes + nodeSignature, domain: .receiptByRouter)
        else { throw .badRouterSignature }
    }
}
