"""Writes a framed gRPC GetRequest for bench/get/DIGEST to OUT, for h2load's -d: the 5-byte
prefix (not compressed, the length), then the protobuf (GetRequest.key = 1; Key.namespace = 1,
function = 2, digest = 3).

    python3 benches/get_request.py OUT DIGEST
"""
import struct
import sys


def field(number, payload):
    return bytes([number << 3 | 2, len(payload)]) + payload


out, digest = sys.argv[1], sys.argv[2]
key = field(1, b"bench") + field(2, b"get") + field(3, digest.encode())
message = field(1, key)
with open(out, "wb") as file:
    file.write(b"\0" + struct.pack(">I", len(message)) + message)
