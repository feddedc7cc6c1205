import EdgeMatrixCore
import Foundation
import Testing

@Suite("Receipts")
struct ReceiptTests {
    let node = SigningKey()
    let router = SigningKey()

    func body(node: SigningKey? = nil, router: SigningKey? = nil) -> ReceiptBody {
        ReceiptBody(payer: Account(owner: self.router.publicKey), router: (router ?? self.router).publicKey, node: (node ?? self.node).publicKey,
                    sequence: 1, attempt: 0, app: "llm", model: "smollm2-135m-instruct", prices: UnitPrices(perMillionPromptTokens: 7),
                    units: WorkUnits(promptTokens: 12, completionTokens: 30), startedAtMillis: 1_000, endedAtMillis: 1_250,
                    requestHash: .of(Array("request".utf8)), responseHash: .of(Array("response".utf8)), status: 200)
    }

    @Test("a receipt signed by the node and countersigned by the router verifies, from its exact bytes")
    func signAndVerify() throws {
        var receipt = Receipt(signing: body(), with: node)
        try receipt.countersign(nodeKey: node.publicKey, routerKey: router)
        let received = try Receipt(bodyBytes: receipt.bodyBytes, nodeSignature: receipt.nodeSignature,
                                   routerSignature: receipt.routerSignature)
        try received.verify(nodeKey: node.publicKey, routerKey: router.publicKey)
        #expect(received.body == body())
        #expect(received.id == receipt.id)
    }

    @Test("tampered bytes, a foreign signer or the wrong router are refused")
    func refusals() throws {
        let receipt = Receipt(signing: body(), with: node)
        var tampered = receipt.bodyBytes
        tampered[tampered.count - 3] ^= 1
        let forged = try Receipt(bodyBytes: tampered, nodeSignature: receipt.nodeSignature)
        #expect(throws: ReceiptError.badNodeSignature) { try forged.verifyNodeSignature(nodeKey: node.publicKey) }

        let other = SigningKey()
        let impostor = Receipt(signing: body(), with: other)
        #expect(throws: ReceiptError.badNodeSignature) { try impostor.verifyNodeSignature(nodeKey: node.publicKey) }
        #expect(throws: ReceiptError.wrongNode(expected: other.nodeID, got: node.nodeID)) {
            try impostor.verifyNodeSignature(nodeKey: other.publicKey)
        }

        var misrouted = receipt
        let stranger = SigningKey()
        #expect(throws: ReceiptError.wrongRouter(expected: stranger.nodeID, got: router.nodeID)) {
            try misrouted.countersign(nodeKey: node.publicKey, routerKey: stranger)
        }
        #expect(throws: ReceiptError.badRouterSignature) { try receipt.verify(nodeKey: node.publicKey, routerKey: router.publicKey) }
    }

    @Test("a node signature cannot be replayed as a router signature (domain separation)")
    func domains() throws {
        var receipt = Receipt(signing: body(node: router, router: router), with: router)
        let nodeSignature = receipt.nodeSignature
        let replay = try Receipt(bodyBytes: receipt.bodyBytes, nodeSignature: nodeSignature, routerSignature: nodeSignature)
        #expect(throws: ReceiptError.badRouterSignature) { try replay.verify(nodeKey: router.publicKey, routerKey: router.publicKey) }
        try receipt.countersign(nodeKey: router.publicKey, routerKey: router)
        try receipt.verify(nodeKey: router.publicKey, routerKey: router.publicKey)
    }

    @Test("decoding garbage never crashes and reports what is wrong")
    func garbage() {
        var random = SystemRandomNumberGenerator()
        for length in 0..<300 {
            let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &random) }
            #expect(throws: ReceiptError.self) { _ = try Receipt(bodyBytes: bytes, nodeSignature: []) }
        }
    }
}

@Suite("Key files")
struct KeyFileTests {
    func temporaryPath() -> String { NSTemporaryDirectory() + "emc-key-\(UUID().uuidString)/node.key" }

    @Test("a new key file is written with mode 0600 and reads back as the same key")
    func roundTrip() throws {
        let path = temporaryPath()
        let key = SigningKey()
        try KeyFile.write(key, to: path)
        let mode = try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? NSNumber
        #expect(mode?.uint16Value == 0o600)
        let read = try KeyFile.read(from: path)
        #expect(read.publicKey == key.publicKey)
        #expect(read.nodeID == key.nodeID)
        #expect(read.nodeID.description.count == 40)
    }

    @Test("an existing key is never overwritten by accident")
    func noOverwrite() throws {
        let path = temporaryPath()
        try KeyFile.write(SigningKey(), to: path)
        #expect(throws: KeyError.keyFileExists(path: path)) { try KeyFile.write(SigningKey(), to: path) }
        try KeyFile.write(SigningKey(), to: path, overwrite: true)
    }

    @Test("a key file others can read is refused, and a missing one says how to make one")
    func insecureOrMissing() throws {
        let path = temporaryPath()
        try KeyFile.write(SigningKey(), to: path)
        try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: path)
        #expect(throws: KeyError.keyFileInsecure(path: path, mode: "644")) { _ = try KeyFile.read(from: path) }
        let missing = temporaryPath()
        #expect(throws: KeyError.keyFileMissing(path: missing)) { _ = try KeyFile.read(from: missing) }
    }

    @Test("a key file whose public key does not match its private key is refused")
    func mismatched() throws {
        var file = KeyFile(key: SigningKey())
        file.publicKey = SigningKey().publicKey.hex
        #expect(throws: KeyError.invalidPrivateKey("public_key does not match private_key")) { _ = try file.signingKey() }
    }
}

@Suite("Amounts")
struct AmountTests {
    @Test("EMC amounts parse to integer base units and print with 8 decimals")
    func parseAndPrint() throws {
        #expect(try Amount(parsing: "12.5").baseUnits == 1_250_000_000)
        #expect(try Amount(parsing: "0.00000001").baseUnits == 1)
        #expect(try Amount(parsing: "2100000000").baseUnits == 210_000_000_000_000_000)
        #expect(Amount(baseUnits: 1_250_000_000).description == "12.50000000")
        #expect(Amount(baseUnits: 1).description == "0.00000001")
        #expect(throws: AmountError.tooManyDecimals("0.000000001")) { _ = try Amount(parsing: "0.000000001") }
        #expect(throws: AmountError.malformed("-1")) { _ = try Amount(parsing: "-1") }
        #expect(throws: AmountError.malformed("1e5")) { _ = try Amount(parsing: "1e5") }
        #expect(throws: AmountError.overflow("184467440737.09551616")) { _ = try Amount(parsing: "184467440737.09551616") }
    }
}

@Suite("Merkle trees")
struct MerkleTests {
    @Test("every leaf's inclusion proof verifies against the root, and a wrong leaf does not")
    func proofs() {
        for count in 1...17 {
            let leaves = (0..<count).map { MerkleTree.leafHash(Array("leaf \($0)".utf8)) }
            let root = MerkleTree.root(leafHashes: leaves)
            for index in 0..<count {
                let proof = MerkleTree.proof(leafHashes: leaves, index: index)!
                #expect(MerkleTree.verify(leafHash: leaves[index], proof: proof, root: root))
                #expect(!MerkleTree.verify(leafHash: MerkleTree.leafHash([9]), proof: proof, root: root))
            }
        }
    }

    @Test("the root depends on order and content")
    func sensitivity() {
        let a = MerkleTree.root(leaves: [[1], [2], [3]])
        #expect(a == MerkleTree.root(leaves: [[1], [2], [3]]))
        #expect(a != MerkleTree.root(leaves: [[2], [1], [3]]))
        #expect(a != MerkleTree.root(leaves: [[1], [2], [4]]))
    }
}

@Suite("Signing domains")
struct SigningDomainTests {
    @Test("every message kind has its own tag, and a signature made in one domain verifies in no other")
    func domainsAreDistinct() {
        let tags = SigningDomain.allCases.map(\.rawValue)
        #expect(Set(tags).count == tags.count)
        #expect(tags.allSatisfy { !$0.utf8.contains(0) })  // the 0x00 after the tag ends it
        let key = SigningKey()
        let bytes: [UInt8] = Array("the same bytes".utf8)
        for domain in SigningDomain.allCases {
            let signature = key.sign(bytes, domain: domain)
            for other in SigningDomain.allCases {
                #expect(key.publicKey.isValidSignature(signature, for: bytes, domain: other) == (other == domain), "\(domain) vs \(other)")
            }
        }
    }
}
