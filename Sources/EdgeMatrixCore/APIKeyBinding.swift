/// An account's signed statement that the API key with this hash, at this router, spends from this account
/// (docs/PROTOCOL.md, "API key binding"). The router issues a key only against such a statement, and a receipt's
/// payer is exactly the binding's account, so a router can never charge an account for a key it did not bind.
/// The secret itself never leaves the client: only its SHA-256 is signed, sent and stored.
public struct APIKeyBinding: Hashable, Sendable {
    public static let version: UInt8 = 1
    /// The secret's text form: this prefix, then 48 lowercase hex digits.
    public static let secretPrefix = "emc-sk-"
    /// No spend limit (the account relies on its escrow alone).
    public static let unlimited = UInt64.max

    public var router: PublicKey
    public var account: Account
    /// SHA-256 of the secret's UTF-8 bytes.
    public var keyHash: Hash32
    /// The most this key may spend per epoch, in base units.
    public var spendLimitPerEpoch: UInt64
    public var createdAtMillis: UInt64

    public init(router: PublicKey, account: Account, keyHash: Hash32, spendLimitPerEpoch: UInt64, createdAtMillis: UInt64) {
        self.router = router
        self.account = account
        self.keyHash = keyHash
        self.spendLimitPerEpoch = spendLimitPerEpoch
        self.createdAtMillis = createdAtMillis
    }

    /// A fresh random secret (`emc-sk-` + 24 random bytes in hex).
    public static func newSecret() -> String {
        var generator = SystemRandomNumberGenerator()
        return secretPrefix + Hex.encode((0..<24).map { _ in UInt8.random(in: 0...255, using: &generator) })
    }

    public static func hash(ofSecret secret: String) -> Hash32 { Hash32.of(Array(secret.utf8)) }
}

extension APIKeyBinding: CanonicalCodable {
    /// version u8 = 1 ‖ router raw[32] ‖ account ‖ key_hash raw[32] ‖ spend_limit_per_epoch u64 ‖ created_at_ms u64.
    public func encode(to writer: inout ByteWriter) {
        writer.write(Self.version)
        router.encode(to: &writer)
        account.encode(to: &writer)
        keyHash.encode(to: &writer)
        writer.write(spendLimitPerEpoch)
        writer.write(createdAtMillis)
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        let version = try reader.readUInt8()
        guard version == Self.version else { throw .invalidValue("API key binding version \(version)") }
        router = try PublicKey(from: &reader)
        account = try Account(from: &reader)
        keyHash = try Hash32(from: &reader)
        spendLimitPerEpoch = try reader.readUInt64()
        createdAtMillis = try reader.readUInt64()
    }
}

public enum APIKeyBindingError: Error, Equatable, Sendable, CustomStringConvertible {
    case malformed(String)
    case wrongRouter(expected: NodeID, got: NodeID)
    case badSignature

    /// Stable codes, as the router answers them (HTTP 400).
    public var code: String {
        switch self {
        case .malformed: "invalid_binding"
        case .wrongRouter: "wrong_router"
        case .badSignature: "bad_signature"
        }
    }

    public var description: String {
        switch self {
        case .malformed(let why): "the API key binding is malformed (\(why)); build it as docs/PROTOCOL.md describes, or use `emc keys api new`"
        case .wrongRouter(let expected, let got):
            "the binding names router \(got), but this router is \(expected); bind the key to the router you send it to"
        case .badSignature: "the binding's signature does not verify for its account's owner key; sign it with that account's key"
        }
    }
}

/// A binding as it travels and is stored: the exact bytes signed, and the account owner's signature over them.
public struct SignedAPIKeyBinding: Hashable, Sendable {
    public let bytes: [UInt8]
    public let binding: APIKeyBinding
    public let signature: [UInt8]

    /// The account's side: encode and sign with the account's owner key.
    public init(signing binding: APIKeyBinding, with ownerKey: SigningKey) {
        self.binding = binding
        bytes = binding.canonicalBytes
        signature = ownerKey.sign(bytes, domain: .apiKeyBinding)
    }

    /// The router's side: decode received bytes and check that they name `router` and that the account's owner
    /// signed these very bytes.
    public init(bytes: [UInt8], signature: [UInt8], router: PublicKey) throws(APIKeyBindingError) {
        let binding: APIKeyBinding
        do { binding = try APIKeyBinding(canonicalBytes: bytes) } catch { throw .malformed(error.description) }
        guard binding.router == router else { throw .wrongRouter(expected: router.nodeID, got: binding.router.nodeID) }
        guard binding.account.owner.isValidSignature(signature, for: bytes, domain: .apiKeyBinding) else { throw .badSignature }
        self.bytes = bytes
        self.binding = binding
        self.signature = signature
    }
}
