import EdgeMatrixChain
import EdgeMatrixCompute
import EdgeMatrixCore
import EdgeMatrixLedger
@testable import EdgeMatrixNode
import Foundation
import Logging
import Testing

extension Integration {
    /// The compute node's side of node settlement (`ReceiptNoticeService`) against a real in-process chain.
    @Suite("Compute node notices unsettled receipts", .serialized)
    struct NoticeServiceTests {
        // Catches: a node that never notices its unsettled receipts, notices ones worth nothing, sends what the chain
        // already holds again after a restart (refused, or worse, paid twice), or retries a refused receipt for ever.
        @Test("the service notices kept countersigned receipts past the router's cursor once; after a restart it sends only new ones; a refused receipt is set aside")
        func noticesOnceAcrossRestarts() async throws {
            let chain = try InProcessChain(validators: 1, running: 1)
            do { try await run(chain) } catch {
                await chain.stop()
                throw error
            }
            await chain.stop()
        }

        func run(_ chain: InProcessChain) async throws {
            let client = ChainClient(baseURL: chain.url())
            try await Harness.eventually(timeout: .seconds(20), "the validator commits") {
                (try await Harness.request(.GET, chain.url() + "/status", timeout: .seconds(1)).json?["height"] as? Int ?? 0) >= 1
            }
            let funded = try chain.funded
            let router = SigningKey(), node = SigningKey()
            let enrollment = NodeEnrollment(client: client, owner: funded)
            let routerStake = LedgerParameters.standard.staking.router, computeStake = LedgerParameters.standard.staking.compute
            try await enrollment.enroll(node: router, role: .router, stake: routerStake.minimumStake, lockDays: routerStake.minimumLockDays,
                                        endpoints: ["127.0.0.1:9"])
            try await enrollment.enroll(node: node, role: .compute, stake: computeStake.minimumStake, lockDays: computeStake.minimumLockDays,
                                        endpoints: [])
            try await enrollment.ensurePrices(node: node.publicKey, prices: PriceList(entries: [
                PriceEntry(name: "*", perMillionPromptTokens: Amount(baseUnits: 1_000_000), perMillionCompletionTokens: Amount(baseUnits: 100_000_000)),
            ]))
            _ = try await enrollment.ensureEscrow(router: router.publicKey, amount: Amount(emc: 10))
            let payer = Account(owner: funded.publicKey)

            // The node's outbox, as the tunnel leaves it: receipts acknowledged with the router's countersignature.
            let outbox = try ReceiptOutbox(path: Harness.temporaryDirectory("notice-outbox") + "/outbox.sqlite")
            let prices = UnitPrices(perMillionPromptTokens: 1_000_000, perMillionCompletionTokens: 100_000_000, perItem: 0)
            func keep(_ sequence: UInt64, payer: Account, completion: UInt64 = 10) async throws {
                let body = ReceiptBody(payer: payer, router: router.publicKey, node: node.publicKey, sequence: sequence, attempt: 0,
                                       app: "llm", model: "m", prices: prices, units: WorkUnits(promptTokens: 5, completionTokens: completion),
                                       startedAtMillis: 1, endedAtMillis: 2, requestHash: Hash32.of(Array("\(sequence)".utf8)),
                                       responseHash: Hash32.of([3]), status: 200)
                let signed = Receipt(signing: body, with: node)
                var countersigned = signed
                try countersigned.countersign(nodeKey: node.publicKey, routerKey: router)
                await outbox.add(signed)
                #expect(await outbox.acknowledge(signed.id, routerSignature: try #require(countersigned.routerSignature)) != nil)
            }
            try await keep(1, payer: payer)
            try await keep(2, payer: payer)
            try await keep(3, payer: payer, completion: 0)  // worth 5 base units of prompt: still noticed
            try await keep(4, payer: Account(owner: SigningKey().publicKey))  // a payer without escrow: refused
            let logger = Logger(label: "test.notices")
            func service() -> ReceiptNoticeService {
                ReceiptNoticeService(client: client, nodeKey: node, outbox: outbox, routers: [router.publicKey], logger: logger, graceBlocks: 0)
            }
            func noticed() async throws -> [String] {
                try await client.notices(router: router.publicKey, node: node.publicKey).map { "\($0["sequence"] ?? "")" }.sorted()
            }

            var state = ReceiptNoticeService.State()
            await service().tick(&state)
            #expect(try await noticed() == ["1", "2", "3"])
            #expect(state.done.count == 4, "the three noticed and the refused one are done")
            // Nothing more to send: another round changes nothing.
            await service().tick(&state)
            #expect(try await noticed() == ["1", "2", "3"])

            // A restart: a fresh service reads what the chain holds and sends only the new receipt.
            try await keep(5, payer: payer)
            var restarted = ReceiptNoticeService.State()
            let balanceBefore = try await client.get("/accounts/\(payer.description)/balance")["balance_base_units"] as? NSNumber
            await service().tick(&restarted)
            #expect(try await noticed() == ["1", "2", "3", "5"])
            let balanceAfter = try await client.get("/accounts/\(payer.description)/balance")["balance_base_units"] as? NSNumber
            // One notice fee (the new receipt's own transaction) plus the payer-without-escrow one tried again once.
            let fee = LedgerParameters.standard.transferFee.baseUnits
            #expect(balanceBefore.map { $0.uint64Value - fee } == balanceAfter?.uint64Value, "exactly one notice was paid for after the restart")
            let notices = try await client.notices(router: router.publicKey)
            #expect(notices.allSatisfy { $0["status"] as? String == "open" && ($0["charged_base_units"] as? NSNumber)?.uint64Value
                                            == ($0["amount_base_units"] as? NSNumber)?.uint64Value })
            #expect(try await client.settlementCursor(router: router.publicKey).nextSequence == 1)
        }
    }
}
