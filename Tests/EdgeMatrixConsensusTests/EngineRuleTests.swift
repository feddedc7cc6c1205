import EdgeMatrixConsensus
import EdgeMatrixCore
import Testing

/// The upon-rules of Tendermint, one at a time, on a single engine fed hand-made messages.
@Suite("Tendermint rules")
struct EngineRuleTests {
    let f = Fixture(powers: [1, 1, 1, 1])
    let v = Array("value v".utf8)
    let w = Array("value w".utf8)
    var vid: Hash32 { Hash32.of(v) }
    var wid: Hash32 { Hash32.of(w) }

    @Test("a proposal, then >2/3 prevotes, then >2/3 precommits decide the value with a verifiable certificate")
    func decides() throws {
        let proposer = f.proposer(round: 0)
        let me = f.other(than: proposer)
        let others = f.keys.indices.filter { $0 != me }
        var engine = f.engine(me)
        #expect(engine.handle(.start(height: 1)).timeouts.map(\.step) == [.propose])

        #expect(engine.receive(f.proposal(proposer, round: 0, value: v)).votes(.prevote).map(\.value) == [vid])
        let afterPrevotes = engine.receive(others.prefix(2).map { f.vote($0, .prevote, round: 0, vid) })
        #expect(afterPrevotes.votes(.precommit).map(\.value) == [vid])
        #expect(engine.lockedRoundValue?.round == 0 && engine.lockedRoundValue?.value == vid)

        let afterPrecommits = engine.receive(others.prefix(2).map { f.vote($0, .precommit, round: 0, vid) })
        let commit = try #require(afterPrecommits.commits.first)
        #expect(commit.height == 1 && commit.value == v)
        #expect(commit.certificate.signatures.count == 3)
        try commit.certificate.verify(block: v, height: 1, chainID: Fixture.chainID, validators: f.validators)
        #expect(engine.height == 2 && engine.round == 0 && engine.lockedRoundValue == nil)
    }

    @Test("the proposer asks the application for a value and proposes it; the value needs no validation")
    func proposerProposes() {
        let me = f.proposer(round: 0)
        var engine = f.engine(me)
        #expect(engine.handle(.start(height: 1)).valueRequests == [0])
        let actions = engine.handle(.valueToPropose(height: 1, round: 0, value: v))
        #expect(actions.proposals.map(\.valueID) == [vid])
        #expect(actions.votes(.prevote).map(\.value) == [vid])
        #expect(actions.validationRequests.isEmpty)
    }

    @Test("every signed message is persisted before it is broadcast")
    func persistsBeforeBroadcast() {
        let proposer = f.proposer(round: 0)
        var engine = f.engine(f.other(than: proposer))
        _ = engine.handle(.start(height: 1))
        let actions = engine.receive(f.proposal(proposer, round: 0, value: v))
        let sent = actions.firstIndex { if case .broadcast = $0 { true } else { false } }
        let saved = actions.firstIndex { if case .persist(.signed) = $0 { true } else { false } }
        #expect(sent != nil && saved != nil && saved! < sent!)
    }

    @Test("a proposal the application rejects gets a nil prevote")
    func invalidValue() {
        let proposer = f.proposer(round: 0)
        var engine = f.engine(f.other(than: proposer))
        _ = engine.handle(.start(height: 1))
        let actions = engine.receive(f.proposal(proposer, round: 0, value: v), valid: false)
        #expect(actions.votes(.prevote).map(\.value) == [nil])
    }

    @Test("without a proposal the propose timeout prevotes nil; >2/3 nil prevotes precommit nil")
    func timeoutAndNil() {
        let me = f.other(than: f.proposer(round: 0))
        let others = f.keys.indices.filter { $0 != me }
        var engine = f.engine(me)
        _ = engine.handle(.start(height: 1))
        #expect(engine.fire(.propose, round: 0).votes(.prevote).map(\.value) == [nil])
        let actions = engine.receive(others.prefix(2).map { f.vote($0, .prevote, round: 0, nil) })
        #expect(actions.timeouts.map(\.step) == [.prevote])  // line 34: 2f+1 prevotes of any kind
        #expect(actions.votes(.precommit).map(\.value) == [nil])
    }

    @Test("a validator locked on v prevotes nil for a different fresh proposal in a later round")
    func lockHolds() {
        let me = f.other(than: f.proposer(round: 0), f.proposer(round: 1))
        let others = f.keys.indices.filter { $0 != me }
        var engine = f.engine(me)
        _ = engine.handle(.start(height: 1))
        lock(&engine, me: me, on: v, round: 0)
        _ = engine.receive(others.map { f.vote($0, .precommit, round: 0, nil) })
        #expect(engine.fire(.precommit, round: 0).timeouts.map(\.step) == [.propose])
        #expect(engine.round == 1)
        let actions = engine.receive(f.proposal(f.proposer(round: 1), round: 1, value: w))
        #expect(actions.votes(.prevote).map(\.value) == [nil])
        // ... but prevotes for its locked value when that is proposed again.
        var again = f.engine(me)
        _ = again.handle(.start(height: 1))
        lock(&again, me: me, on: v, round: 0)
        _ = again.fire(.precommit, round: 0)
        #expect(again.receive(f.proposal(f.proposer(round: 1), round: 1, value: v)).votes(.prevote).map(\.value) == [vid])
    }

    @Test("a proof-of-lock from a round after the lock unlocks (line 28); one from before it does not")
    func unlockViaPOL() {
        let me = f.other(than: f.proposer(round: 0), f.proposer(round: 1), f.proposer(round: 2))
        let others = f.keys.indices.filter { $0 != me }

        // Locked on v at round 0; w got >2/3 prevotes at round 1 (we missed them live); re-proposed at round 2.
        var engine = f.engine(me)
        _ = engine.handle(.start(height: 1))
        lock(&engine, me: me, on: v, round: 0)
        skipRound(&engine, 0, from: .precommit)
        skipRound(&engine, 1, from: .propose)
        #expect(engine.round == 2)
        _ = engine.receive(others.map { f.vote($0, .prevote, round: 1, wid) })
        let actions = engine.receive(f.proposal(f.proposer(round: 2), round: 2, value: w, validRound: 1))
        #expect(actions.votes(.prevote).map(\.value) == [wid])

        // Locked on v at round 1; a re-proposal of w with a proof-of-lock from round 0 is older than the lock.
        var later = f.engine(me)
        _ = later.handle(.start(height: 1))
        _ = later.receive(others.map { f.vote($0, .prevote, round: 0, wid) })
        skipRound(&later, 0, from: .propose)
        lock(&later, me: me, on: v, round: 1)
        #expect(later.lockedRoundValue?.round == 1)
        skipRound(&later, 1, from: .precommit)
        let refused = later.receive(f.proposal(f.proposer(round: 2), round: 2, value: w, validRound: 0))
        #expect(refused.votes(.prevote).map(\.value) == [nil])
    }

    @Test("a proof-of-lock seen after precommitting nil makes v the valid value, which the next proposer re-proposes")
    func validValue() throws {
        let me = f.other(than: f.proposer(round: 0))
        let myRound = try #require((1...8).map { Round($0) }.first { f.proposer(round: $0) == me })
        let others = f.keys.indices.filter { $0 != me }
        var engine = f.engine(me)
        _ = engine.handle(.start(height: 1))
        _ = engine.fire(.propose, round: 0)   // prevote nil
        _ = engine.fire(.prevote, round: 0)   // precommit nil
        #expect(engine.step == .precommit)
        _ = engine.receive(f.proposal(f.proposer(round: 0), round: 0, value: v))
        _ = engine.receive(others.map { f.vote($0, .prevote, round: 0, vid) })
        #expect(engine.validRoundValue?.round == 0 && engine.validRoundValue?.value == vid)
        #expect(engine.lockedRoundValue == nil)  // it precommitted nil, so it did not lock

        var actions = [ConsensusAction]()
        for r in 0..<myRound {
            if engine.step < .precommit { _ = engine.fire(.propose, round: r); _ = engine.fire(.prevote, round: r) }
            actions = engine.fire(.precommit, round: r)
        }
        #expect(actions.valueRequests.isEmpty)
        let proposal = try #require(actions.proposals.first)
        #expect(proposal.valueID == vid && proposal.body.validRound == 0 && proposal.round == myRound)
    }

    @Test("f+1 voting power in a later round makes a validator skip to it; f or less does not")
    func roundSkip() {
        let me = f.other(than: f.proposer(round: 0))
        let others = f.keys.indices.filter { $0 != me }
        var engine = f.engine(me)
        _ = engine.handle(.start(height: 1))
        _ = engine.handle(.vote(f.vote(others[0], .prevote, round: 5, nil)))
        #expect(engine.round == 0)
        let actions = engine.handle(.vote(f.vote(others[1], .precommit, round: 5, nil)))
        #expect(engine.round == 5)
        let timeout = actions.timeouts.first { $0.step == .propose }
        #expect(timeout?.round == 5 && timeout?.durationMs == 1000 + 5 * 100)  // timeouts grow per round
    }

    @Test("round skip counts stake, not heads: one validator with more than 1/3 of the power is enough")
    func roundSkipWeighted() {
        let weighted = Fixture(powers: [1, 1, 1, 4])
        let big = weighted.keys.indices.first { weighted.validators.validators[$0].votingPower == 4 }!
        let me = weighted.other(than: big)
        var engine = weighted.engine(me)
        _ = engine.handle(.start(height: 1))
        _ = engine.handle(.vote(weighted.vote(big, .prevote, round: 3, nil)))
        #expect(engine.round == 3)
    }

    @Test("quorum is by stake: the 4-power validator plus one other (5/7) commit; the three small ones (3/7) cannot")
    func weightedQuorum() throws {
        let weighted = Fixture(powers: [1, 1, 1, 4])
        let big = weighted.keys.indices.first { weighted.validators.validators[$0].votingPower == 4 }!
        let small = weighted.keys.indices.filter { $0 != big }
        #expect(throws: ConsensusError.insufficientVotingPower(have: 3, total: 7)) {
            try weighted.certificate(value: v, signers: small).verify(chainID: Fixture.chainID, validators: weighted.validators)
        }
        try weighted.certificate(value: v, signers: [big, small[0]]).verify(chainID: Fixture.chainID, validators: weighted.validators)
    }

    @Test("bad signatures, non-validators, wrong proposers, wrong chains and tampered values are rejected and not counted")
    func rejections() {
        let proposer = f.proposer(round: 0)
        let me = f.other(than: proposer)
        let others = f.keys.indices.filter { $0 != me && $0 != proposer }
        var engine = f.engine(me)
        _ = engine.handle(.start(height: 1))

        let good = f.vote(others[0], .prevote, round: 0, nil)
        var forgedSignature = good.signature
        forgedSignature[7] ^= 1
        let forged = try! SignedVote(bodyBytes: good.bodyBytes, signature: forgedSignature)
        #expect(engine.handle(.vote(forged)).rejections.count == 1)

        let outsider = try! SigningKey(seed: [UInt8](repeating: 99, count: 32))
        let outsiderVote = SignedVote(signing: VoteBody(chainID: Fixture.chainID, type: .prevote, height: 1, round: 0,
                                                        value: nil, validator: outsider.nodeID), with: outsider)
        #expect(engine.handle(.vote(outsiderVote)).rejections == [.notAValidator(outsider.nodeID, height: 1)])

        let otherChain = SignedVote(signing: VoteBody(chainID: "elsewhere", type: .prevote, height: 1, round: 0, value: nil,
                                                      validator: f.id(others[1])), with: f.keys[others[1]])
        #expect(engine.handle(.vote(otherChain)).rejections == [.wrongChain(expected: Fixture.chainID, got: "elsewhere")])

        let notProposer = f.proposal(others[0], round: 0, value: v)
        #expect(engine.handle(.proposal(notProposer)).rejections == [.notProposer(f.id(others[0]), height: 1, round: 0)])

        let real = f.proposal(proposer, round: 0, value: v)
        let tampered = try! SignedProposal(bodyBytes: real.bodyBytes, signature: real.signature, value: w)
        #expect(engine.handle(.proposal(tampered)).rejections == [.valueHashMismatch(height: 1, round: 0)])

        // None of that counted: with our own nil prevote and one real one there is no quorum of nil prevotes yet.
        _ = engine.fire(.propose, round: 0)
        #expect(engine.handle(.vote(good)).votes(.precommit).isEmpty)
        #expect(engine.step == .prevote)
    }

    @Test("an equivocator counts toward every proposed value it voted for; junk values cannot crowd out the real one")
    func equivocatorCounts() {
        let proposer = f.proposer(round: 0)
        let me = f.other(than: proposer)
        let (b, c) = (f.other(than: me, proposer), proposer)
        var engine = f.engine(me)
        _ = engine.handle(.start(height: 1))
        _ = engine.receive(f.proposal(proposer, round: 0, value: v))  // we prevote v
        for junk in 0..<5 { _ = engine.handle(.vote(f.vote(b, .prevote, round: 0, Hash32.of([UInt8(junk)])))) }
        _ = engine.handle(.vote(f.vote(c, .prevote, round: 0, vid)))
        #expect(engine.lockedRoundValue == nil)  // 2 of 4 for v so far
        let actions = engine.handle(.vote(f.vote(b, .prevote, round: 0, vid)))
        #expect(actions.evidence.isEmpty)  // already reported for b's first conflicting vote
        #expect(actions.votes(.precommit).map(\.value) == [vid])
        // Held for gossip: the proposal, b's first (junk) prevote, 3 prevotes for v, our precommit. Later junk is not.
        #expect(engine.gossipMessages.count == 6)
    }

    @Test("timeouts grow linearly per round")
    func timeoutGrowth() {
        let t = TimeoutConfiguration(proposeMs: 3000, proposeDeltaMs: 500, prevoteMs: 1000, prevoteDeltaMs: 200,
                                     precommitMs: 1000, precommitDeltaMs: 300, commitMs: 1000)
        #expect((0..<4).map { t.duration(.propose, round: $0) } == [3000, 3500, 4000, 4500])
        #expect(t.duration(.prevote, round: 10) == 3000)
        #expect(t.duration(.precommit, round: 2) == 1600)
        #expect(t.duration(.commit, round: 7) == 1000)
    }

    @Test("with a commit timeout the next height starts only when it fires")
    func commitPause() throws {
        let paced = Fixture(powers: [1, 1, 1, 1], commitMs: 800)
        var engine = paced.engine(0)
        _ = engine.handle(.start(height: 1))
        let actions = engine.handle(.syncedBlock(value: v, certificate: paced.certificate(value: v, signers: [1, 2, 3])))
        #expect(actions.commits.count == 1)
        #expect(actions.timeouts == [ScheduledTimeout(height: 2, round: 0, step: .commit, durationMs: 800)])
        #expect(engine.step == .newHeight)
        _ = engine.handle(.timeout(actions.timeouts[0]))
        #expect(engine.step == .propose && engine.height == 2)
    }

    // MARK: Helpers

    /// Receives the round's proposal of `value` and >2/3 prevotes for it, so `engine` locks on it.
    private func lock(_ engine: inout ConsensusEngine, me: Int, on value: [UInt8], round: Round) {
        let id = Hash32.of(value)
        let proposer = f.proposer(round: round)
        let proposal = f.proposal(proposer, round: round, value: value)
        if proposer != me { _ = engine.receive(proposal) }
        let voters = f.keys.indices.filter { $0 != me }.prefix(2)
        _ = engine.receive(voters.map { f.vote($0, .prevote, round: round, id) })
        precondition(engine.lockedRoundValue?.value == id, "setup: expected a lock")
    }

    private func skipRound(_ engine: inout ConsensusEngine, _ round: Round, from step: ConsensusStep) {
        if step <= .propose { _ = engine.fire(.propose, round: round) }
        if step <= .prevote { _ = engine.fire(.prevote, round: round) }
        _ = engine.fire(.precommit, round: round)
    }
}
