import EdgeMatrixCore
import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The engine's durable state at one height: enough to keep its locks across a crash. Values are referred to by
/// hash; the valid value's bytes are in a `.value` record written before the first snapshot that names it (the lock
/// needs only the hash).
public struct ConsensusSnapshot: Hashable, Sendable, CanonicalCodable {
    public var height: Height
    public var round: Round
    public var step: ConsensusStep
    public var lockedRound: Round?
    public var lockedValue: Hash32?
    public var validRound: Round?
    public var validValue: Hash32?

    public func encode(to writer: inout ByteWriter) {
        writer.write(height)
        writer.write(round)
        writer.write(step.rawValue)
        writer.write(lockedRound != nil)
        if let lockedRound { writer.write(lockedRound) }
        writer.write(lockedValue != nil)
        if let lockedValue { lockedValue.encode(to: &writer) }
        writer.write(validRound != nil)
        if let validRound { writer.write(validRound) }
        writer.write(validValue != nil)
        if let validValue { validValue.encode(to: &writer) }
    }

    public init(height: Height, round: Round, step: ConsensusStep, lockedRound: Round?, lockedValue: Hash32?,
                validRound: Round?, validValue: Hash32?) {
        self.height = height
        self.round = round
        self.step = step
        self.lockedRound = lockedRound
        self.lockedValue = lockedValue
        self.validRound = validRound
        self.validValue = validValue
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        height = try reader.readUInt64()
        round = try reader.readUInt32()
        let rawStep = try reader.readUInt8()
        guard let step = ConsensusStep(rawValue: rawStep) else { throw .invalidValue("step \(rawStep)") }
        self.step = step
        lockedRound = try reader.readBool() ? try reader.readUInt32() : nil
        lockedValue = try reader.readBool() ? try Hash32(from: &reader) : nil
        validRound = try reader.readBool() ? try reader.readUInt32() : nil
        validValue = try reader.readBool() ? try Hash32(from: &reader) : nil
    }
}

/// One write-ahead-log entry. The engine emits them as `.persist` actions; the host must make them durable
/// before carrying out any later action of the same batch (above all, before sending a signed message).
public enum WALRecord: Hashable, Sendable, CanonicalCodable, CustomStringConvertible {
    case state(ConsensusSnapshot)
    /// The bytes of the value a later snapshot remembers as valid (to re-propose it after a restart).
    case value(height: Height, bytes: [UInt8])
    /// A message this node signed. Replayed, these are the double-sign guard.
    case signed(ConsensusMessage)

    public var height: Height {
        switch self {
        case .state(let s): s.height
        case .value(let height, _): height
        case .signed(let m): m.height
        }
    }

    public func encode(to writer: inout ByteWriter) {
        switch self {
        case .state(let s): writer.write(UInt8(1)); s.encode(to: &writer)
        case .value(let height, let bytes): writer.write(UInt8(2)); writer.write(height); writer.write(bytes: bytes)
        case .signed(let m): writer.write(UInt8(3)); m.encode(to: &writer)
        }
    }

    public init(from reader: inout ByteReader) throws(DecodingError) {
        switch try reader.readUInt8() {
        case 1: self = .state(try ConsensusSnapshot(from: &reader))
        case 2: self = .value(height: try reader.readUInt64(), bytes: try reader.readBytes())
        case 3: self = .signed(try ConsensusMessage(from: &reader))
        case let tag: throw .invalidValue("WAL record tag \(tag)")
        }
    }

    public var description: String {
        switch self {
        case .state(let s): "state(\(s.height)/\(s.round) \(s.step))"
        case .value(let h, let bytes): "value(\(h) \(Hash32.of(bytes).hex.prefix(8)))"
        case .signed(let m): "signed(\(m))"
        }
    }
}

/// Where the engine's records go. `append` returns only once the records are durable.
public protocol ConsensusWAL: AnyObject, Sendable {
    func append(_ records: [WALRecord]) throws(ConsensusError)
    /// All records in append order.
    func replay() throws(ConsensusError) -> [WALRecord]
    /// Drops records of heights below `height` (call once the block before `height` is durably committed).
    func prune(below height: Height) throws(ConsensusError)
}

/// A WAL in memory: for tests and for the simulation, where "disk" survives a simulated crash.
public final class InMemoryWAL: ConsensusWAL, @unchecked Sendable {
    private let lock = NSLock()
    private var records: [WALRecord] = []

    public init(records: [WALRecord] = []) { self.records = records }

    public func append(_ newRecords: [WALRecord]) {
        lock.withLock { records.append(contentsOf: newRecords) }
    }

    public func replay() -> [WALRecord] { lock.withLock { records } }

    public func prune(below height: Height) {
        lock.withLock { records.removeAll { $0.height < height } }
    }
}

/// An append-only file: each record is framed as `u32 length || u32 CRC-32 || payload` (big-endian) and
/// every `append` ends with fsync. A torn last frame (crash mid-write) is cut off on open; a bad frame with
/// more data after it is corruption and is reported, never skipped, because skipping could forget a vote.
public final class FileWAL: ConsensusWAL, @unchecked Sendable {
    public static let maxRecordLength = 64 << 20

    public let path: String
    private let lock = NSLock()
    private var fd: Int32

    /// Opens (creating if needed) the log at `path`, repairing a torn tail.
    public init(path: String) throws(ConsensusError) {
        self.path = path
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .walIO("cannot open \(path): \(String(cString: strerror(errno)))") }
        do throws(ConsensusError) {
            let bytes = try Self.readAll(fd: fd, path: path)
            var (_, goodLength) = try Self.parse(bytes)
            if goodLength < Self.magic.count {
                // New (or with its magic cut short): start it with the magic.
                guard ftruncate(fd, 0) == 0, lseek(fd, 0, SEEK_SET) == 0 else { throw ConsensusError.walIO("cannot reset \(path)") }
                try Self.writeAll(fd: fd, Self.magic, path: path)
                guard fsync(fd) == 0 else { throw ConsensusError.walIO("fsync \(path) failed") }
                goodLength = Self.magic.count
            } else if goodLength < bytes.count {
                guard ftruncate(fd, off_t(goodLength)) == 0, fsync(fd) == 0 else {
                    throw ConsensusError.walIO("cannot cut torn tail of \(path): \(String(cString: strerror(errno)))")
                }
            }
            guard lseek(fd, 0, SEEK_END) >= 0 else { throw ConsensusError.walIO("seek failed on \(path)") }
        } catch {
            close(fd)
            throw error
        }
    }

    deinit { close(fd) }

    private func locked<T>(_ body: () throws(ConsensusError) -> T) throws(ConsensusError) -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }

    public func append(_ records: [WALRecord]) throws(ConsensusError) {
        guard !records.isEmpty else { return }
        var buffer = [UInt8]()
        for record in records { buffer += Self.frame(record.canonicalBytes) }
        try locked { () throws(ConsensusError) in
            try Self.writeAll(fd: fd, buffer, path: path)
            guard fsync(fd) == 0 else { throw .walIO("fsync \(path): \(String(cString: strerror(errno)))") }
        }
    }

    public func replay() throws(ConsensusError) -> [WALRecord] {
        try locked { () throws(ConsensusError) in
            try Self.parse(try Self.readAll(fd: fd, path: path)).records
        }
    }

    /// Rewrites the log without old heights: write a new file, fsync, rename over the old one.
    public func prune(below height: Height) throws(ConsensusError) {
        try locked { () throws(ConsensusError) in
            let kept = try Self.parse(try Self.readAll(fd: fd, path: path)).records.filter { $0.height >= height }
            let tmp = path + ".tmp"
            let newFD = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard newFD >= 0 else { throw .walIO("cannot create \(tmp): \(String(cString: strerror(errno)))") }
            var buffer = Self.magic
            for record in kept { buffer += Self.frame(record.canonicalBytes) }
            do throws(ConsensusError) {
                try Self.writeAll(fd: newFD, buffer, path: tmp)
                guard fsync(newFD) == 0 else { throw ConsensusError.walIO("fsync \(tmp) failed") }
                guard rename(tmp, path) == 0 else {
                    throw ConsensusError.walIO("rename \(tmp): \(String(cString: strerror(errno)))")
                }
            } catch {
                close(newFD)
                throw error
            }
            Self.syncDirectory(of: path)
            close(fd)
            fd = newFD
            _ = lseek(fd, 0, SEEK_END)
        }
    }

    // MARK: Framing
    //
    // File: the magic "EMCWAL2\n", then frames. Frame: payload length (u32 BE), CRC-32 of those 4 length bytes,
    // CRC-32 of the payload, payload. The header's own checksum tells a torn tail (the file ends inside the last
    // frame, whose header is intact or itself cut short) from corruption (a damaged header or payload with data
    // after it). A torn tail is cut; corruption stops the node, since skipping a record could forget a signed vote.

    public static let magic: [UInt8] = Array("EMCWAL2\n".utf8)
    public static let headerLength = 12

    static func frame(_ payload: [UInt8]) -> [UInt8] {
        var writer = ByteWriter(capacity: payload.count + headerLength)
        writer.write(UInt32(truncatingIfNeeded: payload.count))
        let lengthBytes = writer.bytes
        writer.write(CRC32.checksum(lengthBytes))
        writer.write(CRC32.checksum(payload))
        writer.writeRaw(payload)
        return writer.bytes
    }

    private static func readUInt32(_ bytes: [UInt8], at offset: Int) -> UInt32 {
        UInt32(bytes[offset]) << 24 | UInt32(bytes[offset + 1]) << 16 | UInt32(bytes[offset + 2]) << 8 | UInt32(bytes[offset + 3])
    }

    /// The records, and how many leading bytes are good (the rest is a torn tail to cut). An empty file is a new WAL.
    static func parse(_ bytes: [UInt8]) throws(ConsensusError) -> (records: [WALRecord], goodLength: Int) {
        guard !bytes.isEmpty else { return ([], 0) }
        guard bytes.count >= magic.count || !magic.starts(with: bytes) else { return ([], 0) }  // magic itself torn
        guard bytes.starts(with: magic) else {
            throw .walCorrupted(offset: 0, reason: "not a version-2 consensus WAL (no \"EMCWAL2\" header): it is from an older "
                                + "build or damaged. Keep it for inspection; start afresh only if this validator has not "
                                + "signed anything at the current height")
        }
        var records = [WALRecord]()
        var offset = magic.count
        while offset < bytes.count {
            let remaining = bytes.count - offset
            guard remaining >= headerLength else { break }  // the last header, cut short
            let lengthBytes = Array(bytes[offset..<(offset + 4)])
            guard CRC32.checksum(lengthBytes) == readUInt32(bytes, at: offset + 4) else {
                // A crash can leave a zero-filled extension of the file: that is a tail that was never written.
                if bytes[offset...].allSatisfy({ $0 == 0 }) { break }
                throw .walCorrupted(offset: UInt64(offset), reason: "frame header checksum mismatch with \(remaining) bytes from here on")
            }
            let length = Int(readUInt32(bytes, at: offset))
            guard length <= maxRecordLength else {
                throw .walCorrupted(offset: UInt64(offset), reason: "record length \(length) exceeds the limit \(maxRecordLength)")
            }
            guard length <= remaining - headerLength else { break }  // the last payload, cut short
            let end = offset + headerLength + length
            let payload = Array(bytes[(offset + headerLength)..<end])
            guard CRC32.checksum(payload) == readUInt32(bytes, at: offset + 8) else {
                if end == bytes.count { break }  // the last frame, half written
                throw .walCorrupted(offset: UInt64(offset), reason: "checksum mismatch with \(bytes.count - end) bytes after it")
            }
            do { records.append(try WALRecord(canonicalBytes: payload)) } catch {
                throw .walCorrupted(offset: UInt64(offset), reason: error.description)
            }
            offset = end
        }
        return (records, offset)
    }

    // MARK: POSIX helpers

    private static func readAll(fd: Int32, path: String) throws(ConsensusError) -> [UInt8] {
        let size = lseek(fd, 0, SEEK_END)
        guard size >= 0 else { throw .walIO("cannot size \(path)") }
        var bytes = [UInt8](repeating: 0, count: Int(size))
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, $0.count - done, off_t(done)) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { throw .walIO("read \(path): \(String(cString: strerror(errno)))") }
            done += n
        }
        _ = lseek(fd, 0, SEEK_END)
        return bytes
    }

    private static func writeAll(fd: Int32, _ buffer: [UInt8], path: String) throws(ConsensusError) {
        var done = 0
        while done < buffer.count {
            let n = buffer.withUnsafeBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { throw .walIO("write \(path): \(String(cString: strerror(errno)))") }
            done += n
        }
    }

    private static func syncDirectory(of path: String) {
        let dir = (path as NSString).deletingLastPathComponent
        let dirFD = open(dir.isEmpty ? "." : dir, O_RDONLY | O_CLOEXEC)
        if dirFD >= 0 { _ = fsync(dirFD); close(dirFD) }
    }
}

/// CRC-32 (IEEE 802.3), for WAL frame checksums.
enum CRC32 {
    static let table: [UInt32] = (0..<256).map { i in
        var c = UInt32(i)
        for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }

    static func checksum(_ bytes: [UInt8]) -> UInt32 {
        var c: UInt32 = 0xFFFF_FFFF
        for b in bytes { c = table[Int((c ^ UInt32(b)) & 0xFF)] ^ (c >> 8) }
        return c ^ 0xFFFF_FFFF
    }
}
