import EdgeMatrixConsensus
import EdgeMatrixCore
import Foundation
import Testing

/// Safety and liveness of the whole protocol under faults, over many seeds.
/// EMC_SIM_SEEDS=N runs N seeds (default 1,000); EMC_SIM_SEED=S replays one seed with a trace (EMC_SIM_TRACE=1).
// Serialized: each lane is a CPU-bound loop that holds a thread of the cooperative pool (2 threads here) for seconds;
// one lane at a time leaves the other thread to the suites that run beside it.
@Suite("Deterministic simulation", .serialized)
struct SimulationTests {
    static let environment = ProcessInfo.processInfo.environment
    static let seedCount = UInt64(environment["EMC_SIM_SEEDS"] ?? "") ?? 1000
    static let lanes = 8

    @Test("safety and liveness under delay, loss, duplication, partitions, crashes and Byzantine validators",
          arguments: 0..<lanes)
    func seeds(lane: Int) {
        let seeds: [UInt64]
        if let single = Self.environment["EMC_SIM_SEED"].flatMap(UInt64.init) {
            guard lane == 0 else { return }
            seeds = [single]
        } else {
            seeds = Array(stride(from: UInt64(lane), to: Self.seedCount, by: Self.lanes))
        }
        let trace = Self.environment["EMC_SIM_TRACE"] == "1"
        var slowest: (UInt64, UInt64) = (0, 0)
        var heights = 0, evidence = 0, withEquivocator = 0
        for seed in seeds {
            let scenario = Simulation.Scenario(seed: seed)
            if trace { print(scenario) }
            let outcome = Simulation(scenario, trace: trace).run()
            #expect(outcome.failures.isEmpty, "\(outcome.failures.joined(separator: "\n"))")
            if let ms = outcome.livenessMs, ms > slowest.1 { slowest = (seed, ms) }
            heights += outcome.heights.max() ?? 0
            evidence += outcome.evidence
            if scenario.behaviors.contains(where: { $0 == .equivocator }) { withEquivocator += 1 }
        }
        // Equivocators are caught: with a few dozen of them in a lane, some evidence must have been produced.
        if withEquivocator >= 10 { #expect(evidence > 0) }
        print("simulation lane \(lane): \(seeds.count) seeds, \(heights) heights decided, \(evidence) evidence from "
              + "\(withEquivocator) seeds with an equivocator; slowest liveness after GST \(slowest.1) ms (seed \(slowest.0))")
    }

    static let ledgerSeedCount = UInt64(environment["EMC_SIM_LEDGER_SEEDS"] ?? "") ?? 96

    /// The same faults, with the validators' real application: blocks of signed transfers and stake changes,
    /// BlockRules (height, time window, proposer, evidence at its own height) deciding validity, the ledger executing
    /// commits and giving the state roots, equivocation evidence committed and slashed, validator sets changing at
    /// epoch boundaries. EMC_SIM_LEDGER_SEEDS=N for more seeds (default 96).
    @Test("with the real block rules and ledger: safety, liveness, equal state roots, evidence on chain, epoch changes",
          arguments: 0..<lanes)
    func ledgerSeeds(lane: Int) {
        var transfers = 0, evidenceCommitted = 0, withEquivocator = 0, changesSeen = 0, changesDue = 0
        for seed in stride(from: UInt64(lane) + 100_000, to: 100_000 + Self.ledgerSeedCount, by: Self.lanes) {
            var scenario = Simulation.Scenario(seed: seed, heightsAfterGST: 10)
            scenario.ledger = true
            let simulation = Simulation(scenario)
            let outcome = simulation.run()
            #expect(outcome.failures.isEmpty, "\(outcome.failures.joined(separator: "\n"))")
            transfers += outcome.transfers
            evidenceCommitted += outcome.evidenceCommitted
            if scenario.behaviors.contains(.equivocator) { withEquivocator += 1 }
            // A stake change bonded at height 2 and moved at 3 is in the set from the epoch boundary at 4 (+2 heights).
            if let change = scenario.powerChange, (outcome.heights.max() ?? 0) >= 7,
               let node = simulation.nodes.first(where: { $0.blocks.count >= 7 }) {
                changesDue += 1
                let key = simulation.nodes[change.node].key.publicKey
                let before = simulation.genesis.validators.first { $0.publicKey == key }?.votingPower ?? 0
                let after = node.blocks[6].nextValidators.validators.first { $0.publicKey == key }?.votingPower ?? 0
                if after > before { changesSeen += 1 }
            }
        }
        #expect(transfers > 0)
        #expect(changesSeen == changesDue, "a bonded stake change must reach the validator set at the next epoch boundary")
        if withEquivocator >= 4 { #expect(evidenceCommitted > 0, "equivocators' evidence must be committed and slashed") }
        print("ledger simulation lane \(lane): \(transfers) transfers, \(evidenceCommitted) evidence committed, "
              + "\(changesSeen)/\(changesDue) stake changes in the set")
    }

    @Test("the same seed replays to exactly the same run")
    func determinism() {
        for seed: UInt64 in [3, 10] {
            let a = Simulation(Simulation.Scenario(seed: seed)).run()
            let b = Simulation(Simulation.Scenario(seed: seed)).run()
            #expect(a.heights == b.heights && a.events == b.events && a.livenessMs == b.livenessMs)
        }
    }
}
