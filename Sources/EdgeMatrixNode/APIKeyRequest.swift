import AsyncHTTPClient
import EdgeMatrixCore
import Foundation
import NIOCore

/// A refused or failed key binding, with the router's stable code (`unreachable` and `invalid_response` come from
/// the client itself).
public struct APIKeyRequestError: Error, CustomStringConvertible, Sendable {
    public var status: Int
    public var code: String
    public var message: String
    public var description: String { status == 0 ? message : "\(code): \(message) (HTTP \(status))" }
}

/// The client side of `POST /v1/keys`: generates an API key secret here, signs its binding with the account's
/// owner key, and posts only the signed binding (the secret never leaves this process until it is printed).
public enum APIKeyRequest {
    public struct Issued: Sendable {
        public var secret: String
        public var id: String
        public var account: Account
        public var router: PublicKey
    }

    /// `routerURL` is the router's HTTP base (`http://host:port`, with or without `/v1`). The router's key is asked of
    /// the router unless `routerKey` pins it.
    public static func bind(routerURL: String, owner: SigningKey, routerKey: PublicKey? = nil,
                            spendLimitPerEpoch: UInt64 = APIKeyBinding.unlimited, label: String,
                            http: HTTPClient = .shared) async throws -> Issued {
        var base = routerURL
        while base.hasSuffix("/") { base.removeLast() }
        if base.hasSuffix("/v1") { base.removeLast(3) }
        let router: PublicKey
        if let routerKey {
            router = routerKey
        } else {
            let info = try await call(HTTPClientRequest(url: base + "/v1/router"), base: base, http: http)
            guard let hex = info["router_key"] as? String, let key = try? PublicKey(hex: hex) else {
                throw APIKeyRequestError(status: 0, code: "invalid_response", message: "\(base)/v1/router did not name a router key")
            }
            router = key
        }
        let secret = APIKeyBinding.newSecret()
        let binding = APIKeyBinding(router: router, account: Account(owner: owner.publicKey), keyHash: APIKeyBinding.hash(ofSecret: secret),
                                    spendLimitPerEpoch: spendLimitPerEpoch,
                                    createdAtMillis: wallClockMillis())
        let signed = SignedAPIKeyBinding(signing: binding, with: owner)
        var request = HTTPClientRequest(url: base + "/v1/keys")
        request.method = .POST
        request.headers.add(name: "content-type", value: "application/json")
        let body = try JSONSerialization.data(withJSONObject: [
            "binding": Hex.encode(signed.bytes), "signature": Hex.encode(signed.signature), "label": label,
        ], options: [.sortedKeys])
        request.body = .bytes(ByteBuffer(bytes: body))
        let answer = try await call(request, base: base, http: http)
        return Issued(secret: secret, id: answer["id"] as? String ?? String(binding.keyHash.hex.prefix(16)),
                      account: binding.account, router: router)
    }

    private static func call(_ request: HTTPClientRequest, base: String, http: HTTPClient) async throws -> [String: Any] {
        let response: HTTPClientResponse
        do { response = try await http.execute(request, timeout: .seconds(15)) } catch {
            throw APIKeyRequestError(status: 0, code: "unreachable", message: "cannot reach the router at \(base) (\(error)); check --router")
        }
        let bytes: ByteBuffer
        do { bytes = try await response.body.collect(upTo: 1 << 20) } catch {
            throw APIKeyRequestError(status: 0, code: "invalid_response", message: "the router at \(base) sent an oversized or broken answer")
        }
        let object = (try? JSONSerialization.jsonObject(with: Data(buffer: bytes))) as? [String: Any]
        guard (200..<300).contains(response.status.code), let object else {
            let error = object?["error"] as? [String: Any]
            throw APIKeyRequestError(status: Int(response.status.code), code: error?["code"] as? String ?? "invalid_response",
                                     message: error?["message"] as? String ?? "unexpected answer from \(base)")
        }
        return object
    }
}
