import EdgeMatrixCore
@testable import EdgeMatrixLedger
import Testing

@Suite("Node registry")
struct RegistryTests {
    /// Alice bonds a compute stake; returns its id.
    func computeStake(_ f: inout Fixture, _ owner: SigningKey? = nil) throws -> UInt64 {
        let result = try f.submit(f.tx(owner ?? f.alice, .bond(Bond(role: .compute, amount: Amount(emc: 500), lockDays: 30)))).get()
        guard case .bonded(let id) = result.effect else { throw LedgerError.unknownStake(id: 0) }
        return id
    }

    func statement(_ f: Fixture, owner: SigningKey, node: SigningKey, stakeID: UInt64, role: NodeRole = .compute,
                   endpoints: [String] = ["https://gpu1.example:8443"]) -> NodeRegistrationStatement {
        NodeRegistrationStatement(chainID: Fixture.chainID, owner: owner.publicKey, nodeKey: node.publicKey, role: role,
                                  endpoints: endpoints, stakeID: stakeID)
    }

    @Test("registration needs both the owner's and the node key's signatures")
    func bothSignatures() throws {
        var f = Fixture()
        let stakeID = try computeStake(&f)
        let node = testKey(80)
        let registration = NodeRegistration(statement: statement(f, owner: f.alice, node: node, stakeID: stakeID), nodeKey: node)
        let outcome = try f.submit(f.tx(f.alice, .registerNode(registration))).get()
        #expect(outcome.effect == .nodeRegistered(nodeKey: node.publicKey))
        let record = f.ledger.node(node.publicKey)!
        #expect(record.owner == f.alice.publicKey && record.role == .compute && record.stakeID == stakeID && record.status == .active)
        #expect(record.endpoints == ["https://gpu1.example:8443"])
        #expect(record.nodeID == node.nodeID)
    }

    @Test("a node signature from a different key is refused and changes nothing")
    func wrongNodeKey() throws {
        var f = Fixture()
        let stakeID = try computeStake(&f)
        let victim = testKey(81), impostor = testKey(82)
        // The statement names the victim's node key but the impostor signs it.
        let s = statement(f, owner: f.alice, node: victim, stakeID: stakeID)
        let forged = try NodeRegistration(statementBytes: s.canonicalBytes, nodeSignature: impostor.sign(s.canonicalBytes, domain: .nodeRegistration))
        let root = f.ledger.stateRoot()
        let balance = f.ledger.balance(of: Account(owner: f.alice.publicKey))
        let result = f.ledger.apply(f.tx(f.alice, .registerNode(forged)), context: BlockContext(height: f.height + 1, timeMillis: f.now))
        #expect(result.failure == .badNodeSignature)
        #expect(f.ledger.node(victim.publicKey) == nil)
        #expect(f.ledger.stateRoot() == root)
        #expect(f.ledger.balance(of: Account(owner: f.alice.publicKey)) == balance)
        // A node signature in another domain (e.g. a transaction signature) does not count either.
        let wrongDomain = try NodeRegistration(statementBytes: s.canonicalBytes, nodeSignature: victim.sign(s.canonicalBytes, domain: .transaction))
        #expect(f.submit(f.tx(f.alice, .registerNode(wrongDomain))).failure == .badNodeSignature)
    }

    @Test("a node's signed statement cannot be used by another owner or on another chain")
    func statementBindsOwnerAndChain() throws {
        var f = Fixture()
        let stakeID = try computeStake(&f)
        let node = testKey(83)
        // Alice's node signs a statement for Alice; Bob tries to submit it as his own.
        let registration = NodeRegistration(statement: statement(f, owner: f.alice, node: node, stakeID: stakeID), nodeKey: node)
        #expect(f.submit(f.tx(f.bob, .registerNode(registration))).failure == .registrationOwnerMismatch)
        var otherChain = statement(f, owner: f.alice, node: node, stakeID: stakeID)
        otherChain.chainID = "emc-main"
        #expect(f.submit(f.tx(f.alice, .registerNode(NodeRegistration(statement: otherChain, nodeKey: node)))).failure == .registrationOwnerMismatch)
        #expect(f.ledger.node(node.publicKey) == nil)
    }

    @Test("registration checks the stake: exists, owned, bonded, matching role, not already backing a node")
    func stakeReference() throws {
        var f = Fixture()
        let stakeID = try computeStake(&f)
        let bobStake = try computeStake(&f, f.bob)
        let n1 = testKey(84), n2 = testKey(85)
        func register(_ node: SigningKey, _ stakeID: UInt64, role: NodeRole = .compute) -> TxResult {
            f.submit(f.tx(f.alice, .registerNode(NodeRegistration(statement: statement(f, owner: f.alice, node: node, stakeID: stakeID, role: role), nodeKey: node))))
        }
        #expect(register(n1, 999).failure == .unknownStake(id: 999))
        #expect(register(n1, bobStake).failure == .notStakeOwner(id: bobStake))
        #expect(register(n1, stakeID, role: .router).failure == .stakeRoleMismatch(id: stakeID, stakeRole: .compute, nodeRole: .router))
        #expect(register(n1, stakeID).value != nil)
        #expect(register(n1, stakeID).failure == .nodeAlreadyRegistered(nodeKey: n1.publicKey))
        #expect(register(n2, stakeID).failure == .stakeInUse(id: stakeID, nodeKey: n1.publicKey))
        let bad = NodeRegistration(statement: statement(f, owner: f.alice, node: n2, stakeID: stakeID, endpoints: ["has space"]), nodeKey: n2)
        #expect(f.submit(f.tx(f.alice, .registerNode(bad))).failure?.kind == "InvalidEndpoints")
    }

    @Test("update and retire: owner only; a retired node cannot come back")
    func updateAndRetire() throws {
        var f = Fixture()
        let stakeID = try computeStake(&f)
        let second = try computeStake(&f)
        let node = testKey(86)
        _ = try f.submit(f.tx(f.alice, .registerNode(NodeRegistration(statement: statement(f, owner: f.alice, node: node, stakeID: stakeID), nodeKey: node)))).get()

        #expect(f.submit(f.tx(f.bob, .updateNode(NodeUpdate(nodeKey: node.publicKey, endpoints: ["https://evil.example"])))).failure
                == .notNodeOwner(nodeKey: node.publicKey))
        #expect(f.submit(f.tx(f.alice, .updateNode(NodeUpdate(nodeKey: node.publicKey, endpoints: ["https://gpu2.example:8443"], stakeID: second)))).value != nil)
        #expect(f.ledger.node(node.publicKey)?.endpoints == ["https://gpu2.example:8443"])
        #expect(f.ledger.node(node.publicKey)?.stakeID == second)
        // The first stake is free again.
        #expect(f.submit(f.tx(f.alice, .unbond(stakeID: stakeID))).value != nil)
        #expect(f.submit(f.tx(f.alice, .unbond(stakeID: second))).failure == .stakeInUse(id: second, nodeKey: node.publicKey))

        #expect(f.submit(f.tx(f.bob, .retireNode(nodeKey: node.publicKey))).failure == .notNodeOwner(nodeKey: node.publicKey))
        #expect(f.submit(f.tx(f.alice, .retireNode(nodeKey: node.publicKey))).value != nil)
        #expect(f.ledger.node(node.publicKey)?.status == .retired)
        #expect(f.submit(f.tx(f.alice, .retireNode(nodeKey: node.publicKey))).failure == .nodeRetired(nodeKey: node.publicKey))
        #expect(f.submit(f.tx(f.alice, .unbond(stakeID: second))).value != nil)
        let third = try computeStake(&f)
        let again = NodeRegistration(statement: statement(f, owner: f.alice, node: node, stakeID: third), nodeKey: node)
        #expect(f.submit(f.tx(f.alice, .registerNode(again))).failure == .nodeAlreadyRegistered(nodeKey: node.publicKey))
        #expect(f.submit(f.tx(f.alice, .updateNode(NodeUpdate(nodeKey: testKey(87).publicKey)))).failure == .unknownNode(nodeKey: testKey(87).publicKey))
    }
}
