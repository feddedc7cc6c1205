import EdgeMatrixApplication
import EdgeMatrixConsensus
import EdgeMatrixCore
import EdgeMatrixLedger
import EdgeMatrixNetwork
import Foundation
import PropertyBased
import Testing

/// Every decoder of bytes that arrive from a client, a compute node or a peer, under random and mutated input.
///
/// Two properties for each: decoding never traps (the test process would die), and whatever decodes is canonical:
/// encoding the decoded value gives back exactly the input bytes. A decoder that accepted two encodings of one value
/// would let a relayer change the bytes (and a transaction's id, a block's hash) without changing what they mean.
///
/// Protobuf messages (the gRPC framing of proto/) are not canonical, and nothing signed is ever their encoding. For
/// them: decoding never traps, valid samples round-trip, and whatever decodes re-encodes to a stable form (decoding
/// the re-encoding and encoding again gives the same bytes).
@Suite("Wire decoders under random and mutated input")
struct DecoderPropertyTests {
    /// A decoder under test: its valid samples and its decode/encode pair.
    struct Codec: Sendable, CustomStringConvertible {
        let name: String
        let samples: [[UInt8]]
        var isCanonical = true
        let reencode: @Sendable ([UInt8]) throws -> [UInt8]
        var description: String { name }

        static func canonical<T: CanonicalCodable>(_ type: T.Type, _ samples: [T]) -> Codec {
            Codec(name: "\(T.self)", samples: samples.map(\.canonicalBytes)) { try T(canonicalBytes: $0).canonicalBytes }
        }

        static func protobuf<T: ProtobufWireMessage>(_ type: T.Type, _ samples: [T]) -> Codec {
            Codec(name: "\(T.self) (protobuf)", samples: samples.map { try! $0.protobufBytes() }, isCanonical: false) {
                try T(protobufBytes: $0).protobufBytes()
            }
        }

        /// The property for input that decoded to `again`: canonical codecs give back the input; protobuf ones a
        /// stable re-encoding.
        func check(_ input: [UInt8], decodedTo again: [UInt8]) {
            if isCanonical { #expect(again == input) } else { #expect((try? reencode(again)) == again, "\(name): unstable re-encoding") }
        }
    }

    static let key = SigningKey()
    static let other = SigningKey()

    static let codecs: [Codec] = {
        let body = TransactionBody(chainID: "emc-test", createdAtMillis: 1_700_000_000_000,
                                   kind: .transfer(Transfer(to: Account(owner: other.publicKey), amount: Amount(emc: 5), memo: [1, 2])))
        let transfer = Transaction(signing: body, with: key)
        let bond = Transaction(signing: TransactionBody(chainID: "emc-test", createdAtMillis: 9,
                                                        kind: .bond(Bond(role: .compute, amount: Amount(emc: 1_000), lockDays: 30))), with: key)
        let statement = NodeRegistrationStatement(chainID: "emc-test", owner: key.publicKey, nodeKey: other.publicKey, role: .router,
                                                  endpoints: ["127.0.0.1:7070", "https://r.example:443"], stakeID: 3)
        let register = Transaction(signing: TransactionBody(chainID: "emc-test", createdAtMillis: 9,
                                                            kind: .registerNode(NodeRegistration(statement: statement, nodeKey: other))), with: key)
        let vote = SignedVote(signing: VoteBody(chainID: "emc-test", type: .precommit, height: 7, round: 2, value: Hash32.of([7]),
                                                validator: key.nodeID), with: key)
        let nilVote = SignedVote(signing: VoteBody(chainID: "emc-test", type: .prevote, height: 7, round: 2, value: nil,
                                                   validator: key.nodeID), with: key)
        let proposal = SignedProposal(signing: ProposalBody(chainID: "emc-test", height: 7, round: 0, validRound: nil, value: Hash32.of([1]),
                                                            proposer: key.nodeID), value: [1], with: key)
        let evidence = try! DuplicateVoteEvidence(vote, SignedVote(signing: VoteBody(chainID: "emc-test", type: .precommit, height: 7, round: 2,
                                                                                    value: Hash32.of([8]), validator: key.nodeID), with: key))
        let block = ChainBlock(height: 7, timeMillis: 123, proposer: key.nodeID, transactions: [transfer.encoded, bond.encoded, []],
                               evidence: [evidence])
        let set = try! ValidatorSet([(publicKey: key.publicKey, votingPower: 10), (publicKey: other.publicKey, votingPower: 3)])
        let receipt = ReceiptBody(requestID: "r-1", nodeID: key.nodeID, routerID: other.nodeID, app: "llm", model: "m",
                                  requestHash: Hash32.of([1]), responseHash: Hash32.of([2]),
                                  units: WorkUnits(promptTokens: 3, completionTokens: 4, items: 0),
                                  startedAtMillis: 1, endedAtMillis: 2, status: 200)
        return [
            Codec(name: "Transaction", samples: [transfer.encoded, bond.encoded, register.encoded]) {
                try Transaction(decoding: $0).encoded
            },
            .canonical(TransactionBody.self, [body]),
            .canonical(NodeRegistrationStatement.self, [statement]),
            .canonical(ChainBlock.self, [block]),
            .canonical(ConsensusMessage.self, [.vote(vote), .vote(nilVote), .proposal(proposal)]),
            .canonical(DuplicateVoteEvidence.self, [evidence]),
            .canonical(ValidatorSet.self, [set]),
            .canonical(WALRecord.self, [.signed(.vote(vote)), .value(height: 3, bytes: [9, 9]),
                                        .state(ConsensusSnapshot(height: 3, round: 1, step: .prevote, lockedRound: 0,
                                                                 lockedValue: Hash32.of([3]), validRound: nil, validValue: nil))]),
            .protobuf(PeerFrame.self, [.hello(nodeKey: key.publicKey, nonce: [UInt8](repeating: 1, count: 32), chainID: "emc-test"),
                                       .challenge(nodeKey: other.publicKey, nonce: [UInt8](repeating: 2, count: 32),
                                                  signature: key.sign([1], domain: .peerHandshake)),
                                       .auth(signature: [UInt8](repeating: 3, count: 64)),
                                       .consensus(ConsensusMessage.vote(vote).canonicalBytes), .tx(transfer.encoded),
                                       .status(height: .max), .rejected(code: "x", message: "y"), .accepted]),
            .protobuf(BlockRangeRequest.self, [BlockRangeRequest(from: .max, limit: .max), BlockRangeRequest(from: 1, limit: 100)]),
            .protobuf(BlockRangeResponse.self, [BlockRangeResponse(latestHeight: 9, blocks: [.init(value: block.canonicalBytes, certificate: [1]),
                                                                                            .init(value: [2], certificate: [3, 4])])]),
            .canonical(ReceiptBody.self, [receipt]),
            .canonical(NodeControlMessage.self, [.hello(nodeNonce: [UInt8](repeating: 2, count: 32)),
                                                 .status(inFlight: .max, healthyApps: ["llm", ""]),
                                                 .receipt(bodyBytes: receipt.canonicalBytes, nodeSignature: [UInt8](repeating: 0, count: 64))]),
            .canonical(RouterControlMessage.self, [.accepted(sessionToken: [1, 2]), .receiptAck(receiptID: Hash32.of([5])),
                                                   .rejected(code: "c", message: "m")]),
            .canonical(NodeWorkMessage.self, [.ready(sessionToken: [1]), .head(status: 200, contentType: "text/event-stream"),
                                              .chunk([1, 2, 3]), .failed(code: "c", message: "m")]),
            .canonical(RouterWorkMessage.self, [.cancel, .receiptAck(receiptID: Hash32.of([6]))]),
        ]
    }()

    @Test("valid samples round-trip", arguments: codecs)
    func roundTrip(codec: Codec) throws {
        for sample in codec.samples { #expect(try codec.reencode(sample) == sample) }
    }

    @Test("random bytes never trap, and whatever decodes is canonical", arguments: codecs)
    func randomBytes(codec: Codec) async {
        await propertyCheck(count: 400, input: Gen.uint8().array(of: 0...300)) { bytes in
            if let again = try? codec.reencode(bytes) { codec.check(bytes, decodedTo: again) }
        }
    }

    @Test("one flipped, dropped, inserted or truncated byte of a valid encoding never traps and never decodes to a non-canonical form",
          arguments: codecs)
    func mutations(codec: Codec) async {
        let samples = codec.samples
        await propertyCheck(count: 400, input: Gen.int(in: 0...(samples.count - 1)), Gen.int(in: 0...3), Gen.int(in: 0...100_000),
                            Gen.uint8()) { which, kind, position, value in
            var bytes = samples[which]
            let at = bytes.isEmpty ? 0 : position % bytes.count
            switch kind {
            case 0 where !bytes.isEmpty: bytes[at] ^= value | 1
            case 1 where !bytes.isEmpty: bytes.remove(at: at)
            case 2: bytes.insert(value, at: bytes.isEmpty ? 0 : at)
            default: bytes = Array(bytes.prefix(at))
            }
            if let again = try? codec.reencode(bytes) { codec.check(bytes, decodedTo: again) }
        }
    }

    @Test("length prefixes claiming up to 4 GiB are refused without allocating them")
    func hugeLengthPrefixes() {
        for codec in Self.codecs {
            for prefix: [UInt8] in [[0xFF, 0xFF, 0xFF, 0xFF], [0x7F, 0xFF, 0xFF, 0xFF], [0, 0, 0, 0]] {
                for sample in codec.samples where sample.count > 8 {
                    // Overwrite each 4-byte window in turn with a huge length: decoding must fail fast or stay canonical.
                    for start in stride(from: 0, to: sample.count - 4, by: 3) {
                        var bytes = sample
                        bytes.replaceSubrange(start..<(start + 4), with: prefix)
                        if let again = try? codec.reencode(bytes) {
                            if codec.isCanonical { #expect(again == bytes, "\(codec.name) at \(start)") } else { codec.check(bytes, decodedTo: again) }
                        }
                    }
                }
            }
        }
    }

    @Test("peer frames out of bounds are refused: no kind, short nonces, bad keys, long handshake fields, too many blocks")
    func peerFrameBounds() throws {
        func frame(_ build: (inout Edgematrix_Peer_V1_PeerFrame) -> Void) throws -> [UInt8] {
            var frame = Edgematrix_Peer_V1_PeerFrame()
            build(&frame)
            return try frame.serializedBytes()
        }
        let key = Data(Self.key.publicKey.rawRepresentation)
        let nonce = Data(repeating: 1, count: 32)
        let refused: [[UInt8]] = [
            [],  // no kind set
            try frame { $0.hello = .with { $0.nodeKey = key; $0.nonce = Data(repeating: 1, count: 31); $0.chainID = "emc-test" } },
            try frame { $0.hello = .with { $0.nodeKey = key; $0.nonce = Data(repeating: 1, count: 33); $0.chainID = "emc-test" } },
            try frame { $0.hello = .with { $0.nodeKey = Data(repeating: 0, count: 31); $0.nonce = nonce; $0.chainID = "emc-test" } },
            try frame { $0.hello = .with { $0.nodeKey = key; $0.nonce = nonce; $0.chainID = String(repeating: "c", count: 65) } },
            try frame { $0.challenge = .with { $0.nodeKey = key; $0.nonce = nonce; $0.signature = Data(repeating: 0, count: 65) } },
            try frame { $0.auth = .with { $0.signature = Data(repeating: 0, count: 1 << 20) } },
            try frame { $0.rejected = .with { $0.code = "x"; $0.message = String(repeating: "m", count: 4_097) } },
            [0x0A, 0x05, 0x0A],  // hello whose length runs past the end
        ]
        for bytes in refused { #expect(throws: EdgeMatrixCore.DecodingError.self) { try PeerFrame(protobufBytes: bytes) } }
        // Hello with every field at its bound decodes.
        let maximal = try frame { $0.hello = .with { $0.nodeKey = key; $0.nonce = nonce; $0.chainID = String(repeating: "c", count: 64) } }
        #expect(try PeerFrame(protobufBytes: maximal) == .hello(nodeKey: Self.key.publicKey, nonce: [UInt8](nonce), chainID: String(repeating: "c", count: 64)))

        // 10,001 empty entries (20 KB) are refused before they are decoded; 10,000 pass.
        let entry: [UInt8] = [0x12, 0x00]
        let tooMany = Array([[UInt8]](repeating: entry, count: 10_001).joined())
        #expect(throws: EdgeMatrixCore.DecodingError.self) { try BlockRangeResponse.precheck(tooMany) }  // before swift-protobuf allocates
        #expect(throws: EdgeMatrixCore.DecodingError.self) { try BlockRangeResponse(protobufBytes: tooMany) }
        #expect(try BlockRangeResponse(protobufBytes: Array([[UInt8]](repeating: entry, count: 10_000).joined())).blocks.count == 10_000)
    }

    @Test("frames encoded by protoc from proto/edgematrix/peer/v1/peer.proto decode, and Swift encodes them byte for byte")
    func protocVectors() throws {
        // `echo 'TEXT' | protoc -Iproto --encode=edgematrix.peer.v1.MESSAGE edgematrix/peer/v1/peer.proto | xxd -p`
        let rfc8032Key = try PublicKey(hex: "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
        let frames: [(hex: String, frame: PeerFrame)] = [
            ("0a4e0a20d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a1220000102030405060708090a0b0c0d0e0f"
                + "101112131415161718191a1b1c1d1e1f1a08656d632d74657374",
             .hello(nodeKey: rfc8032Key, nonce: Array(0..<32), chainID: "emc-test")),
            ("420b08ffffffffffffffffff01", .status(height: .max)),
            ("2200", .accepted),
        ]
        for (hex, frame) in frames {
            let bytes = try #require(Hex.decode(hex))
            #expect(try PeerFrame(protobufBytes: bytes) == frame)
            #expect(try frame.protobufBytes() == bytes)
        }
        let request = try #require(Hex.decode("08071064"))
        #expect(try BlockRangeRequest(protobufBytes: request) == BlockRangeRequest(from: 7, limit: 100))
        #expect(try BlockRangeRequest(from: 7, limit: 100).protobufBytes() == request)
        let response = try #require(Hex.decode("080912070a02010212010312030a0104"))
        let expected = BlockRangeResponse(latestHeight: 9, blocks: [.init(value: [1, 2], certificate: [3]), .init(value: [4], certificate: [])])
        #expect(try BlockRangeResponse(protobufBytes: response) == expected)
        #expect(try expected.protobufBytes() == response)
    }
}
