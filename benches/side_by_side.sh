#!/usr/bin/env bash
# Two servers side by side in front of one Redis, timed alternately at one caller: a setting's
# effect, with the host's drift falling on both alike (seconds apart instead of the minutes
# between two runs of cm_bench).
#
#   cargo build --release --bins
#   benches/side_by_side.sh "--redis-busy-poll-us 0" ""          # A's flags, then B's
#
# Starts redis-server and both servers on free loopback ports (metrics on), stores one 64-byte
# entry, then PAIRS times (default 6) measures A, B, B, A with h2load (1 connection, 1 stream,
# REQUESTS Gets, default 20000): µs per Get, the server's own Redis hop (the mean of its store
# command histogram over those Gets) and its CPU per Get (user + system, /proc). Needs h2load
# (nghttp2-client), redis-server, curl and python3.
set -euo pipefail

A_FLAGS=${1?"A's flags, e.g. \"--redis-busy-poll-us 0\""}
B_FLAGS=${2-}
PAIRS=${PAIRS:-6}
REQUESTS=${REQUESTS:-20000}
cd "$(dirname "$0")/.."
SERVER=$PWD/target/release/cache-money-server
CLI=$PWD/target/release/cache-money
for tool in h2load redis-server redis-cli curl python3; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
[ -x "$SERVER" ] && [ -x "$CLI" ] || { echo "needs $SERVER: cargo build --release --bins" >&2; exit 1; }
for var in $(compgen -e | grep '^CACHE_MONEY_' || true); do unset "$var"; done

work=$(mktemp -d)
running=()
trap 'for pid in "${running[@]}"; do kill "$pid" 2>/dev/null || true; done; wait; rm -rf "$work"' EXIT
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_for() {
    for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "did not start: $*" >&2
    exit 1
}

# The framed GetRequest of benches/instructions.sh: bench/get/<32 zeros>.
digest=00000000000000000000000000000000
python3 - "$work/get.bin" "$digest" <<'PY'
import struct, sys
def field(number, payload):
    return bytes([number << 3 | 2, len(payload)]) + payload
key = field(1, b"bench") + field(2, b"get") + field(3, sys.argv[2].encode())
message = field(1, key)
open(sys.argv[1], "wb").write(b"\0" + struct.pack(">I", len(message)) + message)
PY

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
running+=($!)
wait_for redis-cli -p "$redis_port" ping
declare -A port metrics pid
for side in A B; do
    port[$side]=$(free_port)
    metrics[$side]=$(free_port)
    flags=A_FLAGS
    [ "$side" = B ] && flags=B_FLAGS
    # shellcheck disable=SC2086 # the flags are words
    "$SERVER" --listen "127.0.0.1:${port[$side]}" --metrics-listen "127.0.0.1:${metrics[$side]}" \
        --redis-url "redis://127.0.0.1:$redis_port" ${!flags} >"$work/$side.log" 2>&1 &
    pid[$side]=$!
    running+=("${pid[$side]}")
    wait_for "$CLI" --server "http://127.0.0.1:${port[$side]}" health
done
"$CLI" --server "http://127.0.0.1:${port[A]}" put bench get --digest "$digest" \
    "\"$(printf 'x%.0s' $(seq 62))\"" >/dev/null

# The store histogram's GET sum and count, and the server's CPU ticks.
reading() {
    curl -s "127.0.0.1:${metrics[$1]}/metrics" | awk '
        /^cache_money_store_command_duration_seconds_sum[{]command="GET"[}]/ { sum = $2 }
        /^cache_money_store_command_duration_seconds_count[{]command="GET"[}]/ { count = $2 }
        END { print sum + 0, count + 0 }'
    awk '{ print $14 + $15 }' "/proc/${pid[$1]}/stat"
}

measure() {
    local side=$1 n=$2 before after rate
    before=$(reading "$side")
    rate=$(h2load -H 'content-type: application/grpc' -H 'te: trailers' -d "$work/get.bin" \
        "http://127.0.0.1:${port[$side]}/cache_money.v1.CacheMoney/Get" -n "$n" -c 1 -m 1 |
        awk '/^finished in/ { print $4 }')
    after=$(reading "$side")
    python3 - "$side" "$n" "$rate" "$before" "$after" "$(getconf CLK_TCK)" <<'PY'
import sys
side, n, rate, before, after, tck = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split(), sys.argv[5].split(), int(sys.argv[6])
hop = (float(after[0]) - float(before[0])) / (float(after[1]) - float(before[1])) * 1e6
cpu = (float(after[2]) - float(before[2])) / tck / n * 1e6
print(f"{side}: {1e6 / rate:6.1f} µs per Get, Redis hop {hop:5.1f} µs, server CPU {cpu:5.1f} µs per Get")
PY
}

# Warm-up, not reported.
measure A 2000 >/dev/null
measure B 2000 >/dev/null
echo "A: ${A_FLAGS:-(defaults)}; B: ${B_FLAGS:-(defaults)}; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
for _ in $(seq "$PAIRS"); do
    measure A "$REQUESTS"
    measure B "$REQUESTS"
    measure B "$REQUESTS"
    measure A "$REQUESTS"
done
