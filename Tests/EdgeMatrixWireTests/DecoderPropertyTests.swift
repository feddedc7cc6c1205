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
        let receipt = ReceiptBody(payer: Account(owner: other.publicKey, subaccount: Subaccount(index: 3)), router: other.publicKey,
                                  node: key.publicKey, sequence: 9, attempt: 1, app: "llm", model: "m",
                                  prices: UnitPrices(perMillionPromptTokens: 1, perMillionCompletionTokens: 2, perItem: 3),
                                  units: WorkUnits(promptTokens: 3, completionTokens: 4, items: 0), startedAtMillis: 1, endedAtMillis: 2,
                                  requestHash: Hash32.of([1]), responseHash: Hash32.of([2]), status: 200)
        let descriptor = NodeDescriptor(apps: [AppDescriptor(name: "llm", kind: .openai, models: ["a", "b"]),
                                               AppDescriptor(name: "img", kind: .rest, models: [], healthy: false)],
                                        maxConcurrent: 4, hardware: HardwareInfo(cpuCores: 8, memoryMiB: 1 << 40,
                                                                                 gpus: [GPUInfo(name: "H100", memoryMiB: 81_559)]),
                                        version: "0.1")
        let work = WorkRequest(requestID: "42", app: "llm", model: "m", method: "POST", path: "/v1/chat/completions",
                               contentType: "application/json", body: Array("{}".utf8), stream: true, sequence: .max, attempt: 3,
                               payer: Account(owner: other.publicKey, subaccount: Subaccount(index: 3)),
                               prices: UnitPrices(perMillionPromptTokens: 1, perMillionCompletionTokens: .max, perItem: 3))
        let plainWork = WorkRequest(requestID: "", app: "", model: "", method: "", path: "", contentType: "", body: [], stream: false,
                                    sequence: 0, attempt: 0, payer: Account(owner: key.publicKey), prices: .free)
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
            .canonical(APIKeyBinding.self, [APIKeyBinding(router: other.publicKey, account: Account(owner: key.publicKey), keyHash: Hash32.of([4]),
                                                          spendLimitPerEpoch: 5, createdAtMillis: 6)]),
            .canonical(NodeDescriptor.self, [descriptor]),
            .protobuf(NodeControlMessage.self, [.hello(nodeNonce: [UInt8](repeating: 2, count: 32)),
                                                .register(nodeKey: key.publicKey, descriptorBytes: descriptor.canonicalBytes,
                                                          signature: [UInt8](repeating: 7, count: 64)),
                                                .status(inFlight: .max, healthyApps: ["llm", ""]),
                                                .receipt(bodyBytes: receipt.canonicalBytes, nodeSignature: [UInt8](repeating: 0, count: 64))]),
            .protobuf(RouterControlMessage.self, [.challenge(routerKey: other.publicKey, routerNonce: [UInt8](repeating: 3, count: 32),
                                                             signature: [UInt8](repeating: 4, count: 64)),
                                                  .accepted(sessionToken: [1, 2]), .receiptAck(receiptID: Hash32.of([5]), routerSignature: [UInt8](repeating: 7, count: 64)),
                                                  .receiptAck(receiptID: Hash32.of([5]), routerSignature: []),
                                                  .rejected(code: "c", message: "m")]),
            .protobuf(NodeWorkMessage.self, [.ready(sessionToken: [1]), .head(status: 200, contentType: "text/event-stream"),
                                             .head(status: .max, contentType: ""), .chunk([1, 2, 3]),
                                             .end(receiptBody: receipt.canonicalBytes, nodeSignature: [UInt8](repeating: 5, count: 64)),
                                             .failed(code: "c", message: "m")]),
            .protobuf(RouterWorkMessage.self, [.cancel, .receiptAck(receiptID: Hash32.of([6]), routerSignature: [UInt8](repeating: 8, count: 64)), .assign(work), .assign(plainWork)]),
            .protobuf(WorkRequest.self, [work, plainWork]),
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

    @Test("tunnel messages out of bounds are refused: no kind, wrong nonce and hash sizes, bad keys, long fields, status above 65535, missing payer")
    func tunnelMessageBounds() throws {
        func control(_ build: (inout Edgematrix_Tunnel_V1_NodeControl) -> Void) throws -> [UInt8] {
            var message = Edgematrix_Tunnel_V1_NodeControl()
            build(&message)
            return try message.serializedBytes()
        }
        func routerControl(_ build: (inout Edgematrix_Tunnel_V1_RouterControl) -> Void) throws -> [UInt8] {
            var message = Edgematrix_Tunnel_V1_RouterControl()
            build(&message)
            return try message.serializedBytes()
        }
        func nodeWork(_ build: (inout Edgematrix_Tunnel_V1_NodeWork) -> Void) throws -> [UInt8] {
            var message = Edgematrix_Tunnel_V1_NodeWork()
            build(&message)
            return try message.serializedBytes()
        }
        func assign(_ build: (inout Edgematrix_Tunnel_V1_WorkRequest) -> Void) throws -> [UInt8] {
            var request = Edgematrix_Tunnel_V1_WorkRequest()
            request.payer = .with { $0.owner = Data(Self.key.publicKey.rawRepresentation) }
            request.prices = Edgematrix_Tunnel_V1_UnitPrices()
            build(&request)
            return try Edgematrix_Tunnel_V1_RouterWork.with { $0.assign = request }.serializedBytes()
        }
        let key = Data(Self.key.publicKey.rawRepresentation)
        let nonce = Data(repeating: 1, count: 32)

        let nodeControlRefused: [[UInt8]] = [
            [],
            try control { $0.hello = .with { $0.nodeNonce = Data(repeating: 1, count: 31) } },
            try control { $0.hello = .with { $0.nodeNonce = Data(repeating: 1, count: 33) } },
            try control { $0.register = .with { $0.nodeKey = Data(repeating: 0, count: 31); $0.signature = Data(count: 64) } },
            try control { $0.register = .with { $0.nodeKey = key; $0.descriptor = Data(count: TunnelLimits.maxDescriptorBytes + 1) } },
            try control { $0.register = .with { $0.nodeKey = key; $0.signature = Data(count: 65) } },
            try control { $0.status = .with { $0.healthyApps = [String](repeating: "a", count: TunnelLimits.maxHealthyApps + 1) } },
            try control { $0.status = .with { $0.healthyApps = [String(repeating: "a", count: TunnelLimits.maxNameBytes + 1)] } },
            try control { $0.receipt = .with { $0.body = Data(count: TunnelLimits.maxReceiptBodyBytes + 1) } },
            try control { $0.receipt = .with { $0.nodeSignature = Data(count: 65) } },
            [0x0A, 0x05, 0x0A],  // hello whose length runs past the end
        ]
        for bytes in nodeControlRefused {
            #expect(throws: EdgeMatrixCore.DecodingError.self) { try NodeControlMessage(protobufBytes: bytes) }
        }
        // 257 empty healthy-app entries are refused on the raw bytes, before swift-protobuf allocates them; 256 pass.
        let tooManyApps = try control { $0.status = .with { $0.healthyApps = [String](repeating: "", count: 257) } }
        #expect(throws: EdgeMatrixCore.DecodingError.self) { try NodeControlMessage.precheck(tooManyApps) }
        let enoughApps = try control { $0.status = .with { $0.inFlight = 1; $0.healthyApps = [String](repeating: "", count: 256) } }
        #expect(try NodeControlMessage(protobufBytes: enoughApps) == .status(inFlight: 1, healthyApps: [String](repeating: "", count: 256)))

        let routerControlRefused: [[UInt8]] = [
            [],
            try routerControl { $0.challenge = .with { $0.routerKey = key; $0.routerNonce = Data(count: 31); $0.signature = Data(count: 64) } },
            try routerControl { $0.challenge = .with { $0.routerKey = Data(count: 33); $0.routerNonce = nonce } },
            try routerControl { $0.accepted = .with { $0.sessionToken = Data(count: TunnelLimits.maxSessionTokenBytes + 1) } },
            try routerControl { $0.rejected = .with { $0.code = String(repeating: "c", count: TunnelLimits.maxNameBytes + 1) } },
            try routerControl { $0.rejected = .with { $0.message = String(repeating: "m", count: TunnelLimits.maxTextBytes + 1) } },
            try routerControl { $0.receiptAck = .with { $0.receiptID = Data(count: 31) } },
        ]
        for bytes in routerControlRefused {
            #expect(throws: EdgeMatrixCore.DecodingError.self) { try RouterControlMessage(protobufBytes: bytes) }
        }

        let nodeWorkRefused: [[UInt8]] = [
            [],
            try nodeWork { $0.head = .with { $0.status = 65_536; $0.contentType = "text/plain" } },
            try nodeWork { $0.head = .with { $0.status = .max } },
            try nodeWork { $0.head = .with { $0.status = 200; $0.contentType = String(repeating: "t", count: TunnelLimits.maxTextBytes + 1) } },
            try nodeWork { $0.ready = .with { $0.sessionToken = Data(count: TunnelLimits.maxSessionTokenBytes + 1) } },
            try nodeWork { $0.end = .with { $0.body = Data(count: TunnelLimits.maxReceiptBodyBytes + 1) } },
            try nodeWork { $0.failed = .with { $0.code = String(repeating: "c", count: TunnelLimits.maxNameBytes + 1) } },
        ]
        for bytes in nodeWorkRefused {
            #expect(throws: EdgeMatrixCore.DecodingError.self) { try NodeWorkMessage(protobufBytes: bytes) }
        }
        #expect(try NodeWorkMessage(protobufBytes: nodeWork { $0.head = .with { $0.status = 65_535 } }) == .head(status: 65_535, contentType: ""))

        let routerWorkRefused: [[UInt8]] = [
            [],
            try Edgematrix_Tunnel_V1_RouterWork.with { $0.assign = .with { $0.prices = Edgematrix_Tunnel_V1_UnitPrices() } }.serializedBytes(),
            try Edgematrix_Tunnel_V1_RouterWork.with { $0.assign = .with { $0.payer = .with { $0.owner = key } } }.serializedBytes(),
            try assign { $0.payer.owner = Data(count: 33) },
            try assign { $0.payer.subaccount = Data(count: 31) },
            try assign { $0.requestID = String(repeating: "r", count: TunnelLimits.maxNameBytes + 1) },
            try assign { $0.model = String(repeating: "m", count: TunnelLimits.maxNameBytes + 1) },
            try assign { $0.path = String(repeating: "p", count: TunnelLimits.maxTextBytes + 1) },
            try Edgematrix_Tunnel_V1_RouterWork.with { $0.receiptAck = .with { $0.receiptID = Data(count: 33) } }.serializedBytes(),
        ]
        for bytes in routerWorkRefused {
            #expect(throws: EdgeMatrixCore.DecodingError.self) { try RouterWorkMessage(protobufBytes: bytes) }
        }
        // An all-zero subaccount is the default subaccount (re-encoded as absent), as in the canonical encoding.
        guard case .assign(let zeroSub) = try RouterWorkMessage(protobufBytes: try assign { $0.payer.subaccount = Data(count: 32) }) else {
            Issue.record("not an assignment")
            return
        }
        #expect(zeroSub.payer == Account(owner: Self.key.publicKey))
    }

    @Test("tunnel messages and SignedTransaction encoded by protoc from proto/ decode, and Swift encodes them byte for byte")
    func tunnelProtocVectors() throws {
        // `echo 'TEXT' | protoc -Iproto --encode=edgematrix.tunnel.v1.MESSAGE edgematrix/tunnel/v1/tunnel.proto | xxd -p`
        let rfc8032Key = try PublicKey(hex: "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
        let nodeWork: [(String, NodeWorkMessage)] = [
            ("121508c80112106170706c69636174696f6e2f6a736f6e", .head(status: 200, contentType: "application/json")),
        ]
        for (hex, message) in nodeWork {
            let bytes = try #require(Hex.decode(hex))
            #expect(try NodeWorkMessage(protobufBytes: bytes) == message)
            #expect(try message.protobufBytes() == bytes)
        }
        let request = WorkRequest(requestID: "7", app: "llm", model: "m", method: "POST", path: "/v1/chat/completions",
                                  contentType: "application/json", body: Array("{}".utf8), stream: true, sequence: 7, attempt: 1,
                                  payer: Account(owner: rfc8032Key), prices: UnitPrices(perMillionPromptTokens: 10, perItem: 2))
        let routerWork: [(String, RouterWorkMessage)] = [
            ("1200", .cancel),
            ("0a6d0a013712036c6c6d1a016d2204504f53542a142f76312f636861742f636f6d706c6574696f6e7332106170706c69636174696f6e2f6a736f6e"
                + "3a027b7d4001480750015a220a20d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a6204080a1802",
             .assign(request)),
        ]
        for (hex, message) in routerWork {
            let bytes = try #require(Hex.decode(hex))
            #expect(try RouterWorkMessage(protobufBytes: bytes) == message)
            #expect(try message.protobufBytes() == bytes)
        }
        let status = try #require(Hex.decode("1a0c080312036c6c6d1203696d67"))
        #expect(try NodeControlMessage(protobufBytes: status) == .status(inFlight: 3, healthyApps: ["llm", "img"]))
        #expect(try NodeControlMessage.status(inFlight: 3, healthyApps: ["llm", "img"]).protobufBytes() == status)

        // SignedTransaction{body: 01 02, signer: the RFC 8032 key, signature: 64 × 05} becomes the canonical envelope.
        let signed = try #require(Hex.decode("0a0201021220d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a1a40"
                                             + String(repeating: "05", count: 64)))
        let envelope: [UInt8] = [1, 0, 0, 0, 2, 1, 2] + rfc8032Key.rawRepresentation + [UInt8](repeating: 5, count: 64)
        #expect(try SignedTransactionWire.envelope(protobufBytes: signed) == envelope)
        #expect(try SignedTransactionWire.protobufBytes(body: [1, 2], signer: rfc8032Key, signature: [UInt8](repeating: 5, count: 64)) == signed)
    }

    @Test("a SignedTransaction becomes exactly the envelope the Swift client encodes; malformed ones are refused, never trap")
    func signedTransactionWire() async throws {
        let transfer = Transaction(signing: TransactionBody(chainID: "emc-test", createdAtMillis: 1,
                                                            kind: .transfer(Transfer(to: Account(owner: Self.other.publicKey), amount: Amount(emc: 1)))),
                                   with: Self.key)
        let wire = try SignedTransactionWire.protobufBytes(body: transfer.bodyBytes, signer: transfer.signer, signature: transfer.signature)
        #expect(try SignedTransactionWire.envelope(protobufBytes: wire) == transfer.encoded)
        #expect(try Transaction(decoding: SignedTransactionWire.envelope(protobufBytes: wire)).hasValidSignature)

        let key = Data(Self.key.publicKey.rawRepresentation)
        func signed(_ build: (inout Edgematrix_Ledger_V1_SignedTransaction) -> Void) throws -> [UInt8] {
            var message = Edgematrix_Ledger_V1_SignedTransaction.with { $0.body = Data([1]); $0.signer = key; $0.signature = Data(count: 64) }
            build(&message)
            return try message.serializedBytes()
        }
        let refused: [[UInt8]] = [
            [],
            try signed { $0.body = Data() },
            try signed { $0.signer = Data(count: 31) },
            try signed { $0.signer = Data(count: 33) },
            try signed { $0.signature = Data(count: 63) },
            try signed { $0.signature = Data(count: 65) },
            [UInt8](repeating: 0x0A, count: SignedTransactionWire.maxBytes + 1),
            [0x0A, 0x05, 0x01],
        ]
        for bytes in refused {
            #expect(throws: EdgeMatrixCore.DecodingError.self) { try SignedTransactionWire.envelope(protobufBytes: bytes) }
        }
        await propertyCheck(count: 400, input: Gen.uint8().array(of: 0...300)) { bytes in
            if let envelope = try? SignedTransactionWire.envelope(protobufBytes: bytes) {
                // Whatever decodes frames a 32-byte key and a 64-byte signature around the body it carried.
                #expect(envelope.first == 1 && envelope.count >= 5 + 1 + 32 + 64)
            }
        }
    }
}
