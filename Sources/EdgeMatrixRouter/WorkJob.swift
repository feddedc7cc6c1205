import EdgeMatrixCore
import EdgeMatrixNetwork

/// Why a node could not (or could no longer) serve an assigned request.
public enum NodeFailure: Error, Equatable, Sendable, CustomStringConvertible {
    case disconnected
    case firstByteTimeout
    case rejected(code: String, message: String)

    public var description: String {
        switch self {
        case .disconnected: "the compute node disconnected"
        case .firstByteTimeout: "the compute node did not start answering in time"
        case .rejected(let code, let message): "the compute node could not serve the request (\(code)): \(message)"
        }
    }
}

/// One request assigned to one compute node's Work stream. The gateway reads `responses`; the tunnel endpoint
/// feeds them from the stream and carries `commands` (cancel, receipt acknowledgement) back to the node.
public final class WorkJob: Sendable {
    public let request: WorkRequest
    public let nodeID: NodeID
    public let responses: AsyncThrowingStream<NodeWorkMessage, any Error>
    let responseSink: AsyncThrowingStream<NodeWorkMessage, any Error>.Continuation
    let commands: AsyncStream<RouterWorkMessage>
    let commandSink: AsyncStream<RouterWorkMessage>.Continuation

    init(request: WorkRequest, nodeID: NodeID) {
        self.request = request
        self.nodeID = nodeID
        (responses, responseSink) = AsyncThrowingStream.makeStream()
        (commands, commandSink) = AsyncStream.makeStream()
    }

    /// The client went away or another node was chosen: tell the node to stop.
    public func cancel() {
        commandSink.yield(.cancel)
        commandSink.finish()
    }

    func fail(_ failure: NodeFailure) { responseSink.finish(throwing: failure) }
}
