// swift-tools-version:6.1
import PackageDescription

// One module per concern; dependencies point one way:
// Core ← Ledger ← Consensus/Store ← Network ← Compute/Router ← Node ← emc
let package = Package(
    name: "EdgeMatrix",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "emc", targets: ["emc"]),
        .library(name: "EdgeMatrixClient", targets: ["EdgeMatrixClient"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-crypto.git", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.1"),
        .package(url: "https://github.com/apple/swift-asn1.git", from: "1.7.4"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.10.0"),
        .package(url: "https://github.com/grpc/grpc-swift-2.git", from: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport.git", from: "2.9.2"),
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", from: "2.4.1"),
        .package(url: "https://github.com/x-sheep/swift-property-based.git", from: "2.0.1"),
    ],
    targets: [
        .target(
            name: "EdgeMatrixCore",
            dependencies: [.product(name: "Crypto", package: "swift-crypto")]
        ),
        .target(name: "EdgeMatrixLedger", dependencies: ["EdgeMatrixCore"]),
        .target(name: "EdgeMatrixConsensus", dependencies: ["EdgeMatrixCore"]),
        // Block validity rules: a pure layer between the consensus engine and the ledger (as ABCI separates
        // CometBFT from its application), so that simulations drive the very rules validators run.
        .target(name: "EdgeMatrixApplication", dependencies: ["EdgeMatrixCore", "EdgeMatrixLedger", "EdgeMatrixConsensus"]),
        .target(
            name: "EdgeMatrixStore",
            dependencies: ["EdgeMatrixCore", .product(name: "GRDB", package: "GRDB.swift")]
        ),
        .target(
            name: "EdgeMatrixNetwork",
            dependencies: [
                "EdgeMatrixCore",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "EdgeMatrixChain",
            dependencies: [
                "EdgeMatrixCore", "EdgeMatrixLedger", "EdgeMatrixConsensus", "EdgeMatrixApplication", "EdgeMatrixStore",
                "EdgeMatrixNetwork",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .target(
            name: "EdgeMatrixCompute",
            dependencies: [
                "EdgeMatrixCore", "EdgeMatrixNetwork", "EdgeMatrixStore",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOFoundationCompat", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .target(
            name: "EdgeMatrixRouter",
            dependencies: [
                "EdgeMatrixCore", "EdgeMatrixNetwork", "EdgeMatrixStore", "EdgeMatrixLedger",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .target(
            name: "EdgeMatrixNode",
            dependencies: [
                "EdgeMatrixCore", "EdgeMatrixNetwork", "EdgeMatrixCompute", "EdgeMatrixRouter", "EdgeMatrixStore",
                "EdgeMatrixChain", "EdgeMatrixLedger",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            resources: [.copy("Resources")]
        ),
        .target(
            name: "EdgeMatrixClient",
            dependencies: [
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOFoundationCompat", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ]
        ),
        .executableTarget(
            name: "emc",
            dependencies: [
                "EdgeMatrixCore", "EdgeMatrixNode", "EdgeMatrixClient", "EdgeMatrixChain", "EdgeMatrixLedger",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "EdgeMatrixCoreTests",
            dependencies: ["EdgeMatrixCore", .product(name: "PropertyBased", package: "swift-property-based")]
        ),
        .testTarget(
            name: "EdgeMatrixLedgerTests",
            dependencies: ["EdgeMatrixLedger", "EdgeMatrixCore", .product(name: "PropertyBased", package: "swift-property-based")]
        ),
        .testTarget(
            name: "EdgeMatrixConsensusTests",
            dependencies: ["EdgeMatrixConsensus", "EdgeMatrixCore", "EdgeMatrixApplication", "EdgeMatrixLedger"]
        ),
        .testTarget(
            name: "EdgeMatrixWireTests",
            dependencies: [
                "EdgeMatrixCore", "EdgeMatrixLedger", "EdgeMatrixConsensus", "EdgeMatrixApplication", "EdgeMatrixNetwork",
                .product(name: "PropertyBased", package: "swift-property-based"),
            ]
        ),
        .testTarget(
            name: "EdgeMatrixRouterTests",
            dependencies: [
                "EdgeMatrixRouter", "EdgeMatrixNetwork", "EdgeMatrixStore", "EdgeMatrixCore", "EdgeMatrixLedger",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdTesting", package: "hummingbird"),
            ]
        ),
        .testTarget(
            name: "EdgeMatrixIntegrationTests",
            dependencies: [
                "EdgeMatrixNode", "EdgeMatrixRouter", "EdgeMatrixCompute", "EdgeMatrixNetwork",
                "EdgeMatrixStore", "EdgeMatrixCore", "EdgeMatrixClient", "EdgeMatrixChain", "EdgeMatrixLedger",
                "EdgeMatrixApplication", "EdgeMatrixConsensus",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
