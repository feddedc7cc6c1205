#!/usr/bin/env bash
# Regenerates the Swift code for every .proto file under proto/ into Sources/EdgeMatrixNetwork/Generated/.
#
# The generated files are committed: CI and `swift build` never run protoc or build the plugins. Run this only
# after editing a .proto file, then commit the .proto and the generated files together.
#
# Needs on PATH (or in PROTOC / PROTOC_GEN_SWIFT / PROTOC_GEN_GRPC_SWIFT):
#   protoc                   libprotoc 3.21 or later (Debian: apt-get install protobuf-compiler)
#   protoc-gen-swift         from swift-protobuf 1.39.0, the version Package.resolved pins
#   protoc-gen-grpc-swift-2  from grpc-swift-protobuf 2.4.1, the version Package.resolved pins
# Build the two plugins once, outside this repository:
#   mkdir -p /tmp/protogen/Sources/Dummy && cd /tmp/protogen && touch Sources/Dummy/D.swift
#   cat > Package.swift <<'SWIFT'
#   // swift-tools-version:6.1
#   import PackageDescription
#   let package = Package(name: "protogen",
#       dependencies: [.package(url: "https://github.com/apple/swift-protobuf.git", exact: "1.39.0"),
#                      .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", exact: "2.4.1")],
#       targets: [.target(name: "Dummy", dependencies: [.product(name: "SwiftProtobuf", package: "swift-protobuf"),
#                                                       .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf")])])
#   SWIFT
#   swift build -c release --product protoc-gen-swift
#   swift build -c release --product protoc-gen-grpc-swift-2
#   export PATH="/tmp/protogen/.build/release:$PATH"
set -euo pipefail
cd "$(dirname "$0")/.."

PROTOC="${PROTOC:-protoc}"
PROTOC_GEN_SWIFT="${PROTOC_GEN_SWIFT:-$(command -v protoc-gen-swift || true)}"
PROTOC_GEN_GRPC_SWIFT="${PROTOC_GEN_GRPC_SWIFT:-$(command -v protoc-gen-grpc-swift-2 || true)}"
for tool in "$PROTOC" "$PROTOC_GEN_SWIFT" "$PROTOC_GEN_GRPC_SWIFT"; do
    if [ -z "$tool" ] || ! command -v "$tool" >/dev/null; then
        echo "missing protoc or a Swift plugin; see the comment at the top of $0" >&2
        exit 1
    fi
done

OUT=Sources/EdgeMatrixNetwork/Generated
mkdir -p "$OUT"
rm -f "$OUT"/*.pb.swift "$OUT"/*.grpc.swift

PROTOS=$(cd proto && find . -name '*.proto' | sed 's|^\./||' | sort)
for file in $PROTOS; do
    # gRPC stubs only for files that declare a service (messages-only files, such as ledger/v1, get none).
    GRPC_ARGS=()
    if grep -q '^service ' "proto/$file"; then
        GRPC_ARGS=(--grpc-swift_out="../$OUT"
                   --grpc-swift_opt=Visibility=Public,FileNaming=PathToUnderscores,Client=true,Server=true)
    fi
    (cd proto && "$PROTOC" \
        --plugin=protoc-gen-swift="$PROTOC_GEN_SWIFT" \
        --plugin=protoc-gen-grpc-swift="$PROTOC_GEN_GRPC_SWIFT" \
        --swift_out="../$OUT" --swift_opt=Visibility=Public,FileNaming=PathToUnderscores \
        "${GRPC_ARGS[@]}" \
        "$file")
done
ls -1 "$OUT"
