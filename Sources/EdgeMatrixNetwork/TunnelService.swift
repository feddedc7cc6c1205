import EdgeMatrixCore
import Foundation
import GRPCCore
import SwiftProtobuf

/// The tunnel service (`edgematrix.tunnel.v1.Tunnel`, proto/edgematrix/tunnel/v1/tunnel.proto): served by routers,
/// called by compute nodes. Both sides use `ProtobufWireSerializer` / `ProtobufWireDeserializer` with the Swift
/// message types of TunnelMessages.swift; the conversions below check every field from the other side.
public enum TunnelService {
    public static let descriptor = Edgematrix_Tunnel_V1_Tunnel.descriptor
    public static let control = Edgematrix_Tunnel_V1_Tunnel.Method.Control.descriptor
    public static let work = Edgematrix_Tunnel_V1_Tunnel.Method.Work.descriptor
}

/// Bounds on tunnel message fields, checked when a message is decoded (honest peers stay far below). Bodies and
/// chunks are bounded by the transport's message limit. The signed payloads get loose framing bounds here: the
/// router applies its own, tighter, limits to them after decoding and answers with a specific code (a descriptor
/// over 64 KiB is `bad_descriptor`, an oversized receipt `malformed_receipt`) and disconnects the node.
public enum TunnelLimits {
    public static let maxSignatureBytes = 64
    public static let maxSessionTokenBytes = 64
    /// A signed node descriptor (canonical `NodeDescriptor`).
    public static let maxDescriptorBytes = 1 << 20
    /// A signed receipt body (canonical `ReceiptBody`).
    public static let maxReceiptBodyBytes = 2 << 20
    /// Names and codes: request id, app, model, method, reject/failure code, healthy app names.
    public static let maxNameBytes = 1_024
    /// Free text: paths, content types, human-readable messages.
    public static let maxTextBytes = 64 << 10
    public static let maxHealthyApps = 256
}

extension ProtobufWire {
    static func hash(_ data: Data, _ field: String) throws(DecodingError) -> Hash32 {
        guard let hash = Hash32(bytes: [UInt8](data)) else { throw .invalidValue("\(field): expected 32 bytes, got \(data.count)") }
        return hash
    }

    static func name(_ text: String, _ field: String) throws(DecodingError) -> String {
        try bounded(text, TunnelLimits.maxNameBytes, field)
    }

    static func text(_ text: String, _ field: String) throws(DecodingError) -> String {
        try bounded(text, TunnelLimits.maxTextBytes, field)
    }

    static func signature(_ data: Data, _ field: String) throws(DecodingError) -> [UInt8] {
        try bounded(data, TunnelLimits.maxSignatureBytes, field)
    }

    /// A receipt acknowledgement's router signature: exactly 64 bytes, or none (an older router).
    static func countersignature(_ data: Data) throws(DecodingError) -> [UInt8] {
        guard data.isEmpty || data.count == 64 else {
            throw .invalidValue("receipt_ack.router_signature: expected 64 bytes or none, got \(data.count)")
        }
        return [UInt8](data)
    }
}

// MARK: - Shared parts

extension Account {
    var tunnelProto: Edgematrix_Tunnel_V1_Account {
        .with { $0.owner = Data(owner.rawRepresentation); $0.subaccount = subaccount.map { Data($0.bytes) } ?? Data() }
    }

    init(tunnelProto account: Edgematrix_Tunnel_V1_Account) throws(DecodingError) {
        let owner = try ProtobufWire.key(account.owner, "payer.owner")
        if account.subaccount.isEmpty { self.init(owner: owner); return }
        guard let subaccount = Subaccount(bytes: [UInt8](account.subaccount)) else {
            throw .invalidValue("payer.subaccount: expected 0 or 32 bytes, got \(account.subaccount.count)")
        }
        self.init(owner: owner, subaccount: subaccount)
    }
}

extension UnitPrices {
    var tunnelProto: Edgematrix_Tunnel_V1_UnitPrices {
        .with {
            $0.perMillionPromptTokens = perMillionPromptTokens
            $0.perMillionCompletionTokens = perMillionCompletionTokens
            $0.perItem = perItem
        }
    }

    init(tunnelProto prices: Edgematrix_Tunnel_V1_UnitPrices) {
        self.init(perMillionPromptTokens: prices.perMillionPromptTokens, perMillionCompletionTokens: prices.perMillionCompletionTokens,
                  perItem: prices.perItem)
    }
}

private func signedReceipt(_ body: [UInt8], _ signature: [UInt8]) -> Edgematrix_Tunnel_V1_SignedReceipt {
    .with { $0.body = Data(body); $0.nodeSignature = Data(signature) }
}

private func receiptParts(_ receipt: Edgematrix_Tunnel_V1_SignedReceipt, _ field: String) throws(DecodingError) -> ([UInt8], [UInt8]) {
    (try ProtobufWire.bounded(receipt.body, TunnelLimits.maxReceiptBodyBytes, "\(field).body"),
     try ProtobufWire.signature(receipt.nodeSignature, "\(field).node_signature"))
}

// MARK: - Control stream

extension NodeControlMessage: ProtobufWireMessage {
    public var proto: Edgematrix_Tunnel_V1_NodeControl {
        var message = Edgematrix_Tunnel_V1_NodeControl()
        switch self {
        case .hello(let nonce):
            message.hello = .with { $0.nodeNonce = Data(nonce) }
        case .register(let key, let descriptor, let signature):
            message.register = .with {
                $0.nodeKey = Data(key.rawRepresentation); $0.descriptor = Data(descriptor); $0.signature = Data(signature)
            }
        case .status(let inFlight, let apps):
            message.status = .with { $0.inFlight = inFlight; $0.healthyApps = apps }
        case .receipt(let body, let signature):
            message.receipt = signedReceipt(body, signature)
        }
        return message
    }

    /// Bounds the repeated `status.healthy_apps` before the decoder allocates it (field 3, then field 2 inside).
    public static func precheck(_ bytes: [UInt8]) throws(DecodingError) {
        for status in try ProtobufWire.payloads(ofField: 3, in: bytes) {
            let count = try ProtobufWire.occurrences(ofField: 2, in: status, limit: TunnelLimits.maxHealthyApps)
            guard count <= TunnelLimits.maxHealthyApps else {
                throw .invalidValue("status: more than \(TunnelLimits.maxHealthyApps) healthy apps")
            }
        }
    }

    public init(proto message: Edgematrix_Tunnel_V1_NodeControl) throws(DecodingError) {
        switch message.kind {
        case .hello(let hello)?:
            self = .hello(nodeNonce: try ProtobufWire.exact(hello.nodeNonce, TunnelHandshake.nonceLength, "hello.node_nonce"))
        case .register(let register)?:
            self = .register(nodeKey: try ProtobufWire.key(register.nodeKey, "register.node_key"),
                             descriptorBytes: try ProtobufWire.bounded(register.descriptor, TunnelLimits.maxDescriptorBytes, "register.descriptor"),
                             signature: try ProtobufWire.signature(register.signature, "register.signature"))
        case .status(let status)?:
            guard status.healthyApps.count <= TunnelLimits.maxHealthyApps else {
                throw .invalidValue("status: \(status.healthyApps.count) healthy apps, at most \(TunnelLimits.maxHealthyApps)")
            }
            var apps = [String]()
            for app in status.healthyApps { apps.append(try ProtobufWire.name(app, "status.healthy_apps")) }
            self = .status(inFlight: status.inFlight, healthyApps: apps)
        case .receipt(let receipt)?:
            let (body, signature) = try receiptParts(receipt, "receipt")
            self = .receipt(bodyBytes: body, nodeSignature: signature)
        case nil:
            throw .invalidValue("node control message with no kind set")
        }
    }
}

extension RouterControlMessage: ProtobufWireMessage {
    public var proto: Edgematrix_Tunnel_V1_RouterControl {
        var message = Edgematrix_Tunnel_V1_RouterControl()
        switch self {
        case .challenge(let key, let nonce, let signature):
            message.challenge = .with {
                $0.routerKey = Data(key.rawRepresentation); $0.routerNonce = Data(nonce); $0.signature = Data(signature)
            }
        case .accepted(let token):
            message.accepted = .with { $0.sessionToken = Data(token) }
        case .rejected(let code, let text):
            message.rejected = .with { $0.code = code; $0.message = text }
        case .receiptAck(let id, let signature):
            message.receiptAck = .with { $0.receiptID = Data(id.bytes); $0.routerSignature = Data(signature) }
        }
        return message
    }

    public init(proto message: Edgematrix_Tunnel_V1_RouterControl) throws(DecodingError) {
        switch message.kind {
        case .challenge(let challenge)?:
            self = .challenge(routerKey: try ProtobufWire.key(challenge.routerKey, "challenge.router_key"),
                              routerNonce: try ProtobufWire.exact(challenge.routerNonce, TunnelHandshake.nonceLength, "challenge.router_nonce"),
                              signature: try ProtobufWire.signature(challenge.signature, "challenge.signature"))
        case .accepted(let accepted)?:
            self = .accepted(sessionToken: try ProtobufWire.bounded(accepted.sessionToken, TunnelLimits.maxSessionTokenBytes,
                                                                    "accepted.session_token"))
        case .rejected(let rejected)?:
            self = .rejected(code: try ProtobufWire.name(rejected.code, "rejected.code"),
                             message: try ProtobufWire.text(rejected.message, "rejected.message"))
        case .receiptAck(let ack)?:
            self = .receiptAck(receiptID: try ProtobufWire.hash(ack.receiptID, "receipt_ack.receipt_id"),
                               routerSignature: try ProtobufWire.countersignature(ack.routerSignature))
        case nil:
            throw .invalidValue("router control message with no kind set")
        }
    }
}

// MARK: - Work streams

extension WorkRequest: ProtobufWireMessage {
    public var proto: Edgematrix_Tunnel_V1_WorkRequest {
        .with {
            $0.requestID = requestID
            $0.app = app
            $0.model = model
            $0.method = method
            $0.path = path
            $0.contentType = contentType
            $0.body = Data(body)
            $0.stream = stream
            $0.sequence = sequence
            $0.attempt = attempt
            $0.payer = payer.tunnelProto
            $0.prices = prices.tunnelProto
        }
    }

    public init(proto request: Edgematrix_Tunnel_V1_WorkRequest) throws(DecodingError) {
        guard request.hasPayer else { throw .invalidValue("assign.payer missing") }
        guard request.hasPrices else { throw .invalidValue("assign.prices missing") }
        self.init(requestID: try ProtobufWire.name(request.requestID, "assign.request_id"),
                  app: try ProtobufWire.name(request.app, "assign.app"),
                  model: try ProtobufWire.name(request.model, "assign.model"),
                  method: try ProtobufWire.name(request.method, "assign.method"),
                  path: try ProtobufWire.text(request.path, "assign.path"),
                  contentType: try ProtobufWire.text(request.contentType, "assign.content_type"),
                  body: [UInt8](request.body), stream: request.stream, sequence: request.sequence, attempt: request.attempt,
                  payer: try Account(tunnelProto: request.payer), prices: UnitPrices(tunnelProto: request.prices))
    }
}

extension RouterWorkMessage: ProtobufWireMessage {
    public var proto: Edgematrix_Tunnel_V1_RouterWork {
        var message = Edgematrix_Tunnel_V1_RouterWork()
        switch self {
        case .assign(let request): message.assign = request.proto
        case .cancel: message.cancel = Edgematrix_Tunnel_V1_Cancel()
        case .receiptAck(let id, let signature):
            message.receiptAck = .with { $0.receiptID = Data(id.bytes); $0.routerSignature = Data(signature) }
        }
        return message
    }

    public init(proto message: Edgematrix_Tunnel_V1_RouterWork) throws(DecodingError) {
        switch message.kind {
        case .assign(let request)?: self = .assign(try WorkRequest(proto: request))
        case .cancel?: self = .cancel
        case .receiptAck(let ack)?:
            self = .receiptAck(receiptID: try ProtobufWire.hash(ack.receiptID, "receipt_ack.receipt_id"),
                               routerSignature: try ProtobufWire.countersignature(ack.routerSignature))
        case nil: throw .invalidValue("router work message with no kind set")
        }
    }
}

extension NodeWorkMessage: ProtobufWireMessage {
    public var proto: Edgematrix_Tunnel_V1_NodeWork {
        var message = Edgematrix_Tunnel_V1_NodeWork()
        switch self {
        case .ready(let token): message.ready = .with { $0.sessionToken = Data(token) }
        case .head(let status, let type): message.head = .with { $0.status = UInt32(status); $0.contentType = type }
        case .chunk(let bytes): message.chunk = Data(bytes)
        case .end(let body, let signature): message.end = signedReceipt(body, signature)
        case .failed(let code, let text): message.failed = .with { $0.code = code; $0.message = text }
        }
        return message
    }

    public init(proto message: Edgematrix_Tunnel_V1_NodeWork) throws(DecodingError) {
        switch message.kind {
        case .ready(let ready)?:
            self = .ready(sessionToken: try ProtobufWire.bounded(ready.sessionToken, TunnelLimits.maxSessionTokenBytes, "ready.session_token"))
        case .head(let head)?:
            guard let status = UInt16(exactly: head.status) else { throw .invalidValue("head.status \(head.status) above 65535") }
            self = .head(status: status, contentType: try ProtobufWire.text(head.contentType, "head.content_type"))
        case .chunk(let bytes)?:
            self = .chunk([UInt8](bytes))
        case .end(let receipt)?:
            let (body, signature) = try receiptParts(receipt, "end")
            self = .end(receiptBody: body, nodeSignature: signature)
        case .failed(let failed)?:
            self = .failed(code: try ProtobufWire.name(failed.code, "failed.code"), message: try ProtobufWire.text(failed.message, "failed.message"))
        case nil:
            throw .invalidValue("node work message with no kind set")
        }
    }
}
