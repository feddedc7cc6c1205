import EdgeMatrixCore
@testable import EdgeMatrixLedger
import Testing

@Suite("ICRC-1 account textual encoding")
struct AccountTextTests {
    /// The principal of the ICRC-1 TextualEncoding.md examples.
    static let specPrincipal = "k2t6j-2nvnp-4zjm3-25dtz-6xhaa-c7boj-5gayf-oj3xs-i43lp-teztq-6ae"

    @Test("matches the ICRC-1 specification's examples")
    func specExamples() throws {
        let owner = try AccountText.parsePrincipal(Self.specPrincipal)
        #expect(AccountText.principalText(owner) == Self.specPrincipal)
        // Default subaccount: just the principal, whether absent or explicitly all zeros.
        #expect(AccountText.encode(owner: owner, subaccount: nil) == Self.specPrincipal)
        #expect(AccountText.encode(owner: owner, subaccount: [UInt8](repeating: 0, count: 32)) == Self.specPrincipal)
        // Subaccount 0x0000…01.
        let one = [UInt8](repeating: 0, count: 31) + [1]
        #expect(AccountText.encode(owner: owner, subaccount: one) == "\(Self.specPrincipal)-6cc627i.1")
        // Subaccount 0x0102…20.
        let counting = (1...32).map { UInt8($0) }
        let text = "\(Self.specPrincipal)-dfxgiyy.102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20"
        #expect(AccountText.encode(owner: owner, subaccount: counting) == text)
        let decoded = try AccountText.decode(text)
        #expect(decoded.owner == owner && decoded.subaccount == counting)
    }

    @Test("an account with a 32-byte Ed25519 owner round-trips through text, with and without subaccounts")
    func roundTrip() throws {
        var rng = SeededRandom(seed: 7)
        for n in 0..<50 {
            let owner = testKey(UInt8(n)).publicKey
            let subaccount = n % 3 == 0 ? nil : Subaccount(bytes: rng.bytes(32))
            let account = Account(owner: owner, subaccount: subaccount)
            let text = account.description
            #expect(try Account(text: text) == account)
            #expect(text.contains(".") == (subaccount != nil))
        }
        let numbered = Account(owner: testKey(1).publicKey, subaccount: Subaccount(index: 255))
        #expect(numbered.description.hasSuffix(".ff"))
    }

    @Test("the all-zero subaccount is the default account")
    func zeroSubaccountIsDefault() {
        let owner = testKey(9).publicKey
        let explicit = Account(owner: owner, subaccount: Subaccount(bytes: [UInt8](repeating: 0, count: 32)))
        #expect(explicit == Account(owner: owner))
        #expect(explicit.subaccount == nil)
        #expect(explicit.description == Account(owner: owner).description)
    }

    @Test("a mistyped checksum is rejected and says so")
    func badChecksum() throws {
        let account = Account(owner: testKey(3).publicKey, subaccount: Subaccount(index: 42))
        let text = account.description
        let dot = text.lastIndex(of: ".")!
        let checksum = text[text.index(dot, offsetBy: -7)..<dot]
        let wrongChecksum = String(checksum.map { $0 == "a" ? "b" : "a" })
        let tampered = text.replacingOccurrences(of: "-\(checksum).", with: "-\(wrongChecksum).")
        #expect(throws: AccountTextError.badChecksum(expected: String(checksum), got: wrongChecksum)) { try Account(text: tampered) }
        // Changing the subaccount keeps the old checksum, which then no longer matches.
        #expect {
            try Account(text: String(text.dropLast()) + "b")
        } throws: { error in
            guard case AccountTextError.badChecksum = error else { return false }
            return "\(error)".contains("mistyped")
        }
        // A change inside the owner breaks the owner's own CRC.
        var chars = Array(text)
        chars[2] = chars[2] == "a" ? "b" : "a"
        #expect(throws: AccountTextError.badOwnerChecksum) { try Account(text: String(chars)) }
    }

    @Test("non-canonical and malformed texts are rejected")
    func nonCanonical() throws {
        let account = Account(owner: testKey(4).publicKey, subaccount: Subaccount(index: 1))
        let text = account.description
        #expect(throws: AccountTextError.self) { try Account(text: text.replacingOccurrences(of: ".1", with: ".01")) }
        #expect(throws: AccountTextError.self) { try Account(text: text.uppercased()) }
        #expect(throws: AccountTextError.empty) { try Account(text: "") }
        #expect(throws: AccountTextError.self) { try Account(text: "not an account") }
        #expect(throws: AccountTextError.self) { try Account(text: "\(text).2") }
        // A valid ICRC-1 principal that is not 32 bytes is not an EdgeMatrix account.
        #expect(throws: AccountTextError.notAnEd25519Key(byteCount: 29)) { try Account(text: Self.specPrincipal) }
    }

    @Test("binary form: the all-zero subaccount must be encoded as absent")
    func binaryCanonical() throws {
        let account = Account(owner: testKey(5).publicKey, subaccount: Subaccount(index: 3))
        #expect(try Account(canonicalBytes: account.canonicalBytes) == account)
        let nonCanonical = account.owner.rawRepresentation + [1] + [UInt8](repeating: 0, count: 32)
        #expect(throws: DecodingError.self) { try Account(canonicalBytes: nonCanonical) }
    }

    @Test("pool and minting accounts belong to a key nobody holds, and are distinct")
    func protocolAccounts() {
        let accounts = Pool.allCases.map(\.account) + [Account.minting]
        #expect(Set(accounts).count == accounts.count)
        #expect(accounts.allSatisfy { $0.owner == Account.protocolOwner })
        #expect(Pool.transactionMining.account.description.hasSuffix(".7472616e73616374696f6e2d6d696e696e67"))  // "transaction-mining"
    }
}
