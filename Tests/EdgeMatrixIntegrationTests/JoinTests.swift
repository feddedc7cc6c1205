import EdgeMatrixCore
import Foundation
import Testing

extension Integration {
    @Suite("A GPU owner joins with one command", .serialized)
    struct JoinTests {
        @Test("emc join creates the key, bonds, registers, probes the app, finds the router on chain and serves; bad input changes nothing")
        func joinServes() async throws {
            let network = try await TestNetwork(name: "join")
            defer { network.stopAll() }
            try await network.startRouter()
            try await RegistryChain.shared.enrollRouter(network.routerKey, tunnelAddress: "127.0.0.1:\(network.tunnelPort)")
            let chainURL = try await RegistryChain.shared.url()
            let funded = try await RegistryChain.shared.fundedKeyPath()
            let directory = network.root + "/joined"

            // An app that is not there: a clear error, and no key, stake or registration is made for it.
            let refused = try CLIRun.emc(["join", "--app", "http://127.0.0.1:\(Harness.freePort())", "--stake", "100", "--lock-days", "7",
                                          "--key", funded, "--data-dir", directory, "--node", chainURL])
            #expect(refused.status != 0)
            #expect((refused.stdout + refused.stderr).contains("does not answer GET /v1/models"), "\(refused)")
            #expect(!FileManager.default.fileExists(atPath: directory + "/node.key"))

            let join = try TestProcess(name: "join", executable: Harness.emcBinary, arguments: [
                "join", "--role", "compute", "--app", network.models.chatURL, "--stake", "100", "--lock-days", "7",
                "--key", funded, "--data-dir", directory, "--node", chainURL,
            ], logDirectory: network.root)
            defer { join.terminate() }
            try await Harness.eventually(timeout: .seconds(60), "the joined node serves through the router") {
                try await network.connectedNodes().count == 1
            }
            let key = try KeyFile.read(from: directory + "/node.key")
            #expect(try await network.connectedNodes().first?["id"] as? String == key.nodeID.description)
            for step in ["1/5 node key", "2/5 app", "3/5 bonding and registering", "4/5 routers from the registry", "5/5 serving"] {
                #expect(join.log.contains(step), "\(join.log.suffix(3000))")
            }
            let answer = try await Harness.request(.POST, network.baseURL + "/chat/completions", key: network.apiKey, body: Harness.json([
                "model": "smollm2-135m-instruct", "messages": [["role": "user", "content": "Say hello"]], "max_tokens": 8,
            ]), timeout: .seconds(60))
            #expect(answer.status == 200, "\(answer.text)")
            // On chain: an eligible compute node owned by the funded account.
            let nodes = try await Harness.request(.GET, chainURL + "/nodes").json?["nodes"] as? [[String: Any]] ?? []
            let record = nodes.first { $0["node_key"] as? String == key.publicKey.hex }
            #expect(record?["role"] as? String == "compute")
            #expect(record?["eligible"] as? Bool == true)
        }
    }
}
