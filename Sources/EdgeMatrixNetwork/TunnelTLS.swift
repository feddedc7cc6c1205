import Crypto
import EdgeMatrixCore
import Foundation
import GRPCNIOTransportHTTP2
import NIOCore
import NIOSSL
import SwiftASN1
import X509

public enum TunnelTLSError: Error, CustomStringConvertible, Sendable {
    case unreadable(path: String, reason: String)
    case certificateNotBound(String)

    public var description: String {
        switch self {
        case .unreadable(let path, let reason): "cannot read TLS material at \(path): \(reason); delete it to have it recreated"
        case .certificateNotBound(let why): "router TLS certificate is not bound to the pinned router key: \(why)"
        }
    }
}

/// TLS for the router tunnel, bound to the router's Ed25519 node key.
///
/// The router serves a self-signed ECDSA P-256 certificate (TLS stacks agree on P-256 everywhere) carrying an
/// extension with the router node key's signature over the certificate's SubjectPublicKeyInfo. A compute node
/// accepts the TLS handshake only if that signature verifies under the router key it pinned, so the encrypted
/// channel itself is authenticated: there is no CA, and no certificate but the pinned router's passes.
public struct TunnelTLS: Sendable {
    /// Private-arc OID for the binding extension.
    public static let bindingOID: ASN1ObjectIdentifier = [1, 3, 6, 1, 4, 1, 59_111, 1, 1]

    public let certificatePEM: String
    public let privateKeyPEM: String

    /// Loads `tunnel-cert.pem` / `tunnel-key.pem` from `directory`, creating them (bound to `routerKey`) if absent.
    public static func loadOrCreate(in directory: String, routerKey: SigningKey) throws -> TunnelTLS {
        let certPath = directory + "/tunnel-cert.pem", keyPath = directory + "/tunnel-key.pem"
        let fm = FileManager.default
        if fm.fileExists(atPath: certPath), fm.fileExists(atPath: keyPath) {
            do {
                let tls = TunnelTLS(certificatePEM: try String(contentsOfFile: certPath, encoding: .utf8),
                                    privateKeyPEM: try String(contentsOfFile: keyPath, encoding: .utf8))
                // A certificate made for another key (the node key was replaced) is made anew.
                if (try? tls.verifyBinding(routerKey: routerKey.publicKey)) != nil { return tls }
            } catch {
                throw TunnelTLSError.unreadable(path: certPath, reason: "\(error)")
            }
        }
        let tls = try make(routerKey: routerKey)
        try fm.createDirectory(atPath: directory, withIntermediateDirectories: true)
        fm.createFile(atPath: keyPath, contents: Data(tls.privateKeyPEM.utf8), attributes: [.posixPermissions: 0o600])
        try Data(tls.certificatePEM.utf8).write(to: URL(fileURLWithPath: certPath), options: .atomic)
        return tls
    }

    public static func make(routerKey: SigningKey) throws -> TunnelTLS {
        let tlsKey = P256.Signing.PrivateKey()
        let publicKey = Certificate.PublicKey(tlsKey.publicKey)
        let binding = routerKey.sign(Array(publicKey.subjectPublicKeyInfoBytes), domain: .tlsBinding)
        let name = try DistinguishedName { CommonName("edgematrix-router-\(routerKey.nodeID.short)") }
        let now = Date()
        let certificate = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: publicKey,
            notValidBefore: now.addingTimeInterval(-3600), notValidAfter: now.addingTimeInterval(20 * 365 * 86_400),
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Certificate.Extension(oid: bindingOID, critical: false, value: ArraySlice(binding))
                SubjectAlternativeNames([.dnsName("localhost"), .ipAddress(ASN1OctetString(contentBytes: [127, 0, 0, 1]))])
            },
            issuerPrivateKey: Certificate.PrivateKey(tlsKey))
        return TunnelTLS(certificatePEM: try certificate.serializeAsPEM().pemString, privateKeyPEM: tlsKey.pemRepresentation)
    }

    /// Checks that a certificate (DER) carries a valid binding signature by `routerKey`.
    public static func verifyBinding(certificateDER: [UInt8], routerKey: PublicKey) throws {
        let certificate: Certificate
        do { certificate = try Certificate(derEncoded: certificateDER) } catch {
            throw TunnelTLSError.certificateNotBound("not an X.509 certificate")
        }
        guard let binding = certificate.extensions.first(where: { $0.oid == bindingOID }) else {
            throw TunnelTLSError.certificateNotBound("no binding extension")
        }
        guard routerKey.isValidSignature(Array(binding.value), for: Array(certificate.publicKey.subjectPublicKeyInfoBytes),
                                         domain: .tlsBinding) else {
            throw TunnelTLSError.certificateNotBound("the binding signature is not by router \(routerKey.nodeID)")
        }
    }

    func verifyBinding(routerKey: PublicKey) throws {
        let certificate = try Certificate(pemEncoded: certificatePEM)
        var serializer = DER.Serializer()
        try serializer.serialize(certificate)
        try Self.verifyBinding(certificateDER: serializer.serializedBytes, routerKey: routerKey)
    }

    /// The router's server-side transport security.
    public func serverSecurity() -> HTTP2ServerTransport.Posix.TransportSecurity {
        .tls(.defaults(certificateChain: [.bytes(Array(certificatePEM.utf8), format: .pem)],
                       privateKey: .bytes(Array(privateKeyPEM.utf8), format: .pem)))
    }

    /// A compute node's client-side security: TLS that only a certificate bound to `pinnedRouterKey` passes.
    public static func clientSecurity(pinnedRouterKey: PublicKey) -> HTTP2ClientTransport.Posix.TransportSecurity {
        .tls(.defaults { config in
            config.customVerificationCallback = { certificates, promise in
                guard let leaf = certificates.first, let der = try? leaf.toDERBytes(),
                      (try? verifyBinding(certificateDER: der, routerKey: pinnedRouterKey)) != nil else {
                    promise.succeed(.failed)
                    return
                }
                promise.succeed(.certificateVerified(VerificationMetadata(nil)))
            }
        })
    }
}
