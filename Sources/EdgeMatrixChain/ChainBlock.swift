import EdgeMatrixApplication
import EdgeMatrixCore
import EdgeMatrixLedger

/// Errors of the validator node, with what to do about them.
public enum ChainError: Error, CustomStringConvertible, Sendable {
    case genesis(String)
    case storage(String)
    case wal(String)
    case corruptBlock(height: UInt64, reason: String)
    case replayMismatch(height: UInt64, stored: Hash32, computed: Hash32)

    public var description: String {
        switch self {
        case .genesis(let why): "genesis: \(why)"
        case .storage(let why): "block store: \(why)"
        case .wal(let why): "consensus WAL: \(why); the node stops so that it can never sign two conflicting votes"
        case .corruptBlock(let height, let reason): "stored block \(height) is unreadable: \(reason)"
        case .replayMismatch(let height, let stored, let computed):
            "replaying block \(height) gives state root \(computed.hex), but \(stored.hex) was stored: the data dir is from another chain or build"
        }
    }
}

/// Stable snake_case code for a ledger error (API and CLI).
func errorCode(_ error: LedgerError) -> String {
    switch error {
    case .tooOld: return "too_old"
    case .badSignature: return "bad_signature"
    case .badNodeSignature: return "bad_node_signature"
    case .registrationOwnerMismatch: return "registration_owner_mismatch"
    default:
        let label = Mirror(reflecting: error).children.first?.label ?? "generic_error"
        var out = ""
        for ch in label {
            if ch.isUppercase { out += "_" + ch.lowercased() } else { out.append(ch) }
        }
        return out
    }
}


#if canImport(Glibc)
import Glibc
#endif
