#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Milliseconds since the Unix epoch by this machine's clock: what nodes stamp on blocks, transactions, receipts
/// and bindings. Never used inside the ledger, which takes time only from the block. A clock set before 1970
/// reads as 0 rather than trapping.
public func wallClockMillis() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return UInt64(clamping: ts.tv_sec) * 1000 + UInt64(clamping: ts.tv_nsec) / 1_000_000
}
