import EdgeMatrixCore
import EdgeMatrixRouter
import Foundation
import Synchronization

/// The escrows that payers hold with one router, as the router last read them from the chain
/// (`GET /escrows?router=`): what each payer has available to charge. Read again on every block by the
/// `RegistryFollower`; while the chain is unreachable the last reading holds.
public final class ChainEscrows: EscrowView {
    public let router: PublicKey
    /// A router serves at most this many escrows in its view (bounded memory); the chain caps their total value.
    public static let maxEscrows = 1_000_000
    private let state = Mutex<[Account: UInt64]?>(nil)

    public init(router: PublicKey) { self.router = router }

    public func available(payer: Account) -> UInt64? {
        state.withLock { escrows in escrows.map { $0[payer] ?? 0 } }
    }

    /// Replaces the view with one `/escrows` answer. An entry that does not parse is left out (counts as 0).
    public func update(_ answer: [[String: Any]]) {
        var escrows = [Account: UInt64]()
        for entry in answer.prefix(Self.maxEscrows) {
            guard let text = entry["account"] as? String, let account = try? Account(text: text),
                  let available = (entry["available_base_units"] as? NSNumber)?.uint64Value else { continue }
            escrows[account] = available
        }
        state.withLock { $0 = escrows }
    }
}
