"""Leases across languages: run by tests/python_interop.rs. Python and Rust callers of one
key compute it once between them, whichever wins the lease.

    python lease_interop.py SERVER_ADDRESS

1. Rust holds the lease of slow_square(9) (its computation is parked): Python's raw Get is
   told LEASE_WAIT; it prints WAITING, and its decorated call waits and returns Rust's 81
   without running its own body.
2. Python wins the lease of cube(3): its body prints COMPUTING and waits for a line on
   stdin (Rust's memoize of cube(3) is waiting meanwhile); then it returns 27, written with
   the lease token, which Rust's waiting call returns.
"""

import json
import sys

from cache_money_client import cached, connect
from cache_money_key import digest
from cache_money.v1 import cache_money_pb2 as pb

stub = connect(sys.argv[1])


@cached(stub)
def slow_square(n):
    raise AssertionError("slow_square(9) should come from the Rust caller holding the lease")


@cached(stub)
def cube(n):
    print("COMPUTING", flush=True)
    sys.stdin.readline()  # Rust's caller is waiting for this lease now
    return n**3


key = pb.Key(namespace="__main__", function="slow_square", digest=digest(9))
reply = stub.Get(pb.GetRequest(key=key, lease_ms=5000), timeout=1)
assert not reply.hit and reply.lease == pb.LEASE_WAIT, reply
print("WAITING", flush=True)
waited = slow_square(9)
assert waited == 81, waited
computed = cube(3)
print(json.dumps({"waited_for_rust": waited, "computed_for_rust": computed}), flush=True)
