import Crypto
import EdgeMatrixCore
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import NIOCore
import NIOSSL
import SwiftASN1
import X509

public enum NodeTLSError: Error, CustomStringConvertible, Sendable {
    case unreadable(path: String, reason: String)
    case unwritable(path: String)

    public var description: String {
        switch self {
        case .unreadable(let path, let reason): "cannot read TLS material at \(path): \(reason); delete it to have it recreated"
        case .unwritable(let path): "cannot write \(path): check that the data directory is writable"
        }
    }
}

/// TLS bound to Ed25519 node keys, with no CA: for the router tunnel (the router's key, pinned by compute nodes)
/// and, mutually, for validator-to-validator links.
///
/// A node serves (and, on mutual links, presents) a self-signed ECDSA P-256 certificate carrying an extension with
/// its node key and that key's signature (domain `tlsBinding`) over the certificate's SubjectPublicKeyInfo. A client
/// accepts only a server whose certificate is bound to the key it pinned; a validator accepts only a client whose
/// certificate is bound to a key it admits (the chain's validators), so no RPC, GetBlocks included, runs on a link
/// that fails this.
public struct NodeTLS: Sendable {
    /// Private-arc OID for the binding extension: 32-byte node key ‖ 64-byte signature.
    public static let bindingOID: ASN1ObjectIdentifier = [1, 3, 6, 1, 4, 1, 59_111, 1, 2]

    public let certificatePEM: String
    public let privateKeyPEM: String

    /// Loads `NAME-cert.pem` / `NAME-key.pem` from `directory`, creating them (bound to `key`) if absent or bound
    /// to another key.
    public static func loadOrCreate(in directory: String, name: String, key: SigningKey) throws -> NodeTLS {
        let certPath = directory + "/\(name)-cert.pem", keyPath = directory + "/\(name)-key.pem"
        let fm = FileManager.default
        if fm.fileExists(atPath: certPath), fm.fileExists(atPath: keyPath) {
            let tls: NodeTLS
            do {
                tls = NodeTLS(certificatePEM: try String(contentsOfFile: certPath, encoding: .utf8),
                              privateKeyPEM: try String(contentsOfFile: keyPath, encoding: .utf8))
            } catch {
                throw NodeTLSError.unreadable(path: certPath, reason: "\(error)")
            }
            if let der = try? Certificate(pemEncoded: tls.certificatePEM).derBytes, boundKey(certificateDER: der) == key.publicKey {
                return tls
            }
        }
        let tls = try make(key: key)
        try fm.createDirectory(atPath: directory, withIntermediateDirectories: true)
        guard fm.createFile(atPath: keyPath, contents: Data(tls.privateKeyPEM.utf8), attributes: [.posixPermissions: 0o600]) else {
            throw NodeTLSError.unwritable(path: keyPath)
        }
        try Data(tls.certificatePEM.utf8).write(to: URL(fileURLWithPath: certPath), options: .atomic)
        return tls
    }

    public static func make(key: SigningKey) throws -> NodeTLS {
        let tlsKey = P256.Signing.PrivateKey()
        let publicKey = Certificate.PublicKey(tlsKey.publicKey)
        let binding = key.publicKey.rawRepresentation + key.sign(Array(publicKey.subjectPublicKeyInfoBytes), domain: .tlsBinding)
        let name = try DistinguishedName { CommonName("edgematrix-node-\(key.nodeID.short)") }
        let now = Date()
        let certificate = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: publicKey,
            notValidBefore: now.addingTimeInterval(-3600), notValidAfter: now.addingTimeInterval(20 * 365 * 86_400),
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Certificate.Extension(oid: bindingOID, critical: false, value: ArraySlice(binding))
            },
            issuerPrivateKey: Certificate.PrivateKey(tlsKey))
        return NodeTLS(certificatePEM: try certificate.serializeAsPEM().pemString, privateKeyPEM: tlsKey.pemRepresentation)
    }

    /// The node key a certificate (DER) is bound to, or nil when it carries no binding that verifies.
    public static func boundKey(certificateDER: [UInt8]) -> PublicKey? {
        guard let certificate = try? Certificate(derEncoded: certificateDER),
              let binding = certificate.extensions.first(where: { $0.oid == bindingOID }), binding.value.count == 32 + 64,
              let key = try? PublicKey(rawRepresentation: Array(binding.value.prefix(32))),
              key.isValidSignature(Array(binding.value.suffix(64)), for: Array(certificate.publicKey.subjectPublicKeyInfoBytes),
                                   domain: .tlsBinding) else { return nil }
        return key
    }

    /// The node key the client of an RPC proved in the mutual TLS handshake, or nil when the transport gives no
    /// client certificate bound to a key (then nothing may be served).
    public static func boundKey(of context: ServerContext) -> PublicKey? {
        guard let specific = context.transportSpecific as? HTTP2ServerTransport.Posix.Context,
              let certificate = specific.peerCertificate, let der = try? certificate.derBytes else { return nil }
        return boundKey(certificateDER: der)
    }

    /// A verification callback that passes a peer whose leaf certificate is bound to a key `accept` takes.
    static func verifier(_ accept: @escaping @Sendable (PublicKey) -> Bool)
        -> @Sendable ([NIOSSLCertificate], EventLoopPromise<NIOSSLVerificationResultWithMetadata>) -> Void {
        { certificates, promise in
            guard let leaf = certificates.first, let der = try? leaf.toDERBytes(), let key = boundKey(certificateDER: der), accept(key) else {
                promise.succeed(.failed)
                return
            }
            promise.succeed(.certificateVerified(VerificationMetadata(nil)))
        }
    }

    /// Server side: a client certificate is required, bound to a key that `admit` takes at handshake time.
    public func serverSecurity(admit: @escaping @Sendable (PublicKey) -> Bool) -> HTTP2ServerTransport.Posix.TransportSecurity {
        .mTLS(certificateChain: [.bytes(Array(certificatePEM.utf8), format: .pem)],
              privateKey: .bytes(Array(privateKeyPEM.utf8), format: .pem)) { config in
            config.clientCertificateVerification = .noHostnameVerification
            config.customVerificationCallback = Self.verifier(admit)
        }
    }

    /// Server side without client certificates (the router tunnel: compute nodes prove their keys by signature).
    public func serverSecurity() -> HTTP2ServerTransport.Posix.TransportSecurity {
        .tls(.defaults(certificateChain: [.bytes(Array(certificatePEM.utf8), format: .pem)],
                       privateKey: .bytes(Array(privateKeyPEM.utf8), format: .pem)))
    }

    /// Client side without a certificate of its own: accepts only a server bound to `pinned` (a compute node dialling
    /// its router).
    public static func clientSecurity(pinnedServer pinned: PublicKey) -> HTTP2ClientTransport.Posix.TransportSecurity {
        .tls(.defaults { config in
            config.serverCertificateVerification = .noHostnameVerification
            config.customVerificationCallback = verifier { $0 == pinned }
        })
    }

    /// Client side: presents this node's certificate and accepts only a server bound to `pinned`.
    public func clientSecurity(pinned: PublicKey) -> HTTP2ClientTransport.Posix.TransportSecurity {
        .mTLS(certificateChain: [.bytes(Array(certificatePEM.utf8), format: .pem)],
              privateKey: .bytes(Array(privateKeyPEM.utf8), format: .pem)) { config in
            config.serverCertificateVerification = .noHostnameVerification
            config.customVerificationCallback = Self.verifier { $0 == pinned }
        }
    }
}

extension Certificate {
    var derBytes: [UInt8] {
        get throws {
            var serializer = DER.Serializer()
            try serializer.serialize(self)
            return serializer.serializedBytes
        }
    }
}

/// An IP literal as an address target (TLS must not send an IP address as SNI), anything else as a DNS name.
public func peerTarget(host: String, port: Int) -> any ResolvableTarget {
    if host.contains(":") { return ResolvableTargets.IPv6.ipv6(address: host.trimmingCharacters(in: CharacterSet(charactersIn: "[]")), port: port) }
    let octets = host.split(separator: ".", omittingEmptySubsequences: false)
    if octets.count == 4, octets.allSatisfy({ UInt8($0) != nil }) { return ResolvableTargets.IPv4.ipv4(address: host, port: port) }
    return ResolvableTargets.DNS.dns(host: host, port: port)
}
