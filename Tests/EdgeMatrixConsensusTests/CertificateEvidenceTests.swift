import EdgeMatrixConsensus
import EdgeMatrixCore
import Testing

@Suite("Proposer rotation, certificates, evidence, validator updates, encoding")
struct CertificateEvidenceTests {
    let f = Fixture(powers: [1, 1, 1, 1])
    let v = Array("value v".utf8)
    let w = Array("value w".utf8)

    @Test("proposers rotate in proportion to stake: powers 1/2/3/4 propose 100/200/300/400 of 1,000 heights")
    func proposerFrequencies() throws {
        let weighted = Fixture(powers: [1, 2, 3, 4])
        var set = weighted.validators
        var counts = [UInt64: Int]()
        for _ in 0..<1000 { counts[set.advanceProposerPriority(times: 1).votingPower, default: 0] += 1 }
        #expect(counts == [1: 100, 2: 200, 3: 300, 4: 400])
        // Rounds within one height rotate the same way.
        let byRound = (0..<100).map { weighted.validators.proposer(round: Round($0)).votingPower }
        #expect(byRound.filter { $0 == 4 }.count == 40 && byRound.filter { $0 == 1 }.count == 10)
    }

    @Test("the proposer schedule is deterministic and independent of the order validators are listed in")
    func proposerDeterminism() throws {
        let members = f.keys.enumerated().map { (publicKey: $0.element.publicKey, votingPower: UInt64($0.offset + 1)) }
        let a = try ValidatorSet(members)
        let b = try ValidatorSet(members.reversed())
        #expect(a == b)
        #expect((0..<50).map { a.proposer(round: $0).id } == (0..<50).map { b.proposer(round: $0).id })
        #expect(try ValidatorSet(canonicalBytes: a.canonicalBytes) == a)
    }

    @Test("invalid validator sets are refused with the reason")
    func invalidSets() {
        #expect(throws: ConsensusError.invalidValidatorSet("no validators")) { try ValidatorSet([]) }
        let k = f.keys[0].publicKey
        #expect(throws: ConsensusError.self) { try ValidatorSet([(publicKey: k, votingPower: 0)]) }
        #expect(throws: ConsensusError.self) { try ValidatorSet([(publicKey: k, votingPower: 1), (publicKey: k, votingPower: 2)]) }
    }

    @Test("a commit certificate verifies with >2/3 and is refused with less, with forged, duplicate or foreign signatures")
    func certificates() throws {
        try f.certificate(value: v, signers: [0, 1, 2]).verify(block: v, height: 1, chainID: Fixture.chainID, validators: f.validators)

        #expect(throws: ConsensusError.insufficientVotingPower(have: 2, total: 4)) {
            try f.certificate(value: v, signers: [0, 1]).verify(chainID: Fixture.chainID, validators: f.validators)
        }
        var forged = f.certificate(value: v, signers: [0, 1, 2])
        forged.signatures[2].signature = forged.signatures[1].signature  // validator 1's signature passed off as 2's
        #expect(throws: ConsensusError.badSignature("precommit of \(f.id(2).short) in the commit of height 1")) {
            try forged.verify(chainID: Fixture.chainID, validators: f.validators)
        }
        var duplicated = f.certificate(value: v, signers: [0, 1])
        duplicated.signatures.append(duplicated.signatures[0])
        #expect(throws: ConsensusError.certificateMismatch("validator \(f.id(0)) signs twice")) {
            try duplicated.verify(chainID: Fixture.chainID, validators: f.validators)
        }
        let strangers = Fixture(powers: [1, 1, 1, 1], keySalt: 50)
        #expect(throws: ConsensusError.notAValidator(strangers.id(0), height: 1)) {
            try strangers.certificate(value: v, signers: [0, 1, 2]).verify(chainID: Fixture.chainID, validators: f.validators)
        }
        // Signatures for another value do not carry over to this block.
        var swapped = f.certificate(value: v, signers: [0, 1, 2])
        swapped.value = Hash32.of(w)
        #expect(throws: ConsensusError.self) { try swapped.verify(chainID: Fixture.chainID, validators: f.validators) }
        #expect(throws: ConsensusError.certificateMismatch("block hash differs from the certified value")) {
            try f.certificate(value: v, signers: [0, 1, 2]).verify(block: w, height: 1, chainID: Fixture.chainID, validators: f.validators)
        }
        let cert = f.certificate(value: v, signers: [0, 1, 2])
        #expect(try CommitCertificate(canonicalBytes: cert.canonicalBytes) == cert)
    }

    @Test("block sync: a lagging validator commits a fetched block only with a valid certificate")
    func blockSync() {
        var engine = f.engine(3)
        _ = engine.handle(.start(height: 1))
        let weak = engine.handle(.syncedBlock(value: v, certificate: f.certificate(value: v, signers: [0, 1])))
        #expect(weak.commits.isEmpty && weak.rejections == [.insufficientVotingPower(have: 2, total: 4)])
        let wrongBlock = engine.handle(.syncedBlock(value: w, certificate: f.certificate(value: v, signers: [0, 1, 2])))
        #expect(wrongBlock.commits.isEmpty && wrongBlock.rejections.count == 1)
        let good = engine.handle(.syncedBlock(value: v, certificate: f.certificate(value: v, signers: [0, 1, 2])))
        #expect(good.commits.map(\.value) == [v])
        #expect(engine.height == 2)
        // A block for a height already decided is ignored.
        #expect(engine.handle(.syncedBlock(value: v, certificate: f.certificate(value: v, signers: [0, 1, 2]))).isEmpty)
    }

    @Test("two prevotes of one validator for different values in one round become self-verifying evidence")
    func equivocation() throws {
        var engine = f.engine(0)
        _ = engine.handle(.start(height: 1))
        let a = f.vote(2, .prevote, round: 0, Hash32.of(v))
        let b = f.vote(2, .prevote, round: 0, Hash32.of(w))
        #expect(engine.handle(.vote(a)).evidence.isEmpty)
        let evidence = try #require(engine.handle(.vote(b)).evidence.first)
        #expect(evidence.validator == f.id(2) && evidence.height == 1 && evidence.round == 0 && evidence.type == .prevote)
        try evidence.verify(chainID: Fixture.chainID, validators: f.validators)
        #expect(try DuplicateVoteEvidence(canonicalBytes: evidence.canonicalBytes) == evidence)
        #expect(try DuplicateVoteEvidence(b, a) == evidence)  // canonical order: one equivocation, one evidence
        // Reported once, and a third conflicting vote (nil) does not report again.
        #expect(engine.handle(.vote(f.vote(2, .prevote, round: 0, nil))).evidence.isEmpty)
        // A nil vote against a value vote is equivocation too.
        _ = engine.handle(.vote(f.vote(3, .precommit, round: 0, nil)))
        #expect(engine.handle(.vote(f.vote(3, .precommit, round: 0, Hash32.of(v)))).evidence.count == 1)
    }

    @Test("evidence that is not an equivocation, or whose signature is forged, does not verify")
    func badEvidence() throws {
        let a = f.vote(2, .prevote, round: 0, Hash32.of(v))
        #expect(throws: ConsensusError.invalidEvidence("votes are for the same value")) { try DuplicateVoteEvidence(a, a) }
        #expect(throws: ConsensusError.self) { try DuplicateVoteEvidence(a, f.vote(1, .prevote, round: 0, Hash32.of(w))) }
        #expect(throws: ConsensusError.self) { try DuplicateVoteEvidence(a, f.vote(2, .prevote, round: 1, Hash32.of(w))) }
        #expect(throws: ConsensusError.self) { try DuplicateVoteEvidence(a, f.vote(2, .precommit, round: 0, Hash32.of(w))) }
        let b = f.vote(2, .prevote, round: 0, Hash32.of(w))
        var signature = b.signature
        signature[0] ^= 0x80
        let forged = try DuplicateVoteEvidence(a, try SignedVote(bodyBytes: b.bodyBytes, signature: signature))
        #expect(throws: ConsensusError.self) { try forged.verify(chainID: Fixture.chainID, validators: f.validators) }
    }

    @Test("validator updates take effect at the height they name, with the newcomer at the back of the proposer queue")
    func validatorUpdates() throws {
        let newcomer = try SigningKey(seed: [UInt8](repeating: 77, count: 32))
        var engine = f.engine(0)
        #expect(engine.handle(.validatorUpdates(effectiveHeight: 3, updates: [
            ValidatorUpdate(publicKey: newcomer.publicKey, votingPower: 2),
            ValidatorUpdate(publicKey: f.keys[3].publicKey, votingPower: 0),
        ])).isEmpty)
        _ = engine.handle(.start(height: 1))
        let first = engine.handle(.syncedBlock(value: v, certificate: f.certificate(height: 1, value: v, signers: [1, 2, 3])))
        #expect(first.commits.first?.nextValidators.count == 4)
        let second = engine.handle(.syncedBlock(value: w, certificate: f.certificate(height: 2, value: w, signers: [1, 2, 3])))
        let next = try #require(second.commits.first?.nextValidators)
        #expect(next.count == 4 && next.totalVotingPower == 5)
        #expect(next.validator(for: newcomer.nodeID)?.votingPower == 2)
        #expect(next.validator(for: f.id(3)) == nil)
        #expect(next.validator(for: newcomer.nodeID)!.proposerPriority < 0)
        #expect(engine.validators == next && engine.height == 3)
        // Too late: height 3 is already running.
        #expect(engine.handle(.validatorUpdates(effectiveHeight: 3, updates: [])).rejections.count == 1)
    }

    @Test("messages round-trip through their canonical encoding, and random bytes never crash the decoders")
    func encoding() throws {
        let messages: [ConsensusMessage] = [
            .vote(f.vote(1, .precommit, round: 3, Hash32.of(v))), .vote(f.vote(2, .prevote, round: 0, nil)),
            .proposal(f.proposal(0, round: 2, value: v, validRound: 1)), .proposal(f.proposal(0, round: 0, value: w)),
        ]
        for message in messages {
            #expect(try ConsensusMessage(canonicalBytes: message.canonicalBytes) == message)
            let record = WALRecord.signed(message)
            #expect(try WALRecord(canonicalBytes: record.canonicalBytes) == record)
        }
        var rng = Xoshiro256(seed: 42)
        let sample = messages[0].canonicalBytes
        for i in 0..<3000 {
            var bytes: [UInt8]
            if i % 2 == 0 {
                bytes = (0..<rng.int(0...200)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            } else {  // mutate a real message: flips, truncation
                bytes = sample
                for _ in 0..<rng.int(1...4) { bytes[rng.int(0...bytes.count - 1)] ^= UInt8(truncatingIfNeeded: rng.next() | 1) }
                if rng.chance(300) { bytes = Array(bytes.prefix(rng.int(0...bytes.count))) }
            }
            _ = try? ConsensusMessage(canonicalBytes: bytes)
            _ = try? WALRecord(canonicalBytes: bytes)
            _ = try? CommitCertificate(canonicalBytes: bytes)
            _ = try? DuplicateVoteEvidence(canonicalBytes: bytes)
            _ = try? ValidatorSet(canonicalBytes: bytes)
        }
    }
}
