"""The reference for cm_bench's memoize hit: the original Python library (cache-money 1.3.0
from PyPI), its `@cached` hit timed in-process by one caller against the same Redis.

    python benches/python_hit.py REDIS_PORT SECONDS

Prints one JSON line: hits per second, p50 and p99 in microseconds.
"""

import asyncio
import json
import sys
import time

from cache_money import cache_money, init_cache_money

COMPUTED = []


async def main(port: int, seconds: float) -> None:
    init_cache_money(host="127.0.0.1", port=port, prefix="pyref")

    @cache_money.cached(timeout=3600)
    async def profile(user_id):
        COMPUTED.append(user_id)
        return {"id": user_id, "name": "Ada Lovelace", "plan": "enterprise", "credits": 1200}

    await profile.bust(918273)
    await profile(918273)
    latencies = []
    started = time.perf_counter()
    end = started + seconds
    while time.perf_counter() < end:
        t = time.perf_counter_ns()
        value = await profile(918273)
        latencies.append(time.perf_counter_ns() - t)
        assert value["id"] == 918273
    elapsed = time.perf_counter() - started
    # Every timed call was a hit: the function ran once, before the loop.
    assert COMPUTED == [918273], f"the function ran {len(COMPUTED)} times"
    latencies.sort()
    print(
        json.dumps(
            {
                "per_second": len(latencies) / elapsed,
                "p50_us": latencies[len(latencies) // 2] / 1000,
                "p99_us": latencies[len(latencies) * 99 // 100] / 1000,
            }
        )
    )


asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
