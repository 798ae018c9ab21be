"""A `@cached` decorator over the generated cache-money stubs: the seed's API, served by the
shared cache-money service, so Python and Rust functions can share entries.

Generate the stubs first, as the README's Python section does (into gen/; the tests use a
temporary folder):
    mkdir -p gen
    python -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen \
        proto/cache_money/v1/cache_money.proto
and put gen/ and this folder on sys.path (PYTHONPATH=gen:examples/python).
"""

import json
import logging

import grpc

from cache_money.v1 import cache_money_pb2 as pb
from cache_money.v1 import cache_money_pb2_grpc as rpc
from cache_money_key import digest

CACHE_HOUR = 3600
DEADLINE_SECONDS = 0.1  # fail-open: a slow or down cache costs at most this per call


def connect(address: str) -> rpc.CacheMoneyStub:
    """A stub for the service at host:port."""
    return rpc.CacheMoneyStub(grpc.insecure_channel(address))


def cached(stub: rpc.CacheMoneyStub, timeout: int = CACHE_HOUR, version: int = 1, tags=None):
    """Memoizes a function in cache-money under (its module, its name, its arguments).

    Bump `version` when the function's result changes type or meaning: calls then never read
    entries of another version (Rust's `#[memoize(version = 2)]` keys the same way), and
    `bust_all` still removes every version's entries.

    `tags`, when given, is called with the call's arguments and returns the tags the result is
    written with, e.g. `tags=lambda user_id: [f"user:{user_id}"]`; `bust_tag(stub, module,
    "user:7")` then removes it with every other entry of the module carrying the tag (Rust's
    `#[memoize(tags = ["user:{id}"])]` writes the same)."""

    def decorate(fn):
        def key(*args):
            return pb.Key(namespace=fn.__module__, function=fn.__name__, digest=digest(*args, version=version))

        def wrapper(*args):
            entry = key(*args)
            try:
                reply = stub.Get(pb.GetRequest(key=entry), timeout=DEADLINE_SECONDS)
                if reply.hit:
                    return json.loads(reply.value)
            except grpc.RpcError as err:
                logging.debug("cache-money unavailable, computing: %s", err)
            except ValueError:
                logging.warning("cached value of %s does not decode; recomputing", fn.__name__)
            result = fn(*args)
            if result is not None:  # as in the seed, None is not cached
                value = json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode()
                try:
                    written = pb.PutRequest(
                        key=entry, value=value, ttl_seconds=timeout, tags=tags(*args) if tags else []
                    )
                    stub.Put(written, timeout=DEADLINE_SECONDS)
                except grpc.RpcError as err:
                    logging.debug("cache-money unavailable, not stored: %s", err)
            return result

        wrapper.bust = lambda *args: stub.Bust(pb.BustRequest(key=key(*args))).removed
        wrapper.bust_all = lambda: stub.BustFunction(
            pb.BustFunctionRequest(namespace=fn.__module__, function=fn.__name__)
        ).removed
        return wrapper

    return decorate


def bust_tag(stub: rpc.CacheMoneyStub, namespace: str, tag: str) -> int:
    """Removes every entry of `namespace` written with `tag`, whatever function wrote it;
    returns how many there were."""
    return stub.BustTag(pb.BustTagRequest(namespace=namespace, tag=tag)).removed
