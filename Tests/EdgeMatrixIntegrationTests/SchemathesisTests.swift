import EdgeMatrixCore
import Foundation
import Testing

/// Runs schemathesis (from PyPI, installed into the test venv by setup-models.sh) against a live validator and a live
/// router with the OpenAPI specs in docs/openapi/: property-based requests, valid and invalid, to every operation.
/// Bug caught by each run: a route that answers 5xx of its own, or a status, content type, header or body shape the
/// spec does not list. `EMC_SCHEMATHESIS_EXAMPLES` sets the examples per operation (default 25).
enum Schemathesis {
    static var executable: String { Harness.venv + "/bin/schemathesis" }
    static var examples: String { ProcessInfo.processInfo.environment["EMC_SCHEMATHESIS_EXAMPLES"] ?? "25" }

    struct Run {
        var status: Int32
        var output: String
    }

    /// `schemathesis run` of one spec against `baseURL`, reproducible (`--seed`), one worker (a 2-core CI machine).
    /// `excluding`: paths left out (an endless event stream never ends a request).
    static func run(spec: String, baseURL: String, config: String? = nil, headers: [String] = [], excluding: [String] = []) throws -> Run {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = (config.map { ["--config-file", Harness.packageRoot + "/Tests/schemathesis/" + $0] } ?? []) + [
            "run", Harness.packageRoot + "/docs/openapi/" + spec, "--url", baseURL,
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance",
            "--max-examples", examples, "--seed", "20261207", "--workers", "1", "--no-color", "--request-timeout", "30",
            "--generation-database", "none", "--suppress-health-check", "all",
        ] + headers.flatMap { ["--header", $0] } + excluding.flatMap { ["--exclude-path", $0] }
        var environment = ProcessInfo.processInfo.environment
        environment["SCHEMATHESIS_TELEMETRY"] = "false"
        process.environment = environment
        // schemathesis keeps a crash cache in its working directory: not in the checkout.
        let scratch = Harness.temporaryDirectory("schemathesis")
        process.currentDirectoryURL = URL(fileURLWithPath: scratch)
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let output = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Run(status: process.terminationStatus, output: String(decoding: output, as: UTF8.self))
    }
}

extension Integration {
    @Suite("Schemathesis against the OpenAPI specs", .serialized)
    struct SchemathesisTests {
        @Test("validator.json: schemathesis finds no server error and no answer outside the spec; the chain keeps finalising, its state unchanged")
        func validator() async throws {
            let chain = try InProcessChain(validators: 1, running: 1)
            do {
                let base = chain.url()
                try await Harness.eventually(timeout: .seconds(20), "the validator commits") {
                    (try await Harness.request(.GET, base + "/status", timeout: .seconds(1)).json?["height"] as? Int ?? 0) >= 2
                }
                let funded = try chain.funded
                let before = try await Harness.request(.GET, base + "/accounts/" + Account(owner: funded.publicKey).description)
                // The block event stream never ends; OpenAPISpecTests checks its events.
                let run = try Schemathesis.run(spec: "validator.json", baseURL: base, excluding: ["/events/blocks"])
                #expect(run.status == 0, "schemathesis found failures:\n\(run.output)")
                // Alive and still finalising, and no request of the run moved money.
                let height = try #require(try await Harness.request(.GET, base + "/status").json?["height"] as? Int)
                try await Harness.eventually(timeout: .seconds(20), "the chain keeps finalising") {
                    (try await Harness.request(.GET, base + "/status", timeout: .seconds(1)).json?["height"] as? Int ?? 0) > height
                }
                let after = try await Harness.request(.GET, base + "/accounts/" + Account(owner: funded.publicKey).description)
                #expect(after.json?["balance"] as? String == before.json?["balance"] as? String)
                print("schemathesis validator.json:\n\(run.output.split(separator: "\n").suffix(12).joined(separator: "\n"))")
            } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        @Test("router.json: schemathesis finds no server error and no answer outside the spec; the router lives and serves")
        func router() async throws {
            let network = try await TestNetwork(name: "schemathesis")
            defer { network.stopAll() }
            try await network.startRouter()
            try await network.startComputeNode(extraApps: [.init(name: "vectors", kind: .rest, baseURL: network.models.embeddingsURL,
                                                           healthPath: "/health")])
            try await network.waitForNodes(1)
            let base = "http://127.0.0.1:\(network.httpPort)"
            let run = try Schemathesis.run(spec: "router.json", baseURL: base, config: "router.toml", headers: ["Authorization: Bearer \(network.apiKey)"])
            #expect(run.status == 0, "schemathesis found failures:\n\(run.output)")
            #expect(network.router?.isRunning == true, "router died under schemathesis\n\(network.logs)")
            let honest = try await Harness.request(.POST, base + "/v1/embeddings", key: network.apiKey,
                                                   body: Harness.json(["model": "all-minilm-l6-v2", "input": "still serving"]))
            #expect(honest.status == 200, "\(honest.text)")
            print("schemathesis router.json:\n\(run.output.split(separator: "\n").suffix(12).joined(separator: "\n"))")
        }
    }
}
