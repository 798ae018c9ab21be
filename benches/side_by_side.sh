#!/usr/bin/env bash
# Two servers side by side in front of one Redis, timed alternately at one caller: a setting's
# effect, with the host's drift falling on both alike (seconds apart instead of the minutes
# between two runs of cm_bench).
#
#   cargo build --release --bins --example hit_loop
#   benches/side_by_side.sh "--redis-busy-poll-us 0" ""          # A's flags, then B's
#   A_SERVER=/tmp/old-server benches/side_by_side.sh "" ""         # two builds, same flags
#   CONNECTIONS=4 STREAMS=13 HIT_SECONDS=0 benches/side_by_side.sh "" ""   # under load
#
# Each side runs target/release/cache-money-server unless A_SERVER or B_SERVER names another
# binary.
# Starts redis-server and both servers on free loopback ports (metrics on) and stores one
# 64-byte entry. Then ROUNDS times (default 3) measures A, B, B, A with h2load (CONNECTIONS
# connections of STREAMS streams, default 1 and 1, REQUESTS Gets, default 20000): µs per Get
# (the inverse of the throughput), the server's own Redis hop (the mean of
# its store command histogram over those Gets, which also proves they all reached Redis) and
# its CPU per Get (user + system, /proc, in steps of one clock tick). Then, unless
# HIT_SECONDS=0, the same rounds of one caller's memoize hits through the client library
# (examples/hit_loop, HIT_SECONDS each, default 3): the p50. Ends with each side's medians.
# Needs h2load (nghttp2-client), redis-server, redis-cli, curl and python3.
set -euo pipefail

A_FLAGS=${1?"A's flags, e.g. \"--redis-busy-poll-us 0\""}
B_FLAGS=${2-}
ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-20000}
CONNECTIONS=${CONNECTIONS:-1}
STREAMS=${STREAMS:-1}
HIT_SECONDS=${HIT_SECONDS:-3}
declare -A server
for side in A B; do
    named=${side}_SERVER
    [ -z "${!named:-}" ] || server[$side]=$(realpath "${!named}")
done
cd "$(dirname "$0")/.."
for side in A B; do server[$side]=${server[$side]:-$PWD/target/release/cache-money-server}; done
CLI=$PWD/target/release/cache-money
HIT_LOOP=$PWD/target/release/examples/hit_loop
for tool in h2load redis-server redis-cli curl python3; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
for binary in "${server[A]}" "${server[B]}" "$CLI"; do
    [ -x "$binary" ] || { echo "needs $binary: cargo build --release --bins" >&2; exit 1; }
done
[ "$HIT_SECONDS" = 0 ] || [ -x "$HIT_LOOP" ] ||
    { echo "needs $HIT_LOOP: cargo build --release --example hit_loop (or HIT_SECONDS=0)" >&2; exit 1; }
for var in $(compgen -e | grep '^CACHE_MONEY_' || true); do unset "$var"; done

work=$(mktemp -d)
running=()
trap 'for pid in "${running[@]}"; do kill "$pid" 2>/dev/null || true; done; wait; rm -rf "$work"' EXIT
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# Until the command succeeds, for at most 10 s; else says so, with LOG's content if given.
wait_for() {
    for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "did not start: $*" >&2
    [ -z "${LOG:-}" ] || cat "$LOG" >&2
    exit 1
}

# A framed gRPC GetRequest for bench/get/<32 zeros>, for h2load.
digest=00000000000000000000000000000000
python3 benches/get_request.py "$work/get.bin" "$digest"

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
    "${server[$side]}" --listen "127.0.0.1:${port[$side]}" --metrics-listen "127.0.0.1:${metrics[$side]}" \
        --redis-url "redis://127.0.0.1:$redis_port" ${!flags} >"$work/$side.log" 2>&1 &
    pid[$side]=$!
    running+=("${pid[$side]}")
    LOG=$work/$side.log wait_for "$CLI" --server "http://127.0.0.1:${port[$side]}" health
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

# Appends one line to $work/results: SIDE and its figures.
measure() {
    local side=$1 n=$2 before after rate
    before=$(reading "$side")
    rate=$(h2load -H 'content-type: application/grpc' -H 'te: trailers' -d "$work/get.bin" \
        "http://127.0.0.1:${port[$side]}/cache_money.v1.CacheMoney/Get" -n "$n" -c "$CONNECTIONS" -m "$STREAMS" |
        awk '/^finished in/ { print $4 }')
    after=$(reading "$side")
    python3 - "$side" "$n" "$rate" "$before" "$after" "$(getconf CLK_TCK)" <<'PY' | tee -a "$work/results"
import sys
side, n, rate, tck = sys.argv[1], int(sys.argv[2]), float(sys.argv[3] or 0), int(sys.argv[6])
before, after = sys.argv[4].split(), sys.argv[5].split()
gets = float(after[1]) - float(before[1])
if gets != n:
    sys.exit(f"{side}: {n} Gets sent, {gets:.0f} reached Redis: failed calls or misses")
hop = (float(after[0]) - float(before[0])) / gets * 1e6
cpu = (float(after[2]) - float(before[2])) / tck / n * 1e6
print(f"{side} get {1e6 / rate:.1f} hop {hop:.1f} cpu {cpu:.1f}")
PY
}

# Appends SIDE's memoize-hit p50 to $work/results.
hits() {
    local p50
    p50=$("$HIT_LOOP" "http://127.0.0.1:${port[$1]}" "$HIT_SECONDS" | awk '/p50/ { print $4 }')
    echo "$1 memoize-p50 $p50" | tee -a "$work/results"
}

# Warm-up, not reported.
measure A 2000 >/dev/null
measure B 2000 >/dev/null
: >"$work/results"
echo "A: ${server[A]} ${A_FLAGS:-(defaults)}; B: ${server[B]} ${B_FLAGS:-(defaults)}; h2load ${CONNECTIONS}x$STREAMS;$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
for _ in $(seq "$ROUNDS"); do
    for side in A B B A; do measure "$side" "$REQUESTS"; done
done
if [ "$HIT_SECONDS" != 0 ]; then
    for _ in $(seq "$ROUNDS"); do
        for side in A B B A; do hits "$side"; done
    done
fi
python3 - "$work/results" <<'PY'
import statistics, sys
columns = {}
for line in open(sys.argv[1]):
    side, *pairs = line.split()
    for name, value in zip(pairs[::2], pairs[1::2]):
        columns.setdefault((side, name), []).append(float(value))
names = {"get": "h2load µs per Get", "hop": "Redis hop µs", "cpu": "server CPU µs per Get", "memoize-p50": "memoize hit p50 µs"}
for name, title in names.items():
    if ("A", name) in columns:
        a, b = statistics.median(columns["A", name]), statistics.median(columns["B", name])
        print(f"median {title}: A {a:.1f}, B {b:.1f} (B/A {b / a:.2f})")
PY
