import EdgeMatrixCore

// The tunnel between a compute node and a router. The compute node dials OUT (so it works behind NAT) and keeps:
//  - one Control stream: mutual key proof, registration, status heartbeats, receipt re-delivery;
//  - a pool of Work streams, one per unit of free capacity. The router assigns a request to an idle Work stream,
//    so forwarding costs no extra round trip, and each request gets HTTP/2 flow control and cancellation of its own.
//
// On the wire these are the protobuf messages of proto/edgematrix/tunnel/v1/tunnel.proto (generated code in
// Generated/, conversions in TunnelService.swift). The Swift types below are what the router and the compute node
// work with. Signed payloads (the node descriptor inside a registration, receipts) stay the exact canonical bytes
// that were signed; `NodeDescriptor` keeps its canonical encoding for that reason.

/// A local app the node offers.
public struct AppDescriptor: Hashable, Sendable, Codable {
    public enum Kind: String, Sendable, Codable, CaseIterable { case openai, rest }
    public var name: String
    public var kind: Kind
    public var models: [String]
    public var healthy: Bool

    public init(name: String, kind: Kind, models: [String], healthy: Bool = true) {
        self.name = name
        self.kind = kind
        self.models = models
        self.healthy = healthy
    }
}

public struct GPUInfo: Hashable, Sendable, Codable {
    public var name: String
    public var memoryMiB: UInt64
    public init(name: String, memoryMiB: UInt64) {
        self.name = name
        self.memoryMiB = memoryMiB
    }
}

public struct HardwareInfo: Hashable, Sendable, Codable {
    public var cpuCores: UInt32
    public var memoryMiB: UInt64
    public var gpus: [GPUInfo]
    public init(cpuCores: UInt32, memoryMiB: UInt64, gpus: [GPUInfo]) {
        self.cpuCores = cpuCores
        self.memoryMiB = memoryMiB
        self.gpus = gpus
    }
}

/// What a node declares about itself when it registers. Signed by the node key.
public struct NodeDescriptor: Hashable, Sendable, Codable {
    public var apps: [AppDescriptor]
    public var maxConcurrent: UInt32
    public var hardware: HardwareInfo
    public var version: String

    public init(apps: [AppDescriptor], maxConcurrent: UInt32, hardware: HardwareInfo, version: String) {
        self.apps = apps
        self.maxConcurrent = maxConcurrent
        self.hardware = hardware
        self.version = version
    }
}

extension NodeDescriptor: CanonicalCodable {
    public func encode(to writer: inout ByteWriter) {
        writer.write(UInt32(apps.count))
        for app in apps {
            writer.write(app.name)
            writer.write(app.kind.rawValue)
            writer.write(UInt32(app.models.count))
            for model in app.models { writer.write(model) }
            writer.write(app.healthy)
        }
        writer.write(maxConcurrent)
        writer.write(hardware.cpuCores)
        writer.write(hardware.memoryMiB)
        writer.write(UInt32(hardware.gpus.count))
        for gpu in hardware.gpus {
            writer.write(gpu.name)
            writer.write(gpu.memoryMiB)
        }
        writer.write(version)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let appCount = try reader.readCount(limit: 256)
        var apps = [AppDescriptor]()
        for _ in 0..<appCount {
            let name = try reader.readString()
            let kindRaw = try reader.readString()
            guard let kind = AppDescriptor.Kind(rawValue: kindRaw) else { throw .invalidValue("app kind \(kindRaw)") }
            let modelCount = try reader.readCount(limit: 1024)
            var models = [String]()
            for _ in 0..<modelCount { models.append(try reader.readString()) }
            apps.append(AppDescriptor(name: name, kind: kind, models: models, healthy: try reader.readBool()))
        }
        let maxConcurrent = try reader.readUInt32()
        let cores = try reader.readUInt32()
        let memory = try reader.readUInt64()
        let gpuCount = try reader.readCount(limit: 64)
        var gpus = [GPUInfo]()
        for _ in 0..<gpuCount { gpus.append(GPUInfo(name: try reader.readString(), memoryMiB: try reader.readUInt64())) }
        self.init(apps: apps, maxConcurrent: maxConcurrent,
                  hardware: HardwareInfo(cpuCores: cores, memoryMiB: memory, gpus: gpus), version: try reader.readString())
    }
}

extension ByteReader {
    /// A u32 element count, bounded so hostile input cannot make us loop or allocate without end.
    public mutating func readCount(limit: Int) throws(DecodingError) -> Int {
        let count = Int(try readUInt32())
        guard count <= limit else { throw .lengthTooLarge(count, limit: limit) }
        return count
    }
}

// MARK: - Control stream

/// Control messages from the compute node.
public enum NodeControlMessage: Sendable, Equatable {
    /// First message: the node's fresh nonce, which the router must sign to prove it holds the pinned router key.
    case hello(nodeNonce: [UInt8])
    /// Registration: the signed bytes are `registrationPayload(routerNonce:nodeNonce:routerID:descriptorBytes:)`.
    case register(nodeKey: PublicKey, descriptorBytes: [UInt8], signature: [UInt8])
    /// Heartbeat with live state.
    case status(inFlight: UInt32, healthyApps: [String])
    /// A receipt whose acknowledgement was lost (router restart); re-delivered until acknowledged.
    case receipt(bodyBytes: [UInt8], nodeSignature: [UInt8])
}

/// Control messages from the router.
public enum RouterControlMessage: Sendable, Equatable {
    /// Router's proof of identity over the node's nonce, and its own nonce for the node to sign.
    case challenge(routerKey: PublicKey, routerNonce: [UInt8], signature: [UInt8])
    /// Registration accepted; Work streams present the session token (the tunnel is the only place it travels).
    case accepted(sessionToken: [UInt8])
    case rejected(code: String, message: String)
    /// The receipt is stored; `routerSignature` is the router's countersignature (64 bytes; empty from an older
    /// router), which lets the node keep a receipt it can prove on chain by itself.
    case receiptAck(receiptID: Hash32, routerSignature: [UInt8])
}

extension RouterControlMessage {
    /// `rejected` code for a re-delivered receipt the router refused; the message is the receipt id in hex, so
    /// the node drops it rather than re-sending it after every reconnect.
    public static let receiptRefusedCode = "receipt_refused"
}

public enum TunnelHandshake {
    public static let nonceLength = 32

    /// Bytes the router signs: proves it holds the key the node pinned, bound to this session's nonces.
    public static func challengePayload(nodeNonce: [UInt8], routerNonce: [UInt8]) -> [UInt8] {
        var writer = ByteWriter()
        writer.write(bytes: nodeNonce)
        writer.write(bytes: routerNonce)
        return writer.bytes
    }

    /// Bytes the node signs to register: proves possession of its node key, bound to this router and session.
    public static func registrationPayload(routerNonce: [UInt8], nodeNonce: [UInt8], routerID: NodeID,
                                           descriptorBytes: [UInt8]) -> [UInt8] {
        var writer = ByteWriter()
        writer.write(bytes: routerNonce)
        writer.write(bytes: nodeNonce)
        routerID.encode(to: &writer)
        writer.write(bytes: descriptorBytes)
        return writer.bytes
    }

    public static func randomNonce() -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<nonceLength).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
    }
}

// MARK: - Work streams

/// A request the router assigns to a compute node.
public struct WorkRequest: Sendable, Equatable {
    public var requestID: String
    public var app: String
    public var model: String
    public var method: String
    /// Path on the local app, e.g. `/v1/chat/completions`.
    public var path: String
    public var contentType: String
    public var body: [UInt8]
    public var stream: Bool
    /// The router's sequence number for the request, and which attempt (node) this is: the receipt's identity.
    public var sequence: UInt64
    public var attempt: UInt32
    /// The account the request's API key is bound to, and the node's unit prices in force: the receipt names both.
    public var payer: Account
    public var prices: UnitPrices

    public init(requestID: String, app: String, model: String, method: String, path: String, contentType: String,
                body: [UInt8], stream: Bool, sequence: UInt64, attempt: UInt32, payer: Account, prices: UnitPrices) {
        self.sequence = sequence
        self.attempt = attempt
        self.payer = payer
        self.prices = prices
        self.requestID = requestID
        self.app = app
        self.model = model
        self.method = method
        self.path = path
        self.contentType = contentType
        self.body = body
        self.stream = stream
    }
}

/// Work-stream messages from the router.
public enum RouterWorkMessage: Sendable, Equatable {
    case assign(WorkRequest)
    /// The client went away: stop the work.
    case cancel
    /// The receipt is durably stored, with the router's countersignature (as on the control stream).
    case receiptAck(receiptID: Hash32, routerSignature: [UInt8])
}

/// Work-stream messages from the compute node.
public enum NodeWorkMessage: Sendable, Equatable {
    /// First message on a new Work stream: the node offers one unit of capacity.
    case ready(sessionToken: [UInt8])
    /// The app's answer began: status and content type. Arrival of this message is the "first byte".
    case head(status: UInt16, contentType: String)
    case chunk([UInt8])
    /// The answer is complete; the signed receipt follows in the same message.
    case end(receiptBody: [UInt8], nodeSignature: [UInt8])
    /// The node could not serve the request (app unreachable, unknown app/model...).
    case failed(code: String, message: String)
}

