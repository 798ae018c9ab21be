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
# 4, 13: the bench's 50 callers; CONNECTIONS=1 STREAMS=1 for one caller) and prints them per
# Get. Needs valgrind, h2load (nghttp2-client), redis-server and python3. KEEP=DIR keeps each
# callgrind profile there (callgrind_annotate DIR/<n>.out).
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${REQUESTS:-20000}
CONNECTIONS=${CONNECTIONS:-4}
STREAMS=${STREAMS:-13}
CLI=target/release/cache-money
[ $# -gt 0 ] || set -- target/release/cache-money-server
for tool in valgrind callgrind_control callgrind_annotate h2load redis-server redis-cli python3; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
[ -x "$CLI" ] || { echo "needs $CLI: cargo build --release --bins" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# until CMD succeeds, for at most 60 s (a server under callgrind starts ~50x slower)
wait_for() {
    for _ in $(seq 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "gave up waiting for: $*" >&2
    return 1
}

# A framed gRPC GetRequest for bench/get/<32 zeros>: 5-byte prefix, then the protobuf.
digest=00000000000000000000000000000000
python3 - "$work/get.bin" "$digest" <<'EOF'
import struct, sys
def field(number, payload):
    return bytes([number << 3 | 2, len(payload)]) + payload
key = field(1, b"bench") + field(2, b"get") + field(3, sys.argv[2].encode())
message = field(1, key)
open(sys.argv[1], "wb").write(b"\0" + struct.pack(">I", len(message)) + message)
EOF

n=0
for server in "$@"; do
    n=$((n + 1))
    redis_port=$(free_port)
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
    pids+=($!)
    wait_for redis-cli -p "$redis_port" ping
    port=$(free_port)
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/$n.out" \
        "$server" --listen "127.0.0.1:$port" --redis-url "redis://127.0.0.1:$redis_port" \
        >"$work/$n.log" 2>&1 &
    valgrind_pid=$!
    pids+=("$valgrind_pid")
    wait_for "$CLI" --server "http://127.0.0.1:$port" health
    "$CLI" --server "http://127.0.0.1:$port" put bench get --digest "$digest" "\"$(printf 'x%.0s' $(seq 62))\"" >/dev/null
    get=(h2load -H 'content-type: application/grpc' -H 'te: trailers' -d "$work/get.bin"
        "http://127.0.0.1:$port/cache_money.v1.CacheMoney/Get")
    "${get[@]}" -n 2000 -c "$CONNECTIONS" -m "$STREAMS" >/dev/null
    callgrind_control -i on "$valgrind_pid" >/dev/null 2>&1
    done_line=$("${get[@]}" -n "$REQUESTS" -c "$CONNECTIONS" -m "$STREAMS" | grep '^requests:')
    callgrind_control -i off "$valgrind_pid" >/dev/null 2>&1
    callgrind_control -d "$valgrind_pid" >/dev/null 2>&1
    succeeded=$(echo "$done_line" | sed -E 's/.* ([0-9]+) succeeded.*/\1/')
    [ "$succeeded" = "$REQUESTS" ] || { echo "$server: $done_line" >&2; exit 1; }
    # Hits, not misses: the server's own count says so.
    hits=$("$CLI" --server "http://127.0.0.1:$port" stats | awk '$1 == "hits" { print $2 }')
    [ "${hits:-0}" -ge "$REQUESTS" ] || { echo "$server: only ${hits:-0} of the Gets hit" >&2; exit 1; }
    total=$(callgrind_annotate "$work/$n.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(/,/, "", $1); print $1 }')
    echo "$server: $((total / REQUESTS)) instructions per Get (${CONNECTIONS}x${STREAMS}, $REQUESTS Gets)"
    if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$work/$n.out.1" "$KEEP/$n.out"; fi
    kill "$valgrind_pid" "${pids[-2]}" 2>/dev/null || true
    wait "$valgrind_pid" 2>/dev/null || true
done
