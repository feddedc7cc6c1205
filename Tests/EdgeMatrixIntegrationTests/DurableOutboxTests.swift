import EdgeMatrixCompute
import EdgeMatrixCore
import EdgeMatrixStore
import Foundation
import GRDB
import Logging
import Testing

/// The compute node's receipt outbox on its own, on a real SQLite file: what survives closing and reopening it
/// (what a restarted node finds), in-process and fast.
@Suite("Durable receipt outbox")
struct ReceiptOutboxFileTests {
    let nodeKey = SigningKey()
    let routerA = SigningKey().nodeID
    let routerB = SigningKey().nodeID

    func receipt(_ requestID: String, router: NodeID? = nil) -> Receipt {
        let body = ReceiptBody(requestID: requestID, nodeID: nodeKey.nodeID, routerID: router ?? routerA, app: "llm", model: "m",
                               requestHash: Hash32.of(Array(requestID.utf8)), responseHash: Hash32.of([1]),
                               units: WorkUnits(promptTokens: 3, completionTokens: 5), startedAtMillis: 1, endedAtMillis: 2, status: 200)
        return Receipt(signing: body, with: nodeKey)
    }

    func path() -> String { Harness.temporaryDirectory("outbox") + "/outbox.sqlite" }

    /// Opens the outbox file as a node does at start-up (quietly).
    func open(_ file: String, capacity: Int = 100_000) throws -> ReceiptOutbox {
        try ReceiptOutbox(path: file, capacity: capacity, logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
    }

    // Bug caught: the outbox lived in memory only, so a restarted node had forgotten every receipt it signed but
    // the router had not acknowledged, and was never paid for that work.
    @Test("unacknowledged receipts are there, oldest first, when the outbox is opened again; acknowledged ones are not")
    func reopen() async throws {
        let file = path()
        do {
            let outbox = try open(file)
            for i in 0..<5 { await outbox.add(receipt("r\(i)")) }
            #expect(await outbox.acknowledge(receipt("r1").id) != nil)
            #expect(await outbox.acknowledge(receipt("r3").id) != nil)
        }
        let reopened = try open(file)
        #expect(await reopened.unacknowledged().map(\.body.requestID) == ["r0", "r2", "r4"])
        // Acknowledging after the restart is durable too.
        #expect(await reopened.acknowledge(receipt("r0").id) != nil)
        #expect(await reopened.acknowledge(receipt("r0").id) == nil)
        #expect(try await open(file).unacknowledged().map(\.body.requestID) == ["r2", "r4"])
    }

    // Bug caught: after a restart every stored receipt went to every router; a router refuses another router's
    // receipt and drops the honest node as misbehaving.
    @Test("a reopened outbox still hands each router only its own receipts")
    func perRouterAfterReopen() async throws {
        let file = path()
        do {
            let outbox = try open(file)
            await outbox.add(receipt("a1", router: routerA))
            await outbox.add(receipt("b1", router: routerB))
            await outbox.add(receipt("a2", router: routerA))
        }
        let reopened = try open(file)
        #expect(await reopened.unacknowledged(for: routerA).map(\.body.requestID) == ["a1", "a2"])
        #expect(await reopened.unacknowledged(for: routerB).map(\.body.requestID) == ["b1"])
    }

    // Bug caught: the cap applied in memory only: receipts dropped to make room came back from the file after a
    // restart, and the file grew without bound under a router that never acknowledges.
    @Test("past its capacity the outbox drops the oldest receipt, on disk too; a file over the capacity is trimmed on open")
    func bounded() async throws {
        let file = path()
        do {
            let outbox = try open(file, capacity: 3)
            for i in 0..<5 { await outbox.add(receipt("r\(i)")) }
            #expect(await outbox.count == 3)
            #expect(await outbox.unacknowledged().map(\.body.requestID) == ["r2", "r3", "r4"])
        }
        #expect(try ReceiptOutboxStore(path: file).count() == 3)
        #expect(try await open(file, capacity: 3).unacknowledged().map(\.body.requestID) == ["r2", "r3", "r4"])
        let smaller = try open(file, capacity: 2)
        #expect(await smaller.unacknowledged().map(\.body.requestID) == ["r3", "r4"])
        #expect(try ReceiptOutboxStore(path: file).count() == 2)
    }

    // Bug caught: the bookkeeping that keeps the oldest-first order bounded (dead entries of dropped and
    // acknowledged receipts compacted away) lost or reordered receipts still pending.
    @Test("oldest-first order and the cap hold across many drops and acknowledgements")
    func orderAcrossCompaction() async throws {
        let outbox = ReceiptOutbox(capacity: 100)
        let receipts = (0..<5000).map { receipt("o\($0)") }
        for r in receipts { await outbox.add(r) }
        #expect(await outbox.unacknowledged().map(\.body.requestID) == receipts.suffix(100).map(\.body.requestID))
        for r in receipts.suffix(100) where !r.body.requestID.hasSuffix("7") { await outbox.acknowledge(r.id) }
        let more = (0..<3000).map { receipt("p\($0)") }
        for r in more { await outbox.add(r) }
        for r in more.prefix(2950) { await outbox.acknowledge(r.id) }
        #expect(await outbox.count == 50)
        #expect(await outbox.unacknowledged().map(\.body.requestID) == more.suffix(50).map(\.body.requestID))
    }

    // Bug caught: group-committed writes from concurrent requests lost some of a batch (or deleted a receipt
    // before its insert reached the file, resurrecting an acknowledged receipt).
    @Test("concurrent adds and acknowledgements all reach the file, in order")
    func concurrentWrites() async throws {
        let file = path()
        let outbox = try open(file)
        let receipts = (0..<200).map { receipt("c\($0)") }
        await withTaskGroup(of: Void.self) { group in
            for (i, r) in receipts.enumerated() {
                group.addTask {
                    await outbox.add(r)
                    if i.isMultiple(of: 2) { await outbox.acknowledge(r.id) }
                }
            }
        }
        let expected = Set(receipts.enumerated().filter { !$0.offset.isMultiple(of: 2) }.map(\.element.body.requestID))
        #expect(Set(await outbox.unacknowledged().map(\.body.requestID)) == expected)
        #expect(Set(try ReceiptOutboxStore(path: file).load().map(\.body.requestID)) == expected)
    }

    // Bug caught: a damaged outbox row was silently skipped (a receipt lost) or sent on as garbage.
    @Test("a corrupt outbox row is reported when the outbox is opened")
    func corruptRow() async throws {
        let file = path()
        do {
            let outbox = try open(file)
            await outbox.add(receipt("r0"))
        }
        let queue = try DatabaseQueue(path: file)
        try await queue.write { db in try db.execute(sql: "UPDATE outbox_receipt SET body = x'00'") }
        try queue.close()
        #expect(throws: StoreError.self) { try open(file) }
    }
}

extension Integration {
@Suite("Durable receipt outbox, end to end", .serialized)
struct DurableOutboxTests {
    // Bug caught: a compute node killed with kill -9 while its router could not acknowledge lost every receipt it
    // had signed (the outbox was in memory), or after restarting re-sent receipts the router had already
    // acknowledged.
    @Test("compute node kill -9 with receipts unacknowledged: after a restart on the same data dir it re-delivers exactly those, each stored once")
    func receiptsSurviveComputeNodeCrash() async throws {
        let network = try await TestNetwork(name: "outbox-crash")
        defer { network.stopAll() }
        try await network.startRouter()
        let router = try #require(network.router)
        // However the test ends, the router must not stay frozen (it could not be stopped).
        defer { kill(router.pid, SIGCONT) }
        let node = try await network.startComputeNode(maxConcurrent: 4, environment: ["LOG_LEVEL": "debug"])
        try await network.waitForNodes(1)
        let directory = network.root + "/compute-1"
        let database = network.routerDirectory + "/router.sqlite"

        // Some receipts are acknowledged before the crash...
        for i in 0..<2 {
            let result = try await Harness.request(.POST, network.baseURL + "/embeddings", key: network.apiKey,
                                                   body: Harness.json(["model": "all-minilm-l6-v2", "input": "sentence \(i)"]))
            #expect(result.status == 200)
        }
        try await Harness.eventually(timeout: .seconds(10), "the node to see 2 receipts acknowledged") {
            node.requestIDs(logged: "receipt acknowledged").count == 2
        }
        // ...and some are signed while the router cannot acknowledge them: freeze it mid-generation.
        let requests = (0..<3).map { i in
            Task {
                try? await Harness.request(.POST, network.baseURL + "/chat/completions", key: network.apiKey, body: Harness.json([
                    "model": "smollm2-135m-instruct", "messages": [["role": "user", "content": "Count to \(i + 5)."]],
                    "max_tokens": 12, "temperature": 0,
                ]), timeout: .seconds(120))
            }
        }
        defer { for request in requests { request.cancel() } }
        try await Harness.eventually(timeout: .seconds(30), "the node to be assigned the chat requests") {
            node.requestIDs(logged: "request assigned").count >= 2 + 3
        }
        kill(router.pid, SIGSTOP)
        let assigned = node.requestIDs(logged: "request assigned")
        try await Harness.eventually(timeout: .seconds(90), "the node to sign a receipt for every assigned request") {
            node.requestIDs(logged: "receipt signed").isSuperset(of: assigned)
        }
        node.kill9()
        // Read after the kill: the log is final. "receipt signed" is logged once the receipt is on disk, and
        // "receipt acknowledged" once its removal is.
        let signed = node.requestIDs(logged: "receipt signed")
        let acknowledged = node.requestIDs(logged: "receipt acknowledged")
        let unacknowledged = signed.subtracting(acknowledged)
        #expect(acknowledged.count >= 2)
        #expect(unacknowledged.count >= 3, "receipts must really be unacknowledged at the kill")
        #expect(Set(try ReceiptOutboxStore(path: directory + "/outbox.sqlite").load().map(\.body.requestID)) == unacknowledged,
                "the node's outbox file must hold exactly the receipts not acknowledged")

        // The node restarts on the same data dir while the router is still frozen, then the router resumes.
        let restarted = try TestProcess(name: "compute-1-restarted", executable: Harness.emcBinary, arguments: [
            "node", "--role", "compute", "--config", directory + "/config.json", "--data-dir", directory,
        ], logDirectory: network.root, environment: ["LOG_LEVEL": "debug"])
        defer { restarted.terminate() }
        try await Harness.eventually(timeout: .seconds(30), "the restarted node to load its outbox") {
            restarted.log.contains("outbox holds unacknowledged receipts from a previous run")
        }
        kill(router.pid, SIGCONT)

        try await Harness.eventually(timeout: .seconds(60), "every signed receipt stored by the router") {
            Set(try await ReceiptFile(path: database).requestIDs()).isSuperset(of: signed)
        }
        try await Harness.eventually(timeout: .seconds(20), "the restarted node to see the re-delivered receipts acknowledged") {
            restarted.requestIDs(logged: "receipt acknowledged").isSuperset(of: unacknowledged)
        }
        let redelivered = restarted.requestIDs(logged: "receipt re-delivered")
        #expect(redelivered == unacknowledged, "re-delivered \(redelivered.sorted()), unacknowledged \(unacknowledged.sorted())")
        #expect(redelivered.isDisjoint(with: acknowledged), "a receipt acknowledged before the crash was re-sent")
        let stored = try await ReceiptFile(path: database).requestIDs()
        #expect(stored.count == Set(stored).count, "a receipt was stored twice")
        #expect(try await network.misbehaviourCounts().isEmpty, "an honest re-delivery was refused\n\(network.logs)\n\(restarted.log.suffix(3000))")
        #expect(try ReceiptOutboxStore(path: directory + "/outbox.sqlite").count() == 0)

        // And the restarted node serves.
        try await network.waitForNodes(1)
        let after = try await Harness.request(.POST, network.baseURL + "/embeddings", key: network.apiKey,
                                              body: Harness.json(["model": "all-minilm-l6-v2", "input": "after the crash"]))
        #expect(after.status == 200)
    }
}
}
