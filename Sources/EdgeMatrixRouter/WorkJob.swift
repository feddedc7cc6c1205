import EdgeMatrixCore
import EdgeMatrixNetwork

/// Why a node could not (or could no longer) serve an assigned request.
public enum NodeFailure: Error, Equatable, Sendable, CustomStringConvertible {
    case disconnected
    case firstByteTimeout
    case rejected(code: String, message: String)
    /// The node broke the protocol (bad status, out-of-order message...); it has been disconnected.
    case misbehaved(kind: String, detail: String)

    public var description: String {
        switch self {
        case .disconnected: "the compute node disconnected"
        case .firstByteTimeout: "the compute node did not start answering in time"
        case .rejected(let code, let message): "the compute node could not serve the request (\(code)): \(message)"
        case .misbehaved(let kind, let detail): "the compute node broke the tunnel protocol (\(kind)): \(detail)"
        }
    }
}

/// One request assigned to one compute node's Work stream. The gateway reads `responses`; the tunnel endpoint
/// feeds them from the stream and carries `commands` (cancel, receipt acknowledgement) back to the node.
public final class WorkJob: Sendable {
    public let request: WorkRequest
    public let nodeID: NodeID
    /// Bounded: the tunnel endpoint stops reading the node's stream (HTTP/2 flow control then stops the node)
    /// while the HTTP client has not taken what came before.
    public let responses: ResponseChannel
    let commands: AsyncStream<RouterWorkMessage>
    let commandSink: AsyncStream<RouterWorkMessage>.Continuation
    /// Ends once the tunnel is done with the job: its receipt handled (stored or not), or the attempt over without one.
    let handled: AsyncStream<Never>
    let handledSink: AsyncStream<Never>.Continuation

    init(request: WorkRequest, nodeID: NodeID) {
        self.request = request
        self.nodeID = nodeID
        responses = ResponseChannel()
        // At most a cancel and a receipt acknowledgement are ever sent, so this buffer stays tiny.
        (commands, commandSink) = AsyncStream.makeStream(bufferingPolicy: .bufferingOldest(8))
        (handled, handledSink) = AsyncStream.makeStream()
    }

    /// Returns once the tunnel is done with the job (after its receipt, if any, is stored).
    public func untilHandled() async {
        for await _ in handled {}
    }

    /// The client went away or another node was chosen: tell the node to stop.
    public func cancel() {
        commandSink.yield(.cancel)
        commandSink.finish()
    }

    func fail(_ failure: NodeFailure) { responses.finish(throwing: failure) }
}

/// One answer's messages between the tunnel reader and the HTTP writer: bounded, with backpressure.
public typealias ResponseChannel = BoundedChannel<NodeWorkMessage>

extension BoundedChannel where Element == NodeWorkMessage {
    static var maxBufferedMessages: Int { 64 }
    static var maxBufferedBytes: Int { 1 << 20 }

    convenience init() {
        self.init(maxMessages: Self.maxBufferedMessages, maxBytes: Self.maxBufferedBytes, size: NodeWorkMessage.bufferedSize)
    }
}
