import Synchronization

/// A single-consumer queue bounded in messages and bytes, with backpressure on the producer: what sits between a
/// tunnel stream and whatever feeds or drains it, so a fast side never grows memory while a slow side catches up.
/// Messages buffered before the end are still delivered, then the end (or its error).
public final class BoundedChannel<Element: Sendable>: Sendable {
    private struct State {
        var buffer: [Element] = []
        var bufferedBytes = 0
        /// Set once: nil while open, `.success` for a clean end, `.failure` for an error.
        var end: Result<Void, any Error>?
        var consumer: CheckedContinuation<Element?, any Error>?
        var producer: CheckedContinuation<Bool, Never>?
    }

    public let maxMessages: Int
    public let maxBytes: Int
    private let size: @Sendable (Element) -> Int
    private let state = Mutex(State())

    public init(maxMessages: Int, maxBytes: Int, size: @escaping @Sendable (Element) -> Int) {
        self.maxMessages = max(1, maxMessages)
        self.maxBytes = maxBytes
        self.size = size
    }

    /// An empty buffer always takes one message, however large (the transport has already bounded its size).
    private func hasRoom(_ state: State, for size: Int) -> Bool {
        state.buffer.isEmpty || (state.buffer.count < maxMessages && state.bufferedBytes + size <= maxBytes)
    }

    /// Appends a message, waiting while the buffer is full. Returns false if the channel has ended (the consumer
    /// went away or the job failed): the message was dropped. Cancelling the waiting task ends the channel.
    @discardableResult
    public func send(_ message: Element) async -> Bool {
        let size = size(message)
        while true {
            let delivered: Bool? = state.withLock { state in
                if state.end != nil { return false }
                if let consumer = state.consumer {
                    state.consumer = nil
                    consumer.resume(returning: message)
                    return true
                }
                guard hasRoom(state, for: size) else { return nil }
                state.buffer.append(message)
                state.bufferedBytes += size
                return true
            }
            if let delivered { return delivered }
            let open = await withTaskCancellationHandler {
                await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
                    state.withLock { state in
                        if state.end != nil { return continuation.resume(returning: false) }
                        if hasRoom(state, for: size) { return continuation.resume(returning: true) }
                        state.producer = continuation
                    }
                }
            } onCancel: {
                finish(throwing: CancellationError())
            }
            if !open { return false }
        }
    }

    /// Ends the channel; the first end wins.
    public func finish(throwing error: (any Error)? = nil) {
        state.withLock { state in
            guard state.end == nil else { return }
            state.end = error.map { .failure($0) } ?? .success(())
            state.producer?.resume(returning: false)
            state.producer = nil
            if let consumer = state.consumer {
                state.consumer = nil
                if let error { consumer.resume(throwing: error) } else { consumer.resume(returning: nil) }
            }
        }
    }

    /// The next message; nil after a clean end. Cancelling the waiting task ends the channel.
    public func next() async throws -> Element? {
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Element?, any Error>) in
                state.withLock { state in
                    if !state.buffer.isEmpty {
                        let message = state.buffer.removeFirst()
                        state.bufferedBytes -= size(message)
                        state.producer?.resume(returning: true)
                        state.producer = nil
                        return continuation.resume(returning: message)
                    }
                    switch state.end {
                    case .success?: continuation.resume(returning: nil)
                    case .failure(let error)?: continuation.resume(throwing: error)
                    case nil: state.consumer = continuation
                    }
                }
            }
        } onCancel: {
            finish(throwing: CancellationError())
        }
    }
}

extension NodeWorkMessage {
    /// What a message weighs in a `BoundedChannel`: its payload for chunks, a small constant otherwise.
    @Sendable public static func bufferedSize(_ message: NodeWorkMessage) -> Int {
        if case .chunk(let bytes) = message { return bytes.count }
        return 64
    }
}
