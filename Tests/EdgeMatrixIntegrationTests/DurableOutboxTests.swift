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
    let routerA = SigningKey().publicKey
    let routerB = SigningKey().publicKey

    /// A receipt told apart from the others by its model name (`label`).
    func receipt(_ label: String, router: PublicKey? = nil) -> Receipt {
        let body = ReceiptBody(payer: Account(owner: nodeKey.publicKey), router: router ?? routerA, node: nodeKey.publicKey, sequence: 1,
                               attempt: 0, app: "llm", model: label, prices: .free, units: WorkUnits(promptTokens: 3, completionTokens: 5),
                               startedAtMillis: 1, endedAtMillis: 2, requestHash: Hash32.of(Array(label.utf8)), responseHash: Hash32.of([1]),
                               status: 200)
        return Receipt(signing: body, with: nodeKey)
    }

    func path() -> String { Harness.temporaryDirectory("outbox") + "/outbox.sqlite" }

    /// Opens the outbox file as a node does at start-up (quietly).
    func open(_ file: String, capacity: Int = 100_000) throws -> ReceiptOutbox {
        try ReceiptOutbox(path: file, capacity: capacity, logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
    }

    // Bugs caught: the node forgetting a receipt once acknowledged (so it can neither check the router's batches
    // nor prove an omission), keeping one with a countersignature that does not verify (worthless as evidence), or
    // losing the kept ones at a restart.
    @Test("an acknowledgement with the router's countersignature keeps the countersigned receipt, across a restart; a bad or missing one keeps nothing")
    func keepsCountersigned() async throws {
        let file = path()
        let router = SigningKey()
        let good = receipt("good", router: router.publicKey), forged = receipt("forged", router: router.publicKey)
        let old = receipt("old-router", router: router.publicKey)
        do {
            let outbox = try open(file)
            for r in [good, forged, old] { await outbox.add(r) }
            let countersignature = router.sign(good.bodyBytes + good.nodeSignature, domain: .receiptByRouter)
            let kept = await outbox.acknowledge(good.id, routerSignature: countersignature)
            #expect(kept?.routerSignature == countersignature)
            // Signed by another key, or over another receipt: not kept, but still acknowledged.
            #expect(await outbox.acknowledge(forged.id, routerSignature: SigningKey().sign(forged.bodyBytes + forged.nodeSignature,
                                                                                             domain: .receiptByRouter)) != nil)
            #expect(await outbox.acknowledge(old.id, routerSignature: []) != nil)  // a router that sends none
            #expect(await outbox.count == 0)
        }
        let reopened = try open(file)
        let kept = try await reopened.countersigned()
        #expect(kept.map(\.id) == [good.id])
        #expect(throws: Never.self) { try kept.first?.verify(nodeKey: nodeKey.publicKey, routerKey: router.publicKey) }
        #expect(try await reopened.countersigned(router: SigningKey().nodeID).isEmpty)
        #expect(try await reopened.countersigned(router: router.nodeID, afterSequence: 1).isEmpty)  // its sequence is 1
        #expect(await reopened.count == 0)
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
        #expect(await reopened.unacknowledged().map(\.body.model) == ["r0", "r2", "r4"])
        // Acknowledging after the restart is durable too.
        #expect(await reopened.acknowledge(receipt("r0").id) != nil)
        #expect(await reopened.acknowledge(receipt("r0").id) == nil)
        #expect(try await open(file).unacknowledged().map(\.body.model) == ["r2", "r4"])
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
        #expect(await reopened.unacknowledged(for: routerA.nodeID).map(\.body.model) == ["a1", "a2"])
        #expect(await reopened.unacknowledged(for: routerB.nodeID).map(\.body.model) == ["b1"])
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
            #expect(await outbox.unacknowledged().map(\.body.model) == ["r2", "r3", "r4"])
        }
        #expect(try ReceiptOutboxStore(path: file).count() == 3)
        #expect(try await open(file, capacity: 3).unacknowledged().map(\.body.model) == ["r2", "r3", "r4"])
        let smaller = try open(file, capacity: 2)
        #expect(await smaller.unacknowledged().map(\.body.model) == ["r3", "r4"])
        #expect(try ReceiptOutboxStore(path: file).count() == 2)
    }

    // Bug caught: the bookkeeping that keeps the oldest-first order bounded (dead entries of dropped and
    // acknowledged receipts compacted away) lost or reordered receipts still pending.
    @Test("oldest-first order and the cap hold across many drops and acknowledgements")
    func orderAcrossCompaction() async throws {
        let outbox = ReceiptOutbox(capacity: 100)
        let receipts = (0..<5000).map { receipt("o\($0)") }
        for r in receipts { await outbox.add(r) }
        #expect(await outbox.unacknowledged().map(\.body.model) == receipts.suffix(100).map(\.body.model))
        for r in receipts.suffix(100) where !r.body.model.hasSuffix("7") { await outbox.acknowledge(r.id) }
        let more = (0..<3000).map { receipt("p\($0)") }
        for r in more { await outbox.add(r) }
        for r in more.prefix(2950) { await outbox.acknowledge(r.id) }
        #expect(await outbox.count == 50)
        #expect(await outbox.unacknowledged().map(\.body.model) == more.suffix(50).map(\.body.model))
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
        let expected = Set(receipts.enumerated().filter { !$0.offset.isMultiple(of: 2) }.map(\.element.body.model))
        #expect(Set(await outbox.unacknowledged().map(\.body.model)) == expected)
        #expect(Set(try ReceiptOutboxStore(path: file).load().map(\.body.model)) == expected)
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

    // Bug caught: a node upgraded to receipt v2 refused to start on an outbox holding v1 receipts (a "corrupt row"),
    // or re-sent receipts no router reads, and was dropped as misbehaving for each.
    @Test("version 1 receipts left in an outbox are dropped, with a log line, when the outbox is opened")
    func oldVersionsDropped() async throws {
        let file = path()
        do {
            let outbox = try open(file)
            await outbox.add(receipt("v2"))
        }
        let queue = try DatabaseQueue(path: file)
        try await queue.write { db in
            try db.execute(sql: "INSERT INTO outbox_receipt (receipt_id, router_id, body, node_signature) VALUES ('old', 'r', x'0100', x'00')")
        }
        try queue.close()
        let logged = LogLines()
        let outbox = try ReceiptOutbox(path: file, logger: Logger(label: "test") { _ in logged })
        #expect(await outbox.unacknowledged().map(\.body.model) == ["v2"])
        #expect(logged.lines.contains { $0.contains("older receipt version") })
        #expect(try ReceiptOutboxStore(path: file).count() == 1)
    }
}

/// The router's SQLite file as an older router left it: migrated, never misread.
@Suite("Router database migration")
struct RouterDatabaseMigrationTests {
    // Bug caught: keys made before bindings stopped working after the upgrade, or were billed to nobody.
    @Test("a key from before bindings still works and bills the router's own account (no binding, no limit)")
    func legacyKeys() async throws {
        let file = Harness.temporaryDirectory("router-db") + "/router.sqlite"
        let legacy = "emc-sk-" + String(repeating: "ab", count: 24)
        let queue = try DatabaseQueue(path: file)
        try await queue.write { db in
            // The schema and rows of a router before receipt v2 (GRDB's own record of the migrations it ran).
            try db.execute(sql: """
                CREATE TABLE grdb_migrations (identifier TEXT NOT NULL PRIMARY KEY);
                INSERT INTO grdb_migrations VALUES ('v1'), ('v2-assignments');
                CREATE TABLE api_key (key_hash TEXT PRIMARY KEY, label TEXT NOT NULL, created_at INTEGER NOT NULL,
                    revoked BOOLEAN NOT NULL DEFAULT 0);
                CREATE TABLE receipt (seq INTEGER PRIMARY KEY AUTOINCREMENT, receipt_id TEXT NOT NULL UNIQUE ON CONFLICT IGNORE,
                    request_id TEXT NOT NULL, node_id TEXT NOT NULL, app TEXT NOT NULL, model TEXT NOT NULL,
                    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, items INTEGER NOT NULL,
                    started_at_ms INTEGER NOT NULL, ended_at_ms INTEGER NOT NULL, body BLOB NOT NULL, node_signature BLOB NOT NULL,
                    router_signature BLOB NOT NULL, stored_at_ms INTEGER NOT NULL);
                CREATE TABLE assignment (request_id TEXT NOT NULL, node_id TEXT NOT NULL, request_hash BLOB NOT NULL,
                    assigned_at_ms INTEGER NOT NULL, receipt_id TEXT, PRIMARY KEY (request_id, node_id));
                INSERT INTO receipt (receipt_id, request_id, node_id, app, model, prompt_tokens, completion_tokens, items, started_at_ms,
                    ended_at_ms, body, node_signature, router_signature, stored_at_ms) VALUES ('x', 'req-1', 'n', 'llm', 'm', 1, 1, 0, 1, 2,
                    x'01', x'00', x'00', 3);
                """)
            try db.execute(sql: "INSERT INTO api_key (key_hash, label, created_at) VALUES (?, 'old', 1)",
                           arguments: [APIKeyBinding.hash(ofSecret: legacy).hex])
        }
        try queue.close()
        let database = try RouterDatabase(path: file)
        let key = try #require(try APIKeyStore(database: database).lookup(legacy))
        #expect(key.account == nil)
        #expect(key.spendLimitPerEpoch == APIKeyBinding.unlimited)
        #expect(try APIKeyStore(database: database).list().map(\.label) == ["old"])
        // Version 1 receipts are set aside, not decoded as v2 (which would fail every listing).
        let store = ReceiptStore(database: database)
        #expect(try await store.list().isEmpty)
        #expect(try await store.accept(keyHash: key.keyHash, payer: Account(owner: SigningKey().publicKey)) == 1)
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
        #expect(Set(try ReceiptOutboxStore(path: directory + "/outbox.sqlite").load().map { String($0.body.sequence) }) == unacknowledged,
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

/// A log handler that keeps the messages it is given (to check what a component logged).
final class LogLines: LogHandler, @unchecked Sendable {
    private let lock = NSLock()
    private var stored: [String] = []
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    var lines: [String] { lock.withLock { stored } }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String, file: String,
             function: String, line: UInt) {
        lock.withLock { stored.append(message.description) }
    }
}
