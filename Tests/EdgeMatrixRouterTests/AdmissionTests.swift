import EdgeMatrixCore
@testable import EdgeMatrixRouter
import EdgeMatrixStore
import Foundation
import HTTPTypes
import Testing

/// Router admission (docs/SETTLEMENT.md § 8): the worst-case bound of a request, the reservation arithmetic, and the
/// receipt store reserving against the escrow in the same step as it gives out a sequence number.
@Suite("Router admission")
struct AdmissionTests {
    static func json(_ object: [String: Any]) -> [UInt8] { Array((try? JSONSerialization.data(withJSONObject: object)) ?? Data()) }

    // MARK: - The worst-case bound

    // Bugs caught: `n` (or best_of) ignored, so a request for 8 choices reserved one choice's cost; the default
    // ceiling missing, so a request without max_tokens had no completion bound at all; the prompt bound not the one
    // receipts are held to (bytes + the template allowance).
    @Test("chat: prompt = bytes + 4096, completion = max_tokens × choices, default 4096 per choice")
    func chatBound() {
        let body = Self.json(["model": "m", "max_tokens": 100, "n": 3, "messages": [["role": "user", "content": "hi"]]])
        #expect(RequestBound.units(path: "/v1/chat/completions", body: body)
                == WorkUnits(promptTokens: UInt64(body.count) + 4096, completionTokens: 300, items: 0))
        let plain = Self.json(["model": "m", "prompt": "x"])
        #expect(RequestBound.units(path: "/v1/completions", body: plain).completionTokens == RequestBound.defaultMaxTokens)
        // The larger of the two limit fields, and the larger of n and best_of.
        let both = Self.json(["model": "m", "max_tokens": 10, "max_completion_tokens": 40, "best_of": 5, "n": 2])
        #expect(RequestBound.units(path: "/v1/completions", body: both).completionTokens == 200)
        // A query string does not change the route.
        #expect(RequestBound.units(path: "/v1/chat/completions?x=1", body: both).completionTokens == 200)
    }

    // Bugs caught: a malformed limit (string, negative, fraction, null) read as 0, so nothing was reserved for an
    // answer the app then generated anyway; a huge one trapping in a conversion or wrapping to a small number.
    @Test("malformed limits fall back to the default; huge ones saturate instead of trapping or wrapping")
    func hostileLimits() {
        for value: Any in ["100", -5, 2.5, NSNull(), ["x"]] {
            let body = Self.json(["model": "m", "max_tokens": value])
            #expect(RequestBound.units(path: "/v1/chat/completions", body: body).completionTokens == RequestBound.defaultMaxTokens,
                    "\(value)")
        }
        let huge = Array(#"{"model":"m","max_tokens":1e300,"n":18446744073709551615}"#.utf8)
        let units = RequestBound.units(path: "/v1/chat/completions", body: huge)
        #expect(units.completionTokens == .max)
        // Its cost does not fit: it cannot be reserved (never a wrapped, small cost).
        #expect(UnitPrices(perMillionPromptTokens: 0, perMillionCompletionTokens: 2_000_000, perItem: 0).cost(of: units) == nil)
        let wide = Array(#"{"model":"m","max_tokens":4294967296,"n":4294967296}"#.utf8)
        #expect(RequestBound.units(path: "/v1/chat/completions", body: wide).completionTokens == .max)
        // Request bytes near 2^64 saturate the prompt bound.
        #expect(RequestBound.units(path: "/v1/chat/completions", requestBytes: .max - 1, object: nil).promptTokens == .max)
    }

    // Bug caught: an embeddings request with many inputs reserved one input's cost.
    @Test("embeddings: one item per input; no completion tokens; other routes: one item, the default completion bound")
    func embeddingsAndOtherBounds() {
        func items(_ input: Any) -> UInt64 {
            RequestBound.units(path: "/v1/embeddings", body: Self.json(["model": "e", "input": input])).items
        }
        #expect(items("one") == 1)
        #expect(items(["a", "b", "c"]) == 3)
        #expect(items([1, 2, 3]) == 1)
        #expect(items([[1, 2], [3], [4]]) == 3)
        #expect(RequestBound.units(path: "/v1/embeddings", body: Self.json(["model": "e", "input": "x"])).completionTokens == 0)
        let rest = RequestBound.units(path: "/render?size=2", body: Array("anything".utf8))
        #expect(rest == WorkUnits(promptTokens: 8 + 4096, completionTokens: RequestBound.defaultMaxTokens, items: 1))
    }

    // Bugs caught: the default ceiling reserved but not sent to the app (the app generating past it); a second
    // max_tokens member added to a request that names one (even as null), which parsers read differently.
    @Test("a chat request without a completion limit is forwarded with max_tokens 4096 appended; one with a limit is not touched")
    func defaultCeilingIsForwarded() throws {
        let body = Array("{\"model\":\"m\",\"messages\":[]} \n".utf8)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(body)) as? [String: Any])
        let forwarded = try #require(RequestBound.withDefaultMaxTokens(body, object: object))
        let parsed = try #require(try JSONSerialization.jsonObject(with: Data(forwarded)) as? [String: Any])
        #expect(parsed["max_tokens"] as? Int == 4096)
        #expect(parsed["model"] as? String == "m")
        #expect(RequestBound.units(path: "/v1/chat/completions", body: forwarded).completionTokens == 4096)
        for named in [#"{"model":"m","max_tokens":null}"#, #"{"model":"m","max_completion_tokens":5}"#] {
            let bytes = Array(named.utf8)
            let object = try #require(try JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any])
            #expect(RequestBound.withDefaultMaxTokens(bytes, object: object) == nil)
        }
    }

    // Bug caught: the node billed the app's usage up to the relayed bytes only, so an app ignoring max_tokens made an
    // honest node's receipt exceed what the router reserved (and the router refuse it).
    @Test("the node's billed units are clamped to the request's bound as well as to the relayed bytes")
    func billedWithinRequestBound() {
        let reported = WorkUnits(promptTokens: 50, completionTokens: 900, items: 4)
        let billed = BilledUnits.billed(reported: reported, requestBytes: 100, responseBytes: 10_000,
                                        requestBound: WorkUnits(promptTokens: 4196, completionTokens: 16, items: 0))
        #expect(billed == WorkUnits(promptTokens: 50, completionTokens: 16, items: 0))
        #expect(BilledUnits.billed(reported: reported, requestBytes: 100, responseBytes: 10_000) == WorkUnits(promptTokens: 50, completionTokens: 900, items: 4))
    }

    // MARK: - Reservation arithmetic

    // Bugs caught: the old rule `unsettled < available` (a request costing more than what is left was served); an
    // addition that wraps (a huge reservation making the sum small) or traps.
    @Test("admit iff unsettled + reserved + worst ≤ available, without overflow")
    func admitRule() {
        #expect(EscrowReservations.admits(unsettled: 40, reserved: 50, worst: 10, available: 100))
        #expect(!EscrowReservations.admits(unsettled: 40, reserved: 50, worst: 11, available: 100))
        #expect(!EscrowReservations.admits(unsettled: 99, reserved: 0, worst: 2, available: 100))
        #expect(EscrowReservations.admits(unsettled: 0, reserved: 0, worst: .max, available: .max))
        #expect(!EscrowReservations.admits(unsettled: 1, reserved: 0, worst: .max, available: .max))
        #expect(!EscrowReservations.admits(unsettled: .max, reserved: .max, worst: .max, available: .max))
        #expect(!EscrowReservations.admits(unsettled: 0, reserved: .max, worst: 2, available: .max))
    }

    // Bugs caught: a release subtracting from another payer, or twice (a second release of one request freeing a
    // reservation that is still held); a saturated sum never coming back down.
    @Test("reservations sum per payer, release once, and saturate without trapping")
    func reservationBookkeeping() {
        let a = Account(owner: SigningKey().publicKey), b = Account(owner: SigningKey().publicKey)
        var reservations = EscrowReservations()
        reservations.reserve(1, payer: a, amount: 30)
        reservations.reserve(2, payer: a, amount: 20)
        reservations.reserve(3, payer: b, amount: 7)
        #expect(reservations.reserved(payer: a) == 50)
        #expect(reservations.reserved(payer: b) == 7)
        reservations.release(1)
        reservations.release(1)
        #expect(reservations.reserved(payer: a) == 20)
        #expect(reservations.count == 2)
        reservations.reserve(4, payer: b, amount: .max)
        #expect(reservations.reserved(payer: b) == .max)
        reservations.release(4)
        #expect(reservations.reserved(payer: b) == 7)
        reservations.assigned(2, attempt: 1)
        reservations.assigned(2, attempt: 0)
        #expect(reservations.entry(2)?.attempt == 1)
        // Past its age a reservation no longer counts.
        reservations.expire(now: .now + EscrowReservations.maxAge + .seconds(1))
        #expect(reservations.count == 0)
        #expect(reservations.reserved(payer: a) == 0 && reservations.reserved(payer: b) == 0)
    }

    // MARK: - The receipt store

    static func store() throws -> ReceiptStore {
        ReceiptStore(database: try RouterDatabase(path: NSTemporaryDirectory() + "emc-admission-\(UUID().uuidString)/router.sqlite"))
    }

    let payer = Account(owner: SigningKey().publicKey)
    let node = SigningKey()
    let router = SigningKey()
    let prices = UnitPrices(perMillionPromptTokens: 0, perMillionCompletionTokens: 1_000_000, perItem: 0)

    func assignment(_ sequence: UInt64, attempt: UInt32 = 0, bound: WorkUnits? = nil, prices: UnitPrices? = nil) -> Assignment {
        Assignment(sequence: sequence, attempt: attempt, nodeID: node.nodeID, app: "llm", model: "m", requestHash: Hash32.of([1]),
                   requestBytes: 100, payer: payer, prices: prices ?? self.prices, requestBound: bound)
    }

    func receipt(_ sequence: UInt64, attempt: UInt32 = 0, completion: UInt64) -> Receipt {
        let body = ReceiptBody(payer: payer, router: router.publicKey, node: node.publicKey, sequence: sequence, attempt: attempt,
                               app: "llm", model: "m", prices: prices, units: WorkUnits(promptTokens: 1, completionTokens: completion),
                               startedAtMillis: 1, endedAtMillis: 2, requestHash: Hash32.of([1]), responseHash: Hash32.of([2]), status: 200)
        var receipt = Receipt(signing: body, with: node)
        try? receipt.countersign(nodeKey: node.publicKey, routerKey: router)
        return receipt
    }

    // Bug caught: admission checked `unsettled < available` only, so 64 concurrent requests all passed an escrow
    // that covers 10 of them (each overshooting by its whole cost).
    @Test("64 concurrent accepts against an escrow covering 10 worst cases: exactly 10 get a sequence number")
    func concurrentAcceptsNeverOvershoot() async throws {
        let store = try Self.store()
        let key = Hash32.of([7])
        let outcomes = try await withThrowingTaskGroup(of: ReceiptStore.Acceptance.self) { group in
            for _ in 0..<64 {
                group.addTask {
                    try await store.accept(keyHash: key, payer: payer, epoch: 0, spendLimit: APIKeyBinding.unlimited,
                                           escrowAvailable: 1000, worstCost: 100)
                }
            }
            return try await group.reduce(into: [ReceiptStore.Acceptance]()) { $0.append($1) }
        }
        let accepted = outcomes.filter { if case .accepted = $0 { true } else { false } }
        #expect(accepted.count == 10)
        #expect(await store.reserved(payer: payer) == 1000)
        #expect(outcomes.contains(.overEscrow(unsettled: 0, reserved: 1000, worst: 100, available: 1000)))
        // A refused request takes no number.
        #expect(try await store.lastSequence() == 10)
    }

    // Bugs caught: the reservation kept after the receipt is stored (its cost counted twice, refusing a request the
    // escrow covers) or dropped before it (a window where neither counts); a failed-over attempt's receipt ending the
    // reservation of the attempt still serving.
    @Test("a stored receipt of the latest attempt replaces the reservation with the metered cost; releases are idempotent")
    func receiptReplacesReservation() async throws {
        let store = try Self.store()
        let key = Hash32.of([8])
        guard case .accepted(let sequence) = try await store.accept(keyHash: key, payer: payer, epoch: 0, spendLimit: APIKeyBinding.unlimited,
                                                                    escrowAvailable: 1000, worstCost: 600) else {
            Issue.record("refused")
            return
        }
        #expect(try await store.accept(keyHash: key, payer: payer, epoch: 0, spendLimit: APIKeyBinding.unlimited,
                                       escrowAvailable: 1000, worstCost: 600) == .overEscrow(unsettled: 0, reserved: 600, worst: 600, available: 1000))
        // Attempt 0 failed over to attempt 1; attempt 0's late receipt does not end the reservation.
        try await store.recordAssignment(assignment(sequence, attempt: 0))
        try await store.recordAssignment(assignment(sequence, attempt: 1))
        #expect(try await store.append(receipt(sequence, attempt: 0, completion: 0)) == .stored)
        #expect(await store.reserved(payer: payer) == 600)
        // The serving attempt's receipt: the metered cost (5 completion tokens at 1 per token) replaces the 600.
        #expect(try await store.append(receipt(sequence, attempt: 1, completion: 5)) == .stored)
        #expect(await store.reserved(payer: payer) == 0)
        #expect(try await store.unsettled(payer: payer) == 5)
        await store.releaseReservation(sequence)
        #expect(await store.reserved(payer: payer) == 0)
        // 5 owed + 600 ≤ 1000: served again; a request that ends without a receipt gives its reservation back.
        guard case .accepted(let next) = try await store.accept(keyHash: key, payer: payer, epoch: 0, spendLimit: APIKeyBinding.unlimited,
                                                                escrowAvailable: 1000, worstCost: 600) else {
            Issue.record("refused")
            return
        }
        #expect(await store.reserved(payer: payer) == 600)
        await store.releaseReservation(next)
        #expect(await store.reserved(payer: payer) == 0)
        #expect(await store.reservationCount == 0)
    }

    // Bug caught: a node whose prices rose between admission and assignment was handed a request whose worst case at
    // the new prices exceeds its reservation (the escrow then overspent by the difference).
    @Test("an assignment whose worst case at the node's prices exceeds the reservation is refused and not recorded")
    func assignmentAboveReservation() async throws {
        let store = try Self.store()
        guard case .accepted(let sequence) = try await store.accept(keyHash: Hash32.of([9]), payer: payer, epoch: 0,
                                                                    spendLimit: APIKeyBinding.unlimited, escrowAvailable: 1000,
                                                                    worstCost: 100) else {
            Issue.record("refused")
            return
        }
        let bound = WorkUnits(promptTokens: 4196, completionTokens: 100, items: 0)
        await #expect(throws: AssignmentRefusal.aboveReservation(cost: 200, reserved: 100)) {
            try await store.recordAssignment(assignment(sequence, bound: bound,
                                                        prices: UnitPrices(perMillionPromptTokens: 0, perMillionCompletionTokens: 2_000_000, perItem: 0)))
        }
        // Nothing recorded: a receipt for it is unassigned.
        #expect(try await store.append(receipt(sequence, completion: 1)) == .unassigned)
        // At the admitted prices it goes through.
        try await store.recordAssignment(assignment(sequence, bound: bound))
        #expect(try await store.append(receipt(sequence, completion: 1)) == .stored)
    }

    // Bug caught: receipts were held to the relayed bytes only, so a node could bill completion tokens past the
    // request's max_tokens (what was reserved), also after a router restart.
    @Test("a receipt billing more than the request's bound is refused, also after a restart")
    func receiptAboveRequestBound() async throws {
        let path = NSTemporaryDirectory() + "emc-admission-\(UUID().uuidString)/router.sqlite"
        let store = ReceiptStore(database: try RouterDatabase(path: path))
        try await store.recordAssignment(assignment(1, bound: WorkUnits(promptTokens: 4196, completionTokens: 16, items: 0)))
        try await store.recordAssignment(assignment(2, bound: WorkUnits(promptTokens: 4196, completionTokens: 16, items: 0)))
        #expect(try await store.append(receipt(1, completion: 17)) == .unitsAboveBound)
        #expect(try await store.append(receipt(1, completion: 16)) == .stored)
        let reopened = ReceiptStore(database: try RouterDatabase(path: path))
        #expect(try await reopened.append(receipt(2, completion: 17)) == .unitsAboveBound)
    }

    // MARK: - The header

    // Bugs caught: a malformed, negative, over-precise or huge X-EMC-Max-Price read as "no maximum" (or trapping).
    @Test("X-EMC-Max-Price parses EMC decimals and refuses anything else with invalid_max_price")
    func maxPriceHeader() throws {
        func parse(_ value: String?) throws -> UInt64? {
            var fields = HTTPFields()
            if let value { fields[.emcMaxPrice] = value }
            return try Gateway.maxPrice(fields)
        }
        #expect(try parse(nil) == nil)
        #expect(try parse("0.002") == 200_000)
        #expect(try parse("1") == 100_000_000)
        #expect(try parse("0") == 0)
        for bad in ["-1", "abc", "0.000000001", "1e3", "99999999999999999999", "", "0x10", String(repeating: "1", count: 40)] {
            #expect(throws: OpenAIError.self, "\(bad)") { try parse(bad) }
            do { _ = try parse(bad) } catch let error as OpenAIError {
                #expect(error.code == "invalid_max_price")
                #expect(error.status == .badRequest)
            }
        }
    }
}
