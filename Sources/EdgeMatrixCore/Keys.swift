import Crypto
import Foundation

/// An Ed25519 public key: a node's or an account's identity.
public struct PublicKey: Hashable, Sendable, CustomStringConvertible, Codable {
    public let rawRepresentation: [UInt8]

    public init(rawRepresentation: [UInt8]) throws(KeyError) {
        guard rawRepresentation.count == 32, (try? Curve25519.Signing.PublicKey(rawRepresentation: rawRepresentation)) != nil else {
            throw .invalidPublicKey("expected 32 bytes of Ed25519 public key, got \(rawRepresentation.count)")
        }
        self.rawRepresentation = rawRepresentation
    }

    public init(hex: String) throws(KeyError) {
        guard let raw = Hex.decode(hex) else { throw .invalidPublicKey("not hex: \(hex.prefix(80))") }
        try self.init(rawRepresentation: raw)
    }

    public var hex: String { Hex.encode(rawRepresentation) }
    public var description: String { hex }

    /// The node id derived from this key.
    public var nodeID: NodeID { NodeID(publicKey: self) }

    /// Verifies an Ed25519 signature over exactly `message`.
    public func isValidSignature<M: DataProtocol>(_ signature: [UInt8], for message: M) -> Bool {
        guard signature.count == 64, let key = try? Curve25519.Signing.PublicKey(rawRepresentation: rawRepresentation) else {
            return false
        }
        return key.isValidSignature(signature, for: message)
    }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        self = try PublicKey(hex: text)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(hex)
    }
}

extension PublicKey: CanonicalCodable {
    public func encode(to writer: inout ByteWriter) { writer.writeRaw(rawRepresentation) }
    public init(from reader: inout ByteReader) throws(DecodingError) {
        let raw = try reader.readRaw(count: 32)
        do { try self.init(rawRepresentation: raw) } catch { throw .invalidValue("Ed25519 public key") }
    }
}

/// A node's identity: the first 20 bytes of SHA-256 of its Ed25519 public key, written as 40 hex digits.
public struct NodeID: Hashable, Comparable, Sendable, CustomStringConvertible, Codable {
    public let bytes: [UInt8]

    public init(publicKey: PublicKey) {
        bytes = Array(Hash32.of(publicKey.rawRepresentation).bytes.prefix(20))
    }

    public init?(_ text: String) {
        guard let raw = Hex.decode(text), raw.count == 20 else { return nil }
        bytes = raw
    }

    public var description: String { Hex.encode(bytes) }
    /// A short form for logs.
    public var short: String { String(description.prefix(10)) }

    public static func < (lhs: NodeID, rhs: NodeID) -> Bool { lhs.bytes.lexicographicallyPrecedes(rhs.bytes) }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let id = NodeID(text) else {
            throw Swift.DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "expected a 40-hex-digit node id"))
        }
        self = id
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

extension NodeID: CanonicalCodable {
    public func encode(to writer: inout ByteWriter) { writer.writeRaw(bytes) }
    public init(from reader: inout ByteReader) throws(DecodingError) {
        let raw = try reader.readRaw(count: 20)
        self.init(Hex.encode(raw))!
    }
}

public enum KeyError: Error, Equatable, CustomStringConvertible, Sendable {
    case invalidPublicKey(String)
    case invalidPrivateKey(String)
    case keyFileMissing(path: String)
    case keyFileExists(path: String)
    case keyFileUnreadable(path: String, reason: String)
    case keyFileInsecure(path: String, mode: String)

    public var description: String {
        switch self {
        case .invalidPublicKey(let why): "invalid public key: \(why)"
        case .invalidPrivateKey(let why): "invalid private key: \(why)"
        case .keyFileMissing(let path): "no key file at \(path); create one with `emc keys new`"
        case .keyFileExists(let path): "a key file already exists at \(path); refusing to overwrite it (pass --force to replace it)"
        case .keyFileUnreadable(let path, let reason): "cannot read key file \(path): \(reason)"
        case .keyFileInsecure(let path, let mode): "key file \(path) has permissions \(mode); it must be readable by its owner only (chmod 600)"
        }
    }
}

/// An Ed25519 signing key. Used for node identities and for ledger accounts alike.
// The wrapped key is an immutable value; swift-crypto just does not mark it Sendable.
public struct SigningKey: @unchecked Sendable {
    private let key: Curve25519.Signing.PrivateKey
    public let publicKey: PublicKey

    public init() { self.init(key: Curve25519.Signing.PrivateKey()) }

    /// Deterministic key from a 32-byte seed (tests, genesis fixtures).
    public init(seed: [UInt8]) throws(KeyError) {
        guard seed.count == 32, let key = try? Curve25519.Signing.PrivateKey(rawRepresentation: seed) else {
            throw .invalidPrivateKey("expected a 32-byte Ed25519 seed")
        }
        self.init(key: key)
    }

    private init(key: Curve25519.Signing.PrivateKey) {
        self.key = key
        self.publicKey = try! PublicKey(rawRepresentation: Array(key.publicKey.rawRepresentation))
    }

    public var seed: [UInt8] { Array(key.rawRepresentation) }
    public var nodeID: NodeID { publicKey.nodeID }

    /// Signs exactly `message`.
    public func sign<M: DataProtocol>(_ message: M) -> [UInt8] {
        Array(try! key.signature(for: message))
    }
}

/// The on-disk key file: JSON, written with 0600 permissions.
public struct KeyFile: Codable, Sendable, Equatable {
    public var type: String
    public var privateKey: String
    public var publicKey: String
    public var nodeID: String

    enum CodingKeys: String, CodingKey {
        case type
        case privateKey = "private_key"
        case publicKey = "public_key"
        case nodeID = "node_id"
    }

    public init(key: SigningKey) {
        type = "ed25519"
        privateKey = Hex.encode(key.seed)
        publicKey = key.publicKey.hex
        nodeID = key.nodeID.description
    }

    public func signingKey() throws(KeyError) -> SigningKey {
        guard type == "ed25519" else { throw .invalidPrivateKey("unsupported key type \(type)") }
        guard let seed = Hex.decode(privateKey) else { throw .invalidPrivateKey("private_key is not hex") }
        let key = try SigningKey(seed: seed)
        guard key.publicKey.hex == publicKey.lowercased() else {
            throw .invalidPrivateKey("public_key does not match private_key")
        }
        return key
    }

    /// Writes a new key file; refuses to overwrite unless `overwrite` is set.
    public static func write(_ key: SigningKey, to path: String, overwrite: Bool = false) throws {
        let fm = FileManager.default
        if fm.fileExists(atPath: path), !overwrite { throw KeyError.keyFileExists(path: path) }
        let dir = (path as NSString).deletingLastPathComponent
        if !dir.isEmpty { try fm.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700]) }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let data = try encoder.encode(KeyFile(key: key))
        // Create with 0600 before any secret byte touches the disk.
        let tmp = path + ".tmp"
        _ = fm.createFile(atPath: tmp, contents: nil, attributes: [.posixPermissions: 0o600])
        guard let handle = FileHandle(forWritingAtPath: tmp) else {
            throw KeyError.keyFileUnreadable(path: tmp, reason: "cannot create file")
        }
        try handle.write(contentsOf: data + Data("\n".utf8))
        try handle.synchronize()
        try handle.close()
        if fm.fileExists(atPath: path) { try fm.removeItem(atPath: path) }
        try fm.moveItem(atPath: tmp, toPath: path)
    }

    /// Reads a key file, checking that nobody but its owner can read it.
    public static func read(from path: String) throws -> SigningKey {
        let fm = FileManager.default
        guard fm.fileExists(atPath: path) else { throw KeyError.keyFileMissing(path: path) }
        let attributes = try fm.attributesOfItem(atPath: path)
        if let mode = (attributes[.posixPermissions] as? NSNumber)?.uint16Value, mode & 0o077 != 0 {
            throw KeyError.keyFileInsecure(path: path, mode: String(mode, radix: 8))
        }
        guard let data = fm.contents(atPath: path) else { throw KeyError.keyFileUnreadable(path: path, reason: "unreadable") }
        let file: KeyFile
        do { file = try JSONDecoder().decode(KeyFile.self, from: data) } catch {
            throw KeyError.keyFileUnreadable(path: path, reason: "not a key file (\(error))")
        }
        return try file.signingKey()
    }

    /// Reads the key at `path`, creating it first if there is none.
    public static func loadOrCreate(at path: String) throws -> SigningKey {
        if FileManager.default.fileExists(atPath: path) { return try read(from: path) }
        let key = SigningKey()
        try write(key, to: path)
        return key
    }
}
