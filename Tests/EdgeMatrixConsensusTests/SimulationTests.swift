import EdgeMatrixConsensus
import EdgeMatrixCore
import Foundation
import Testing

/// Safety and liveness of the whole protocol under faults, over many seeds.
/// EMC_SIM_SEEDS=N runs N seeds (default 1,000); EMC_SIM_SEED=S replays one seed with a trace (EMC_SIM_TRACE=1).
@Suite("Deterministic simulation")
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

    @Test("the same seed replays to exactly the same run")
    func determinism() {
        for seed: UInt64 in [3, 10] {
            let a = Simulation(Simulation.Scenario(seed: seed)).run()
            let b = Simulation(Simulation.Scenario(seed: seed)).run()
            #expect(a.heights == b.heights && a.events == b.events && a.livenessMs == b.livenessMs)
        }
    }
}
