import EdgeMatrixClient
import Testing

/// The client's SSE parser, fed by a server it does not control.
@Suite("Client SSE parser")
struct ClientBoundsTests {
    @Test("events split across chunks are reassembled, with LF or CR LF endings")
    func reassembles() throws {
        var parser = ServerSentEvents()
        #expect(try parser.feed(Array("data: {\"a\":".utf8)).isEmpty)
        #expect(try parser.feed(Array("1}\n".utf8)).isEmpty)
        #expect(try parser.feed(Array("\ndata: [DONE]\r\n".utf8)) == ["{\"a\":1}"])
        #expect(try parser.feed(Array("\r\n".utf8)) == ["[DONE]"])
    }

    // Bug caught: a server that never ends an event grew the client's buffer without limit (and rescanned it all).
    @Test("an event that never ends is refused past 8 MiB")
    func endlessEventRefused() throws {
        var parser = ServerSentEvents()
        let chunk = [UInt8](repeating: UInt8(ascii: "x"), count: 1 << 20)
        for _ in 0..<8 { _ = try parser.feed(chunk) }
        #expect(throws: ClientError.streamError(code: "event_too_large", message: "a server-sent event exceeds \(8 << 20) bytes")) {
            try parser.feed(chunk)
        }
    }
}
