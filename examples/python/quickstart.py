"""The seed's walkthrough in Python, sharing entries with Rust's examples/quickstart.rs.

From the repository root, with the stubs generated into gen/ and a server running (README):
    PYTHONPATH=gen:examples/python .venv/bin/python examples/python/quickstart.py
Set CACHE_MONEY_SERVER (as for the `cache-money` CLI) to use another server than
http://127.0.0.1:50051; this example speaks plaintext only.
"""

import os

from cache_money_client import CACHE_HOUR, cached, connect

server = os.environ.get("CACHE_MONEY_SERVER", "http://127.0.0.1:50051")
if not server.startswith("http://"):
    raise SystemExit(f"CACHE_MONEY_SERVER={server}: give an http:// URL (this example has no TLS)")
stub = connect(server.removeprefix("http://"))


@cached(stub, timeout=CACHE_HOUR)
def addition(a, b):  # run as a script: namespace "__main__", function "addition"
    print(f"  computing addition({a}, {b})")
    return a + b


print(f"addition(3, 4) = {addition(3, 4)}")
print(f"addition(3, 4) = {addition(3, 4)}   (again: no 'computing' line when cached)")
print(f"bust addition(3, 4): removed {addition.bust(3, 4)}")
print(f"addition(3, 4) = {addition(3, 4)}")
print(f"addition.bust_all(): removed {addition.bust_all()}")
