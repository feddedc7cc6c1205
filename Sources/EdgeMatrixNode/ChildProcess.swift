import Foundation
import Logging
import ServiceLifecycle

public enum ChildProcessError: Error, CustomStringConvertible, Sendable {
    case cannotStart(name: String, reason: String)
    case exited(name: String, status: Int32, log: String)

    public var description: String {
        switch self {
        case .cannotStart(let name, let reason): "cannot start \(name): \(reason)"
        case .exited(let name, let status, let log): "\(name) exited with status \(status); see \(log)"
        }
    }
}

/// A program the node runs beside itself (a local model server), tied to the service group's lifetime:
/// started with it, terminated on graceful shutdown, and an unexpected exit is an error.
public struct ChildProcess: Service {
    public let name: String
    public let executable: String
    public let arguments: [String]
    public let environment: [String: String]
    public let logPath: String
    let logger: Logger

    public init(name: String, executable: String, arguments: [String], environment: [String: String] = [:], logPath: String,
                logger: Logger) {
        self.name = name
        self.executable = executable
        self.arguments = arguments
        self.environment = environment
        self.logPath = logPath
        self.logger = logger
    }

    public func run() async throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        FileManager.default.createFile(atPath: logPath, contents: nil)
        guard let log = FileHandle(forWritingAtPath: logPath) else {
            throw ChildProcessError.cannotStart(name: name, reason: "cannot write log \(logPath)")
        }
        log.seekToEndOfFile()
        process.standardOutput = log
        process.standardError = log
        let (exits, exitSink) = AsyncStream<Int32>.makeStream()
        process.terminationHandler = { exitSink.yield($0.terminationStatus); exitSink.finish() }
        do { try process.run() } catch {
            throw ChildProcessError.cannotStart(name: name, reason: "\(error)")
        }
        logger.info("started \(name)", metadata: ["pid": "\(process.processIdentifier)", "log": "\(logPath)"])
        let stopping = StopFlag()
        let status = await withGracefulShutdownHandler {
            await withTaskCancellationHandler {
                var iterator = exits.makeAsyncIterator()
                return await iterator.next() ?? -1
            } onCancel: {
                stopping.set()
                process.terminate()
            }
        } onGracefulShutdown: {
            stopping.set()
            process.terminate()
        }
        try? log.close()
        if !stopping.isSet {
            throw ChildProcessError.exited(name: name, status: status, log: logPath)
        }
        logger.info("stopped \(name)")
    }
}

import Synchronization

final class StopFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    func set() { flag.store(true, ordering: .relaxed) }
    var isSet: Bool { flag.load(ordering: .relaxed) }
}
