#!/usr/bin/env python3
"""Builds, signs and submits an EdgeMatrix ICRC-1 transfer from docs/PROTOCOL.md alone.

Nothing here comes from the Swift code: the byte layout, the signing domain, the transaction id and the HTTP API
are taken from the protocol document, so this script fails when the document and the implementation disagree.

Usage:
  submit_transfer.py --node http://127.0.0.1:8100 --key funded.key --to <64-hex public key> --amount-base-units 1234
                     [--memo TEXT] [--flip-signature-byte] [--timeout 30] [--protobuf]

With --protobuf the signed transaction is sent as the protobuf message edgematrix.ledger.v1.SignedTransaction
(proto/edgematrix/ledger/v1/transaction.proto, Python code generated from the .proto at run time with grpcio-tools'
protoc) and Content-Type application/x-protobuf, instead of the canonical envelope as hex text.

Prints one JSON object on the last line of stdout:
  {"hash": ..., "submitted": <HTTP answer>, "result": <GET /txs/{hash} answer or null>}
Exit status: 0 committed; 2 refused at submission (the answer's error code is in "submitted"); 3 failed in a
block or not committed in time; 4 the node's transaction hash differs from the one computed from the document.
"""

import argparse
import hashlib
import importlib
import json
import os
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# PROTOCOL.md, "Signing": every signature covers the ASCII domain tag, one 0x00 byte, then the signed bytes.
TRANSACTION_DOMAIN = b"edgematrix/transaction/v1"


def u8(value):
    return struct.pack(">B", value)


def u32(value):
    return struct.pack(">I", value)


def u64(value):
    return struct.pack(">Q", value)


def boolean(value):
    return b"\x01" if value else b"\x00"


def length_prefixed(data):
    return u32(len(data)) + data


def account(owner_key):
    """An account with the default subaccount: owner (32 raw bytes), then false (no subaccount)."""
    assert len(owner_key) == 32
    return owner_key + boolean(False)


def transfer_body(chain_id, created_at_ms, to_owner, amount, memo):
    body = u8(1)                                    # body version
    body += length_prefixed(chain_id.encode("utf-8"))
    body += u64(created_at_ms)
    body += u8(1)                                   # kind tag: transfer
    body += boolean(False)                          # from_subaccount: absent (the default subaccount)
    body += account(to_owner)
    body += u64(amount)                             # base units, 1 EMC = 100,000,000
    body += boolean(False)                          # fee: absent (the ledger's fee applies)
    if memo is None:
        body += boolean(False)
    else:
        body += boolean(True) + length_prefixed(memo)
    return body


def envelope(body, signer, signature):
    assert len(signer) == 32 and len(signature) == 64
    return u8(1) + length_prefixed(body) + signer + signature


def signed_transaction_module(proto_root, out_dir):
    """Generates the Python module for transaction.proto with grpcio-tools' protoc and imports it."""
    from grpc_tools import protoc  # grpcio-tools from PyPI
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    status = protoc.main(["grpc_tools.protoc", "-I" + proto_root, "-I" + include, "--python_out=" + out_dir,
                          "edgematrix/ledger/v1/transaction.proto"])
    if status != 0:
        sys.exit(f"protoc failed with status {status}")
    sys.path.insert(0, out_dir)
    return importlib.import_module("edgematrix.ledger.v1.transaction_pb2")


def http_json(method, url, data=None, content_type="text/plain"):
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        text = error.read().decode("utf-8", "replace")
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, {"error": {"code": "not_json", "message": text}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", required=True, help="a validator's HTTP API base URL")
    parser.add_argument("--key", required=True, help="the sender's emc key file (JSON with private_key hex)")
    parser.add_argument("--to", required=True, help="recipient's Ed25519 public key, 64 hex digits")
    parser.add_argument("--amount-base-units", required=True, type=int, help="amount in base units")
    parser.add_argument("--memo", help="memo text (UTF-8)")
    parser.add_argument("--flip-signature-byte", action="store_true", help="corrupt the signature (negative test)")
    parser.add_argument("--timeout", type=float, default=30, help="seconds to wait for the commit")
    parser.add_argument("--protobuf", action="store_true",
                        help="send a protobuf SignedTransaction (Content-Type application/x-protobuf)")
    parser.add_argument("--proto-root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto"),
                        help="the repository's proto/ directory (for --protobuf)")
    args = parser.parse_args()
    node = args.node.rstrip("/")

    with open(args.key, "r", encoding="utf-8") as handle:
        key_file = json.load(handle)
    if key_file.get("type") != "ed25519":
        sys.exit("not an ed25519 key file")
    private_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key_file["private_key"]))
    signer = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    if signer.hex() != key_file["public_key"].lower():
        sys.exit("the key file's public_key does not match its private_key")

    status_code, status = http_json("GET", node + "/status")
    if status_code != 200:
        sys.exit(f"GET /status answered {status_code}: {status}")
    chain_id = status["chain_id"]

    to_owner = bytes.fromhex(args.to)
    if len(to_owner) != 32:
        sys.exit("--to must be 32 bytes (64 hex digits)")
    if not 0 <= args.amount_base_units < 2 ** 64:
        sys.exit("--amount-base-units must fit in an unsigned 64-bit integer")
    memo = args.memo.encode("utf-8") if args.memo is not None else None

    body = transfer_body(chain_id, int(time.time() * 1000), to_owner, args.amount_base_units, memo)
    signature = bytearray(private_key.sign(TRANSACTION_DOMAIN + b"\x00" + body))
    if args.flip_signature_byte:
        signature[10] ^= 0x01
    wire = envelope(body, signer, bytes(signature))
    tx_id = hashlib.sha256(signer + body).hexdigest()

    if args.protobuf:
        # POST /txs with Content-Type application/x-protobuf takes a SignedTransaction: the body bytes exactly as
        # signed, the signer's key and the signature, each in its own `bytes` field.
        with tempfile.TemporaryDirectory() as out_dir:
            transaction_pb2 = signed_transaction_module(os.path.abspath(args.proto_root), out_dir)
            message = transaction_pb2.SignedTransaction(body=body, signer=signer, signature=bytes(signature))
            payload = message.SerializeToString()
        submit_code, submitted = http_json("POST", node + "/txs", payload, content_type="application/x-protobuf")
    else:
        # POST /txs takes the wire bytes as hex text.
        submit_code, submitted = http_json("POST", node + "/txs", wire.hex().encode("ascii"))
    outcome = {"hash": tx_id, "submitted": submitted, "submitted_status": submit_code, "result": None,
               "encoding": "protobuf" if args.protobuf else "hex"}
    if submit_code != 202:
        print(json.dumps(outcome))
        return 2
    if submitted.get("hash") != tx_id:
        outcome["error"] = "the node's hash differs from SHA-256(signer || body bytes)"
        print(json.dumps(outcome))
        return 4

    deadline = time.time() + args.timeout
    while time.time() < deadline:
        code, result = http_json("GET", node + "/txs/" + tx_id)
        if code == 200 and result.get("status") != "pending":
            outcome["result"] = result
            print(json.dumps(outcome))
            return 0 if result.get("status") == "committed" else 3
        time.sleep(0.1)
    print(json.dumps(outcome))
    return 3


if __name__ == "__main__":
    sys.exit(main())
