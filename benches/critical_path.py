#!/usr/bin/env python3
"""Where one caller's hit spends its wall-clock time, hop by hop (BENCHMARKS.md, "One caller
against the floor").

While a one-caller loop runs (examples/hit_loop.rs against a cache-money server on the Redis
store), records the client's, server's and Redis's socket syscalls on every CPU for a moment
(kernel tracepoints through `perf record -a`, no ptrace), pairs each request's events across
the three processes, and prints each segment's p50 and mean and how often it crossed to the
other CPU. Tracing adds about a microsecond per event, so read the segments against each
other, not as untraced latencies.

    redis-server --port 6399 --save '' &
    cargo run --release -- --listen 127.0.0.1:50051 --redis-url redis://127.0.0.1:6399 &
    cargo run --release --example hit_loop -- http://127.0.0.1:50051 30 &
    sudo python3 benches/critical_path.py            # after a few seconds of the loop

Needs perf with tracepoint access (root, or kernel.perf_event_paranoid <= -1). Standard
library only. Options: --seconds S (0.3), --client/--server/--redis COMM (process names as the
kernel truncates them: hit_loop, cache-money-ser, redis-server).
"""

import argparse
import collections
import re
import statistics
import subprocess
import sys
import tempfile

# Only what the pairing reads, since every traced event slows the processes a little: the
# writes' enters (they name the fd) and the reads' enters and exits (the exit says how much).
EVENTS = [
    "syscalls:sys_enter_writev",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_write",
    "syscalls:sys_enter_recvfrom",
    "syscalls:sys_exit_recvfrom",
    "syscalls:sys_enter_read",
    "syscalls:sys_exit_read",
]
LINE = re.compile(r"^\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)$")
SEGMENTS = [
    "client writes its request -> server reads it",
    "server reads the request -> writes the Redis command",
    "Redis command written -> Redis reads it",
    "Redis reads the command -> writes the reply",
    "Redis reply written -> server reads it",
    "server reads the reply -> writes the response",
    "response written -> client reads it",
    "client reads the response -> writes its next request",
]


def record(seconds):
    """`perf script` lines of every event in EVENTS on every CPU for `seconds`."""
    with tempfile.NamedTemporaryFile(suffix=".data") as data:
        subprocess.run(
            ["perf", "record", "-q", "-a", "-o", data.name]
            + [arg for event in EVENTS for arg in ("-e", event)]
            + ["--", "sleep", str(seconds)],
            check=True,
        )
        script = subprocess.run(
            ["perf", "script", "-i", data.name, "-F", "comm,tid,cpu,time,event,trace"],
            check=True,
            capture_output=True,
            text=True,
        )
    return script.stdout.splitlines()


def parse(lines, comms):
    """(µs, comm, cpu, event, fd, returned) per event of `comms`, in time order. An exit
    carries the fd of its thread's last enter."""
    events, last_fd = [], {}
    for line in lines:
        match = LINE.match(line)
        if not match or match.group(1) not in comms:
            continue
        comm, tid, cpu, when, event, rest = match.groups()
        event = event.split(":")[-1].replace("sendto", "writev")
        fd = returned = None
        if "sys_enter" in event:
            found = re.search(r"fd: 0x([0-9a-f]+)", rest)
            fd = last_fd[tid] = int(found.group(1), 16) if found else None
        elif "sys_exit" in event:
            fd = last_fd.get(tid)
            try:
                returned = int(rest.strip(), 0)
            except ValueError:
                returned = None
        events.append((float(when) * 1e6, comm, int(cpu), event, fd, returned))
    events.sort()
    return events


def server_fds(events, client, server, redis):
    """The server's Redis connection (its writes Redis reads next) and its client's."""
    votes = collections.Counter()
    for n, (_, comm, _, event, fd, _) in enumerate(events):
        if comm != server or event != "sys_enter_writev":
            continue
        for _, other, _, later, _, returned in events[n + 1 : n + 60]:
            if other == redis and later == "sys_exit_read" and returned:
                votes[(fd, "redis")] += 1
                break
            if other == client and later == "sys_exit_recvfrom" and returned:
                votes[(fd, "client")] += 1
                break
    by_role = {}
    for (fd, role), _ in votes.most_common():
        by_role.setdefault(role, fd)
    if len(by_role) < 2:
        sys.exit("could not tell the server's connections apart: is the loop running?")
    return by_role["client"], by_role["redis"]


def requests(events, client, server, redis, client_fd, redis_fd):
    """Per request, the nine events that bound its eight segments."""
    steps = [
        lambda e: e[1] == client and e[3] == "sys_enter_writev",
        lambda e: e[1] == server and e[3] == "sys_exit_recvfrom" and e[4] == client_fd and e[5],
        lambda e: e[1] == server and e[3] == "sys_enter_writev" and e[4] == redis_fd,
        lambda e: e[1] == redis and e[3] == "sys_exit_read" and e[5],
        lambda e: e[1] == redis and e[3] in ("sys_enter_write", "sys_enter_writev"),
        lambda e: e[1] == server and e[3] == "sys_exit_recvfrom" and e[4] == redis_fd and e[5],
        lambda e: e[1] == server and e[3] == "sys_enter_writev" and e[4] == client_fd,
        lambda e: e[1] == client and e[3] == "sys_exit_recvfrom" and e[5],
        lambda e: e[1] == client and e[3] == "sys_enter_writev",
    ]
    found, n = [], 0
    while True:
        marks = []
        for step in steps:
            while n < len(events) and not step(events[n]):
                n += 1
            if n == len(events):
                return found
            marks.append(events[n])
        # The next request starts at this one's last mark.
        found.append(marks)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--client", default="hit_loop")
    parser.add_argument("--server", default="cache-money-ser")
    parser.add_argument("--redis", default="redis-server")
    args = parser.parse_args()
    names = (args.client, args.server, args.redis)
    events = parse(record(args.seconds), set(names))
    client_fd, redis_fd = server_fds(events, *names)
    found = requests(events, *names, client_fd, redis_fd)
    if len(found) < 10:
        sys.exit(f"only {len(found)} requests paired: is the loop running?")
    cycle = [marks[-1][0] - marks[0][0] for marks in found]
    print(f"{len(found)} requests; cycle p50 {statistics.median(cycle):.1f} µs, "
          f"mean {statistics.mean(cycle):.1f} µs")
    for n, name in enumerate(SEGMENTS):
        spans = [marks[n + 1][0] - marks[n][0] for marks in found]
        crossed = sum(marks[n + 1][2] != marks[n][2] for marks in found) / len(found)
        print(f"  {name:<55} p50 {statistics.median(spans):6.1f} µs  "
              f"mean {statistics.mean(spans):6.1f} µs  other CPU {crossed:4.0%}")


if __name__ == "__main__":
    main()
