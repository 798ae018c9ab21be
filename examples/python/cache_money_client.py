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
import random
import time

import grpc

from cache_money.v1 import cache_money_pb2 as pb
from cache_money.v1 import cache_money_pb2_grpc as rpc
from cache_money_key import digest

CACHE_HOUR = 3600
DEADLINE_SECONDS = 0.1  # fail-open: a slow or down cache costs at most this per call
LEASE_MS = 5000  # on a miss one caller fleet-wide computes, the others wait for it (0: off)


def connect(address: str) -> rpc.CacheMoneyStub:
    """A stub for the service at host:port."""
    return rpc.CacheMoneyStub(grpc.insecure_channel(address))


def cached(stub: rpc.CacheMoneyStub, timeout: int = CACHE_HOUR, version: int = 1, tags=None,
           lease_ms: int = LEASE_MS):
    """Memoizes a function in cache-money under (its module, its name, its arguments).

    Bump `version` when the function's result changes type or meaning: calls then never read
    entries of another version (Rust's `#[memoize(version = 2)]` keys the same way), and
    `bust_all` still removes every version's entries.

    `tags`, when given, is called with the call's arguments and returns the tags the result is
    written with, e.g. `tags=lambda user_id: [f"user:{user_id}"]`; `bust_tag(stub, module,
    "user:7")` then removes it with every other entry of the module carrying the tag (Rust's
    `#[memoize(tags = ["user:{id}"])]` writes the same).

    `lease_ms` is the lease asked for on a miss (README, "One computation per key"), as
    Rust's memoize does: the caller that wins it (LEASE_WON) computes and writes with its
    token; the others (LEASE_WAIT) sleep the `retry_after_ms` the server says and look again,
    until the value is there, they win the lease, or lease_ms plus the deadline has passed
    (then they compute without writing). A failed computation gives the lease back (Release).
    A bust while computing voids the token: the write is refused and the next call computes
    again. 0 turns leases off (every caller that misses computes and writes)."""

    def decorate(fn):
        def key(*args):
            return pb.Key(namespace=fn.__module__, function=fn.__name__, digest=digest(*args, version=version))

        def lookup(entry, written_tags):
            """(value found, value, lease token, whether to write): the lease loop. The tags the
            result will be written with go with the lookup, so a BustTag voids the lease too."""
            started = time.monotonic()
            give_up = started + lease_ms / 1000 + DEADLINE_SECONDS
            cap = started + 2 * lease_ms / 1000 + DEADLINE_SECONDS
            request = pb.GetRequest(key=entry, lease_ms=lease_ms, tags=written_tags if lease_ms else [])
            while True:
                try:
                    reply = stub.Get(request, timeout=DEADLINE_SECONDS)
                except grpc.RpcError as err:
                    logging.debug("cache-money unavailable, computing: %s", err)
                    return False, None, 0, True  # fail-open: compute, write without a lease
                won = reply.lease_token if reply.lease == pb.LEASE_WON else 0
                if reply.hit:
                    try:
                        return True, json.loads(reply.value), 0, False
                    except ValueError:
                        logging.warning("cached value of %s does not decode; recomputing", fn.__name__)
                        return False, None, won, True
                if won:
                    return False, None, won, True
                if reply.lease != pb.LEASE_WAIT:
                    return False, None, 0, True  # leases off, or a server without them
                # A new holder (one that took an expired lease over) gets its own lease's time.
                holder_ends = time.monotonic() + reply.lease_left_ms / 1000 + DEADLINE_SECONDS
                give_up = max(give_up, min(holder_ends, cap))
                pause = reply.retry_after_ms / 1000 * (1 + random.random() / 4)  # jittered
                if time.monotonic() + pause > give_up:
                    return False, None, 0, False  # the holder never wrote: compute, don't write
                time.sleep(pause)

        def release(entry, token):
            try:
                stub.Release(pb.ReleaseRequest(key=entry, lease_token=token), timeout=DEADLINE_SECONDS)
            except grpc.RpcError as err:
                logging.debug("cache-money unavailable, lease not released: %s", err)

        def wrapper(*args):
            entry = key(*args)
            written_tags = list(tags(*args)) if tags else []
            found, value, token, write = lookup(entry, written_tags)
            if found:
                return value
            started = time.monotonic()
            try:
                result = fn(*args)
            except BaseException:
                if token:
                    release(entry, token)
                raise
            compute_ms = max(1, round((time.monotonic() - started) * 1000))
            if result is None or not write:  # as in the seed, None is not cached
                if token:
                    release(entry, token)
                return result
            value = json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode()
            try:
                written = pb.PutRequest(
                    key=entry,
                    value=value,
                    ttl_seconds=timeout,
                    tags=written_tags,
                    lease_token=token,
                    compute_ms=compute_ms,
                )
                if stub.Put(written, timeout=DEADLINE_SECONDS).refused:
                    logging.debug("%s: busted while computing; returned, not cached", fn.__name__)
            except grpc.RpcError as err:
                logging.debug("cache-money unavailable, not stored: %s", err)
                if token:  # not written: let the next caller have the lease at once
                    release(entry, token)
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
