import EdgeMatrixConsensus
import EdgeMatrixCore
import Foundation
import Testing

@Suite("Write-ahead log and double-sign protection")
struct WALTests {
    let f = Fixture(powers: [1, 1, 1, 1])
    let v = Array("value v".utf8)
    let w = Array("value w".utf8)

    @Test("after a crash and WAL replay a validator re-sends its earlier prevote and never signs a different one")
    func noDoubleSignAfterRestart() throws {
        let proposer = f.proposer(round: 0)
        let me = f.other(than: proposer)
        let wal = InMemoryWAL()
        var engine = f.engine(me)
        _ = try engine.handle(.start(height: 1), wal: wal)
        let before = try engine.handle(.proposal(f.proposal(proposer, round: 0, value: v)), wal: wal)
            + engine.handle(.validated(height: 1, value: Hash32.of(v), isValid: true), wal: wal)
        #expect(before.votes(.prevote).map(\.value) == [Hash32.of(v)])

        // Crash. The restarted engine has lost the proposal, so its propose timeout would prevote nil.
        var restarted = f.engine(me, wal: wal.replay())
        let resumed = try restarted.handle(.start(height: 1), wal: wal)
        #expect(resumed.votes(.prevote).map(\.value) == [Hash32.of(v)])  // re-sent as it was
        let afterTimeout = try restarted.handle(.timeout(ScheduledTimeout(height: 1, round: 0, step: .propose, durationMs: 0)), wal: wal)
        #expect(afterTimeout.votes(.prevote).allSatisfy { $0.value == Hash32.of(v) })
        // Even a conflicting proposal (an equivocating proposer) cannot make it sign another prevote.
        let conflicting = try restarted.handle(.proposal(f.proposal(proposer, round: 0, value: w)), wal: wal)
        #expect(conflicting.votes(.prevote).allSatisfy { $0.value == Hash32.of(v) })
        let signedPrevotes = wal.replay().compactMap { record -> SignedVote? in
            if case .signed(.vote(let vote)) = record, vote.type == .prevote { vote } else { nil }
        }
        #expect(signedPrevotes.count == 1)
    }

    @Test("a lock survives a crash: the restarted validator still refuses a different value in the next round")
    func lockSurvivesRestart() throws {
        let me = f.other(than: f.proposer(round: 0), f.proposer(round: 1))
        let others = f.keys.indices.filter { $0 != me }
        let wal = InMemoryWAL()
        var engine = f.engine(me)
        _ = try engine.handle(.start(height: 1), wal: wal)
        _ = try engine.handle(.proposal(f.proposal(f.proposer(round: 0), round: 0, value: v)), wal: wal)
        _ = try engine.handle(.validated(height: 1, value: Hash32.of(v), isValid: true), wal: wal)
        for voter in others.prefix(2) { _ = try engine.handle(.vote(f.vote(voter, .prevote, round: 0, Hash32.of(v))), wal: wal) }
        #expect(engine.lockedRoundValue?.value == Hash32.of(v))

        var restarted = f.engine(me, wal: wal.replay())
        let resumed = restarted.handle(.start(height: 1))
        #expect(restarted.lockedRoundValue?.round == 0 && restarted.lockedRoundValue?.value == Hash32.of(v))
        #expect(resumed.votes(.precommit).map(\.value) == [Hash32.of(v)])
        _ = restarted.fire(.precommit, round: 0)
        let next = restarted.receive(f.proposal(f.proposer(round: 1), round: 1, value: w))
        #expect(next.votes(.prevote).map(\.value) == [nil])
    }

    @Test("a crash between persisting a step change and persisting the vote does not leave the validator mute")
    func crashBetweenStateAndVote() throws {
        let me = f.other(than: f.proposer(round: 0))
        let wal = InMemoryWAL()
        var engine = f.engine(me)
        _ = try engine.handle(.start(height: 1), wal: wal)
        let actions = engine.fire(.propose, round: 0)  // step -> prevote, then the nil prevote
        let records = actions.persisted
        #expect(records.count == 2)
        wal.append(Array(records.prefix(1)))  // the state record reached the disk, the vote did not
        var restarted = f.engine(me, wal: wal.replay())
        _ = restarted.handle(.start(height: 1))
        #expect(restarted.step == .propose)
        #expect(restarted.fire(.propose, round: 0).votes(.prevote).map(\.value) == [nil])
    }

    @Test("a proposer that crashes after proposing proposes the same value again, not a new one")
    func proposerRestart() throws {
        let me = f.proposer(round: 0)
        let wal = InMemoryWAL()
        var engine = f.engine(me)
        _ = try engine.handle(.start(height: 1), wal: wal)
        _ = try engine.handle(.valueToPropose(height: 1, round: 0, value: v), wal: wal)
        var restarted = f.engine(me, wal: wal.replay())
        let resumed = restarted.handle(.start(height: 1))
        #expect(resumed.valueRequests.isEmpty)
        #expect(resumed.proposals.map(\.valueID) == [Hash32.of(v)])
        #expect(restarted.handle(.valueToPropose(height: 1, round: 0, value: w)).proposals.isEmpty)
    }

    @Test("records of heights other than the one started are ignored, and pruning drops old heights")
    func heights() throws {
        let wal = InMemoryWAL()
        var engine = f.engine(f.proposer(round: 0))
        _ = try engine.handle(.start(height: 1), wal: wal)
        _ = try engine.handle(.valueToPropose(height: 1, round: 0, value: v), wal: wal)
        var atTwo = f.engine(f.proposer(round: 0), wal: wal.replay())
        #expect(atTwo.handle(.start(height: 2)).proposals.isEmpty)
        wal.prune(below: 2)
        #expect(wal.replay().isEmpty)
    }

    @Test("the file WAL replays what was appended, across reopening")
    func fileRoundTrip() throws {
        try withTemporaryDirectory { dir in
            let path = dir + "/consensus.wal"
            let records = sampleRecords()
            do {
                let wal = try FileWAL(path: path)
                try wal.append(Array(records.prefix(2)))
                try wal.append(Array(records.dropFirst(2)))
            }
            #expect(try FileWAL(path: path).replay() == records)
            let wal = try FileWAL(path: path)
            try wal.prune(below: 2)
            #expect(try wal.replay() == records.filter { $0.height >= 2 })
            try wal.append([records[0]])
            #expect(try FileWAL(path: path).replay() == records.filter { $0.height >= 2 } + [records[0]])
        }
    }

    @Test("a torn last record (crash mid-write) is cut off on open; earlier records survive and appends continue")
    func tornTail() throws {
        try withTemporaryDirectory { dir in
            let path = dir + "/consensus.wal"
            let records = sampleRecords()
            try FileWAL(path: path).append(records)
            let intact = try Data(contentsOf: URL(fileURLWithPath: path))
            for cut in [1, 5, 9, 11, 30] {  // inside the header, inside the payload
                let extra = WALRecord.signed(.vote(f.vote(1, .prevote, height: 9, round: 9, nil)))
                var torn = intact
                var frame = [UInt8]()
                try FileWAL(path: dir + "/scratch.wal").append([extra])
                frame = Array(try Data(contentsOf: URL(fileURLWithPath: dir + "/scratch.wal")).dropFirst(FileWAL.magic.count))
                try FileManager.default.removeItem(atPath: dir + "/scratch.wal")
                torn.append(contentsOf: frame.prefix(cut))
                try torn.write(to: URL(fileURLWithPath: path))
                let wal = try FileWAL(path: path)
                #expect(try wal.replay() == records)
                #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == intact)  // the tail was cut
                try wal.append([extra])
                #expect(try FileWAL(path: path).replay() == records + [extra])
                try intact.write(to: URL(fileURLWithPath: path))
            }
            // A whole last frame with a bad checksum is a torn write as well.
            var flipped = intact
            flipped[flipped.count - 1] ^= 0xFF
            try flipped.write(to: URL(fileURLWithPath: path))
            #expect(try FileWAL(path: path).replay() == Array(records.dropLast()))
        }
    }

    @Test("a corrupt record in the middle is reported, not skipped (skipping could forget a signed vote)")
    func corruptionInTheMiddle() throws {
        try withTemporaryDirectory { dir in
            let path = dir + "/consensus.wal"
            try FileWAL(path: path).append(sampleRecords())
            var bytes = try Data(contentsOf: URL(fileURLWithPath: path))
            let firstFrame = FileWAL.magic.count
            bytes[firstFrame + FileWAL.headerLength + 2] ^= 0xFF  // inside the first payload
            try bytes.write(to: URL(fileURLWithPath: path))
            #expect {
                _ = try FileWAL(path: path)
            } throws: { error in
                guard case .walCorrupted(offset: UInt64(firstFrame), _) = error as? ConsensusError else { return false }
                return true
            }
            #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == bytes)  // nothing was cut
        }
    }

    @Test("a corrupt length that runs past the end of the file is corruption, not a torn tail: the node refuses and nothing is cut",
          arguments: [0, 1, 3])
    func corruptLengthIsNotATornTail(byte: Int) throws {
        try withTemporaryDirectory { dir in
            let path = dir + "/consensus.wal"
            try FileWAL(path: path).append(sampleRecords())
            var bytes = try Data(contentsOf: URL(fileURLWithPath: path))
            bytes[FileWAL.magic.count + byte] ^= 0x40  // the first frame's length: now far beyond the file
            try bytes.write(to: URL(fileURLWithPath: path))
            #expect(throws: ConsensusError.self) { _ = try FileWAL(path: path) }
            #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == bytes)
        }
    }

    @Test("a WAL without the version header (an older build's, or overwritten) is refused with a clear message")
    func foreignFileIsRefused() throws {
        try withTemporaryDirectory { dir in
            let path = dir + "/consensus.wal"
            let foreign = Data([0, 0, 0, 4, 1, 2, 3, 4, 9, 9, 9, 9])
            try foreign.write(to: URL(fileURLWithPath: path))
            #expect {
                _ = try FileWAL(path: path)
            } throws: { error in
                "\(error)".contains("not a version-2 consensus WAL")
            }
            #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == foreign)
        }
    }

    @Test("zeros left after the last frame by a crash are a torn tail, not corruption")
    func zeroFilledTail() throws {
        try withTemporaryDirectory { dir in
            let path = dir + "/consensus.wal"
            let records = sampleRecords()
            try FileWAL(path: path).append(records)
            let intact = try Data(contentsOf: URL(fileURLWithPath: path))
            try (intact + Data(count: 4096)).write(to: URL(fileURLWithPath: path))
            #expect(try FileWAL(path: path).replay() == records)
            #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == intact)
        }
    }

    private func sampleRecords() -> [WALRecord] {
        [
            .state(ConsensusSnapshot(height: 1, round: 0, step: .propose, lockedRound: nil, lockedValue: nil,
                                     validRound: nil, validValue: nil)),
            .signed(.proposal(f.proposal(0, round: 0, value: v))),
            .value(height: 2, bytes: w),
            .state(ConsensusSnapshot(height: 2, round: 1, step: .precommit, lockedRound: 1, lockedValue: Hash32.of(w),
                                     validRound: 1, validValue: Hash32.of(w))),
            .signed(.vote(f.vote(2, .precommit, height: 2, round: 1, Hash32.of(w)))),
        ]
    }
}

func withTemporaryDirectory(_ body: (String) throws -> Void) throws {
    let dir = NSTemporaryDirectory() + "emc-wal-\(UUID().uuidString)"
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: dir) }
    try body(dir)
}
