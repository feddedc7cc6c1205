import EdgeMatrixNetwork
import Foundation

/// What this machine has: CPU cores, RAM, and NVIDIA GPUs when `nvidia-smi` is present.
public enum HardwareProbe {
    public static func probe() -> HardwareInfo {
        HardwareInfo(cpuCores: UInt32(ProcessInfo.processInfo.activeProcessorCount),
                     memoryMiB: ProcessInfo.processInfo.physicalMemory / (1 << 20),
                     gpus: nvidiaGPUs())
    }

    static func nvidiaGPUs() -> [GPUInfo] {
        let candidates = ["/usr/bin/nvidia-smi", "/usr/local/bin/nvidia-smi"]
        guard let path = candidates.first(where: FileManager.default.isExecutableFile(atPath:)) else { return [] }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = ["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = FileHandle.nullDevice
        guard (try? process.run()) != nil else { return [] }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { return [] }
        return parseNvidiaSMI(String(decoding: data, as: UTF8.self))
    }

    /// Parses `name, memory MiB` lines.
    public static func parseNvidiaSMI(_ text: String) -> [GPUInfo] {
        text.split(separator: "\n").compactMap { line in
            let parts = line.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
            guard parts.count == 2, let memory = UInt64(parts[1]) else { return nil }
            return GPUInfo(name: parts[0], memoryMiB: memory)
        }
    }
}
