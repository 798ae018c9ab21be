"""Python and Rust sharing one cache: run by tests/python_interop.rs after the Rust client
stored addition(3, 4); this stores multiplication(6, 7) for the Rust side to read. With tags:
Rust stored profile(7) tagged user:7; this stores orders(7) and orders(8) tagged by user, busts
user:7 (Rust's entry and its own go), then stores avatar(7) tagged user:7 for Rust to bust.

    python interop.py VECTORS_JSON SERVER_ADDRESS
"""

import json
import math
import sys

from cache_money_client import bust_tag, cached, connect
from cache_money_key import canonical, digest

vectors_path, address = sys.argv[1], sys.argv[2]

# 1. The key spec passes every shared vector, and refuses what must be refused.
vectors = json.load(open(vectors_path, encoding="utf-8"))
for vector in vectors["vectors"]:
    args = json.loads(vector["args"])
    assert canonical(args) == vector["canonical"], (vector["name"], canonical(args), vector["canonical"])
    assert digest(*args) == vector["digest"], vector["name"]
for vector in vectors["versioned"]:
    args = json.loads(vector["args"])
    assert digest(*args, version=vector["version"]) == vector["digest"], vector["name"]
for invalid in vectors["invalid"]:
    try:
        canonical(json.loads(invalid["args"]))
    except ValueError:
        continue
    raise AssertionError(f"{invalid['name']} was keyed")
for unkeyable in (math.nan, math.inf, {1: "int key"}):
    try:
        canonical([unkeyable])
    except ValueError:
        continue
    raise AssertionError(f"{unkeyable!r} was keyed")

stub = connect(address)


@cached(stub)
def addition(a, b):
    raise AssertionError("addition(3, 4) should come from the entry the Rust client stored")


@cached(stub)
def multiplication(a, b):
    return a * b


@cached(stub, version=2)
def price(sku):
    if sku == "abc":
        raise AssertionError("price('abc') version 2 should come from the entry the Rust client stored")
    return f"{len(sku) * 100} cents"


def by_user(user_id):
    return [f"user:{user_id}"]


@cached(stub, tags=by_user)
def orders(user_id):
    return [user_id, 1]


@cached(stub, tags=by_user)
def avatar(user_id):
    return f"avatar-{user_id}.png"


# 2. A value the Rust client stored, read by Python (addition's body never runs).
assert addition(3, 4) == 7
# 3. A value Python stores, for the Rust client to read.
assert multiplication(6, 7) == 42
# 4. The same both ways for a versioned function (version 2).
assert price("abc") == "300 cents"
assert price("abcd") == "400 cents"
# 5. Tags both ways: one BustTag removes Rust's profile(7) and Python's orders(7), not orders(8).
assert orders(7) == [7, 1] and orders(8) == [8, 1]
busted = bust_tag(stub, "__main__", "user:7")
assert busted == 2, busted
assert avatar(7) == "avatar-7.png"
print(
    json.dumps(
        {
            "vectors": len(vectors["vectors"]),
            "versioned_vectors": len(vectors["versioned"]),
            "read_from_rust": 7,
            "stored_for_rust": 42,
            "versioned_read_from_rust": "300 cents",
            "tag_busted_from_python": busted,
        }
    )
)
