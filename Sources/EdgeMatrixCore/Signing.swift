/// Domain tags prepended to signed bytes, so a signature made for one purpose can never be replayed as another.
/// The signature covers `tag || bytes`, where `bytes` are exactly the bytes sent.
public enum SigningDomain: String, Sendable, CaseIterable {
    /// A node key's ledger registration statement.
    case nodeRegistration = "edgematrix/node-registration/v1"
    /// A compute node registering on a router's tunnel (nonces, router id, descriptor).
    case tunnelRegistration = "edgematrix/tunnel-registration/v1"
    /// A router answering a compute node's challenge nonce.
    case routerHandshake = "edgematrix/router-handshake/v1"
    case receiptByNode = "edgematrix/receipt-node/v1"
    case receiptByRouter = "edgematrix/receipt-router/v1"
    /// An account binding an API key (by its hash) to itself at one router (`APIKeyBinding`).
    case apiKeyBinding = "edgematrix/api-key-binding/v1"
    case transaction = "edgematrix/transaction/v1"
    case vote = "edgematrix/vote/v1"
    case proposal = "edgematrix/proposal/v1"
    case peerHandshake = "edgematrix/peer-handshake/v1"
    /// A node key vouching for the TLS key in its certificate (router tunnel and validator links).
    case tlsBinding = "edgematrix/tls-binding/v1"

    public func message(_ bytes: [UInt8]) -> [UInt8] { Array(rawValue.utf8) + [0] + bytes }
}

extension SigningKey {
    public func sign(_ bytes: [UInt8], domain: SigningDomain) -> [UInt8] { sign(domain.message(bytes)) }
}

extension PublicKey {
    public func isValidSignature(_ signature: [UInt8], for bytes: [UInt8], domain: SigningDomain) -> Bool {
        isValidSignature(signature, for: domain.message(bytes))
    }
}
