#!/usr/bin/env python3
"""Bonds a compute stake and registers a compute node from docs/PROTOCOL.md alone.

The harder half of the transaction format: a bond (kind 2), the ICRC-1 account text (to read the new stake's id
from GET /stakes/{account}), and a node registration (kind 5) that carries two signatures, the node key's over a
NodeRegistrationStatement and the owner's over the transaction. Uses the encoders of submit_transfer.py.

Usage:
  register_node.py --node URL --key owner.key --node-key node.key --amount-base-units 15000000000 --lock-days 30
                   [--endpoint https://gpu.example:8443 ...]

Prints one JSON object on the last line of stdout: {"stake_id": N, "bond": <tx>, "register": <tx>}.
Exit status: 0 both committed; 2 refused at submission; 3 failed in a block or not committed in time.
"""

import argparse
import base64
import json
import struct
import sys
import time
import zlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
from submit_transfer import TRANSACTION_DOMAIN, boolean, envelope, http_json, length_prefixed, u8, u32, u64  # noqa: E402
import hashlib  # noqa: E402

NODE_REGISTRATION_DOMAIN = b"edgematrix/node-registration/v1"
STATEMENT_MAGIC = b"edgematrix-ledger/register-node/v1"
ROLE_COMPUTE = 3


def load_key(path):
    with open(path, "r", encoding="utf-8") as handle:
        key_file = json.load(handle)
    private_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key_file["private_key"]))
    public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    if public.hex() != key_file["public_key"].lower():
        sys.exit(f"{path}: public_key does not match private_key")
    return private_key, public


def account_text(owner):
    """ICRC-1 text of an account with the default subaccount (PROTOCOL.md § 5)."""
    encoded = base64.b32encode(struct.pack(">I", zlib.crc32(owner)) + owner).decode("ascii").lower().rstrip("=")
    return "-".join(encoded[i:i + 5] for i in range(0, len(encoded), 5))


def body_header(chain_id, kind):
    return u8(1) + length_prefixed(chain_id.encode("utf-8")) + u64(int(time.time() * 1000)) + u8(kind)


def submit_and_wait(node, private_key, signer, body, timeout):
    signature = private_key.sign(TRANSACTION_DOMAIN + b"\x00" + body)
    tx_id = hashlib.sha256(signer + body).hexdigest()
    code, answer = http_json("POST", node + "/txs", envelope(body, signer, signature).hex().encode("ascii"))
    if code != 202:
        return 2, {"hash": tx_id, "submitted": answer, "submitted_status": code}
    deadline = time.time() + timeout
    while time.time() < deadline:
        code, result = http_json("GET", node + "/txs/" + tx_id)
        if code == 200 and result.get("status") != "pending":
            return (0 if result.get("status") == "committed" else 3), result
        time.sleep(0.1)
    return 3, {"hash": tx_id, "status": "timeout"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", required=True, help="a validator's HTTP API base URL")
    parser.add_argument("--key", required=True, help="the owner's emc key file (pays, owns the stake and the node)")
    parser.add_argument("--node-key", required=True, help="the node's emc key file (signs the registration statement)")
    parser.add_argument("--amount-base-units", required=True, type=int, help="stake in base units")
    parser.add_argument("--lock-days", required=True, type=int, help="lock in days")
    parser.add_argument("--endpoint", action="append", default=[], help="an endpoint of the node (repeatable)")
    parser.add_argument("--timeout", type=float, default=30, help="seconds to wait for each commit")
    args = parser.parse_args()
    node = args.node.rstrip("/")
    owner_key, owner = load_key(args.key)
    node_private, node_public = load_key(args.node_key)

    code, status = http_json("GET", node + "/status")
    if code != 200:
        sys.exit(f"GET /status answered {code}: {status}")
    chain_id = status["chain_id"]
    outcome = {"stake_id": None, "bond": None, "register": None}

    # Kind 2, bond: from_subaccount absent, role, amount, lock days.
    bond = body_header(chain_id, 2) + boolean(False) + u8(ROLE_COMPUTE) + u64(args.amount_base_units) + u32(args.lock_days)
    code, outcome["bond"] = submit_and_wait(node, owner_key, owner, bond, args.timeout)
    if code != 0:
        print(json.dumps(outcome))
        return code

    # Reads answer from the latest committed state; wait until it includes the bond's block.
    deadline = time.time() + args.timeout
    while time.time() < deadline and http_json("GET", node + "/status")[1].get("height", 0) < outcome["bond"]["height"]:
        time.sleep(0.05)
    # The new stake: the highest id of this owner's bonded compute stakes with this amount.
    code, stakes = http_json("GET", node + "/stakes/" + account_text(owner))
    amount_text = f"{args.amount_base_units // 100_000_000}.{args.amount_base_units % 100_000_000:08d}"
    ids = [s["id"] for s in stakes.get("stakes", [])
           if s.get("role") == "compute" and s.get("amount") == amount_text and s.get("status") == "bonded"]
    if not ids:
        outcome["error"] = f"no bonded compute stake of {amount_text} EMC listed for {account_text(owner)}: {stakes}"
        print(json.dumps(outcome))
        return 3
    outcome["stake_id"] = stake_id = max(ids)

    # The statement the node key signs, then kind 5 carrying it and the node's signature.
    statement = (length_prefixed(STATEMENT_MAGIC) + length_prefixed(chain_id.encode("utf-8")) + owner + node_public
                 + u8(ROLE_COMPUTE) + length_prefixed("\n".join(args.endpoint).encode("ascii")) + u64(stake_id))
    node_signature = node_private.sign(NODE_REGISTRATION_DOMAIN + b"\x00" + statement)
    register = body_header(chain_id, 5) + length_prefixed(statement) + length_prefixed(node_signature)
    code, outcome["register"] = submit_and_wait(node, owner_key, owner, register, args.timeout)
    print(json.dumps(outcome))
    return code


if __name__ == "__main__":
    sys.exit(main())
