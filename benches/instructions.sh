#!/usr/bin/env bash
# The server's instructions per Get hit (Redis store), counted by callgrind: unlike a timing,
# the count does not move with what else the machine is doing, so two builds compare exactly
# (user space only; the kernel's share of a request is not counted).
#
#   cargo build --release --bins
#   benches/instructions.sh [SERVER ...]      # default: target/release/cache-money-server
#
# For each server binary: starts redis-server and the server (under valgrind's callgrind) on
# free loopback ports, stores one 64-byte entry, warms up with 2,000 Gets, then counts the
# instructions of REQUESTS Gets from h2load (CONNECTIONS x STREAMS at a time; defaults 20000,
# 4, 13: the bench's 50 callers; CONNECTIONS=1 STREAMS=1 for one caller), checks with the
# server's own counts that every one was a hit, and prints the instructions per Get. Needs
# valgrind, h2load (nghttp2-client), redis-server and python3. KEEP=DIR keeps each callgrind
# profile there (callgrind_annotate DIR/<n>.out).
set -euo pipefail

REQUESTS=${REQUESTS:-20000}
CONNECTIONS=${CONNECTIONS:-4}
STREAMS=${STREAMS:-13}
servers=()
for server in "$@"; do servers+=("$(realpath "$server")"); done
[ -z "${KEEP:-}" ] || KEEP=$(realpath -m "$KEEP")
cd "$(dirname "$0")/.."
[ ${#servers[@]} -gt 0 ] || servers=("$PWD/target/release/cache-money-server")
CLI=$PWD/target/release/cache-money
for tool in valgrind callgrind_control callgrind_annotate h2load redis-server redis-cli python3; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
[ -x "$CLI" ] || { echo "needs $CLI: cargo build --release --bins" >&2; exit 1; }
# The servers' defaults, whatever this shell sets: logging changes the count, and the CLI's
# output is parsed below.
for var in $(compgen -e | grep '^CACHE_MONEY_' || true); do unset "$var"; done
export RUST_LOG=info

work=$(mktemp -d)
running=()
stop() {
    for pid in "${running[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${running[@]}"; do wait "$pid" 2>/dev/null || true; done
    running=()
}
trap 'stop; rm -rf "$work"' EXIT

# Says why, with the server's output when there is some, and stops.
fail() {
    echo "$1" >&2
    if [ -n "${2:-}" ]; then
        echo "--- the server's output:" >&2
        cat "$2" >&2
    fi
    exit 1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Until the command succeeds, for at most 60 s (a server under callgrind starts ~50x slower).
wait_for() {
    for _ in $(seq 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    return 1
}

# The server on port $1's count of $2 (hits, misses, errors), from `cache-money stats`.
count() {
    "$CLI" --server "http://127.0.0.1:$1" stats | awk -v name="$2" '$1 == name { print $2 }'
}

# A framed gRPC GetRequest for bench/get/<32 zeros>, for h2load.
digest=00000000000000000000000000000000
python3 benches/get_request.py "$work/get.bin" "$digest"

n=0
for server in "${servers[@]}"; do
    n=$((n + 1))
    log=$work/$n.log
    redis_port=$(free_port)
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
    running+=($!)
    wait_for redis-cli -p "$redis_port" ping || fail "redis-server did not start"
    port=$(free_port)
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/$n.out" \
        "$server" --listen "127.0.0.1:$port" --redis-url "redis://127.0.0.1:$redis_port" \
        >"$log" 2>&1 &
    valgrind_pid=$!
    running+=("$valgrind_pid")
    wait_for "$CLI" --server "http://127.0.0.1:$port" health || fail "$server did not start" "$log"
    "$CLI" --server "http://127.0.0.1:$port" put bench get --digest "$digest" \
        "\"$(printf 'x%.0s' $(seq 62))\"" >/dev/null || fail "the Put failed" "$log"
    get=(h2load -H 'content-type: application/grpc' -H 'te: trailers' -d "$work/get.bin"
        "http://127.0.0.1:$port/cache_money.v1.CacheMoney/Get")
    "${get[@]}" -n 2000 -c "$CONNECTIONS" -m "$STREAMS" >/dev/null || fail "h2load failed" "$log"
    hits=$(count "$port" hits) misses=$(count "$port" misses) errors=$(count "$port" errors)
    callgrind_control -i on "$valgrind_pid" >/dev/null 2>&1 || fail "callgrind_control -i on failed" "$log"
    "${get[@]}" -n "$REQUESTS" -c "$CONNECTIONS" -m "$STREAMS" >"$work/h2load.txt" ||
        fail "h2load failed" "$log"
    callgrind_control -i off "$valgrind_pid" >/dev/null 2>&1 || fail "callgrind_control -i off failed" "$log"
    callgrind_control -d "$valgrind_pid" >/dev/null 2>&1 || fail "callgrind_control -d failed" "$log"
    # Every measured Get a hit, by the server's own counts: h2load's "succeeded" counts HTTP
    # statuses, and a gRPC error is an HTTP 200.
    hits=$(($(count "$port" hits) - hits))
    misses=$(($(count "$port" misses) - misses))
    errors=$(($(count "$port" errors) - errors))
    if [ "$hits" != "$REQUESTS" ] || [ "$misses" != 0 ] || [ "$errors" != 0 ]; then
        fail "$server: of $REQUESTS Gets $hits hit, $misses missed, $errors failed" "$log"
    fi
    total=$(callgrind_annotate "$work/$n.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(/,/, "", $1); print $1 }')
    [ -n "$total" ] || fail "no total in callgrind's profile" "$log"
    echo "$server: $((total / REQUESTS)) instructions per Get (${CONNECTIONS}x${STREAMS}, $REQUESTS Gets)"
    if [ -n "${KEEP:-}" ]; then
        mkdir -p "$KEEP"
        cp "$work/$n.out.1" "$KEEP/$n.out"
    fi
    stop
done
