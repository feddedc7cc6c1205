import EdgeMatrixCore
import EdgeMatrixStore
import Foundation
import Testing

/// The router's receipt store only takes a receipt for a request it assigned to that node, and only one.
@Suite("Receipt store")
struct ReceiptStoreTests {
    let node = SigningKey()
    let router = SigningKey()

    func store() throws -> ReceiptStore {
        let path = NSTemporaryDirectory() + "emc-receipts-\(UUID().uuidString)/router.sqlite"
        return ReceiptStore(database: try RouterDatabase(path: path))
    }

    func receipt(_ requestID: String, requestHash: Hash32 = Hash32.of([1]), completion: UInt64 = 5) -> Receipt {
        var receipt = Receipt(signing: ReceiptBody(
            requestID: requestID, nodeID: node.nodeID, routerID: router.nodeID, app: "llm", model: "m", requestHash: requestHash,
            responseHash: Hash32.of([2]), units: WorkUnits(promptTokens: 1, completionTokens: completion), startedAtMillis: 1,
            endedAtMillis: 2, status: 200), with: node)
        try? receipt.countersign(nodeKey: node.publicKey, routerKey: router)
        return receipt
    }

    // Bug caught: any well-signed receipt was stored, so a node could bill requests it never served, or one twice.
    @Test("unassigned, second and mismatched receipts are refused; the same receipt again is stored once")
    func onlyAssignedOnce() async throws {
        let store = try store()
        #expect(try await store.append(receipt("req-a")) == .unassigned)
        try await store.recordAssignment(requestID: "req-a", nodeID: node.nodeID, requestHash: Hash32.of([1]))
        #expect(try await store.append(receipt("req-a", requestHash: Hash32.of([9]))) == .requestHashMismatch)
        let first = receipt("req-a")
        #expect(try await store.append(first) == .stored)
        #expect(try await store.append(first) == .alreadyStored)
        #expect(try await store.append(receipt("req-a", completion: 5_000)) == .alreadyReceipted)
        // Assigned to another node: not this node's to bill.
        try await store.recordAssignment(requestID: "req-b", nodeID: SigningKey().nodeID, requestHash: Hash32.of([1]))
        #expect(try await store.append(receipt("req-b")) == .unassigned)
        #expect(try await store.list().map(\.receipt.body.requestID) == ["req-a"])
    }

    // Bug caught: Int64(UInt64) trapped on counts above Int64.max, and the node re-sent that receipt after every restart.
    @Test("a count above Int64.max is refused with a typed error, never trapped on")
    func hugeCountsDoNotTrap() async throws {
        let store = try store()
        try await store.recordAssignment(requestID: "req-huge", nodeID: node.nodeID, requestHash: Hash32.of([1]))
        await #expect(throws: StoreError.self) { try await store.append(receipt("req-huge", completion: .max)) }
        // The batch it was in is not poisoned: the store keeps working.
        #expect(try await store.append(receipt("req-huge")) == .stored)
    }
}
