#!/usr/bin/env python3
"""Where one caller's hit spends its wall-clock time, hop by hop (BENCHMARKS.md, "One caller
against the floor").

While a one-caller loop runs (examples/hit_loop.rs against a cache-money server on the Redis
store), records the client's, server's and Redis's socket syscalls on every CPU for a moment
(kernel tracepoints through `perf record -a`, no ptrace), pairs each request's events across
the three processes, and prints each segment's p50 and mean and how often it crossed to the
other CPU. Tracing adds about a microsecond per event, so read the segments against each
other, not as untraced latencies.

    cargo build --release --bins --examples
    redis-server --port 6399 --save '' &
    target/release/cache-money-server --listen 127.0.0.1:50051 --redis-url redis://127.0.0.1:6399 &
    target/release/examples/hit_loop http://127.0.0.1:50051 30 &
    sleep 3; python3 benches/critical_path.py       # as root (or with sudo)

Needs perf (Debian: linux-perf) and root: the syscall tracepoints live in tracefs. Standard
library only. The server must run one runtime thread (--worker-threads 1, the default): events
are told apart by thread name. Options: --seconds S (0.3), --client/--server/--redis COMM
(thread names as the kernel truncates them: hit_loop, cache-money-ser, redis-server).
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
    "client starts its request -> server has read it all",
    "server has the request -> writes the Redis command",
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
            ["perf", "script", "--ns", "-i", data.name, "-F", "comm,tid,cpu,time,event,trace"],
            check=True,
            capture_output=True,
            text=True,
        )
    return script.stdout.splitlines()


def returned_value(text):
    """A syscall's return value: the kernel prints it as an unsigned hex word, so an error
    (-11, EAGAIN) reads 0xfffffffffffffff5."""
    try:
        value = int(text.strip(), 16)
    except ValueError:
        return None
    return value - (1 << 64) if value >= 1 << 63 else value


def parse(lines, comms):
    """(µs, comm, cpu, event, fd, returned) per event of `comms`, in perf's order (by time;
    events of one microsecond keep theirs). An exit carries the fd of its thread's last
    enter."""
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
            returned = returned_value(rest)
        events.append((float(when) * 1e6, comm, int(cpu), event, fd, returned))
    events.sort(key=lambda event: event[0])
    return events


def read_some(event):
    """Whether `event` is a read (recvfrom or read) that returned data."""
    return event[3] in ("sys_exit_recvfrom", "sys_exit_read") and (event[5] or 0) > 0


def connections(events, client, server, redis):
    """The server's fd towards its client, its fd towards Redis, and Redis's fd towards the
    server: whose read follows each of the server's writes."""
    votes = collections.Counter()
    for n, (_, comm, _, event, fd, _) in enumerate(events):
        if comm != server or event != "sys_enter_writev":
            continue
        for later in events[n + 1 : n + 60]:
            if later[1] == redis and read_some(later):
                votes[("redis", fd, later[4])] += 1
                break
            if later[1] == client and read_some(later):
                votes[("client", fd, None)] += 1
                break
    by_role = {}
    for (role, fd, peer), _ in votes.most_common():
        by_role.setdefault(role, (fd, peer))
    if len(by_role) < 2 or by_role["client"][0] == by_role["redis"][0]:
        sys.exit("could not tell the server's connections apart: is the loop running?")
    return by_role["client"][0], *by_role["redis"]


def requests(events, names, client_fd, redis_fd, redis_peer_fd):
    """Per request, the nine events that bound its eight segments. The second is the
    server's last read of the request before it writes the Redis command (a request often
    arrives as HEADERS, then DATA)."""
    client, server, redis = names
    server_read = lambda e: e[1] == server and read_some(e) and e[4] == client_fd
    steps = [
        lambda e: e[1] == client and e[3] == "sys_enter_writev",
        server_read,
        lambda e: e[1] == server and e[3] == "sys_enter_writev" and e[4] == redis_fd,
        lambda e: e[1] == redis and read_some(e) and e[4] == redis_peer_fd,
        lambda e: e[1] == redis and e[3] in ("sys_enter_write", "sys_enter_writev")
        and e[4] == redis_peer_fd,
        lambda e: e[1] == server and read_some(e) and e[4] == redis_fd,
        lambda e: e[1] == server and e[3] == "sys_enter_writev" and e[4] == client_fd,
        lambda e: e[1] == client and read_some(e),
        lambda e: e[1] == client and e[3] == "sys_enter_writev",
    ]
    found, n = [], 0
    while True:
        at = []
        for step in steps:
            while n < len(events) and not step(events[n]):
                n += 1
            if n == len(events):
                return found
            at.append(n)
        # The request is whole at the server's last read of it before the Redis command.
        at[1] = max(k for k in range(at[1], at[2]) if server_read(events[k]))
        found.append([events[k] for k in at])
        # The next request starts at this one's last mark.


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--client", default="hit_loop")
    parser.add_argument("--server", default="cache-money-ser")
    parser.add_argument("--redis", default="redis-server")
    args = parser.parse_args()
    names = (args.client, args.server, args.redis)
    events = parse(record(args.seconds), set(names))
    found = requests(events, names, *connections(events, *names))
    if len(found) < 10:
        sys.exit(f"only {len(found)} requests paired: is the loop running?")
    # A request whose marks were lost (perf drops events under load) spans two or more:
    # cycles far past the median are left out, and counted.
    typical = statistics.median(marks[-1][0] - marks[0][0] for marks in found)
    kept = [marks for marks in found if marks[-1][0] - marks[0][0] <= 5 * typical]
    cycle = [marks[-1][0] - marks[0][0] for marks in kept]
    print(f"{len(kept)} requests ({len(found) - len(kept)} left out as over 5× the median); "
          f"cycle p50 {statistics.median(cycle):.1f} µs, mean {statistics.mean(cycle):.1f} µs")
    found = kept
    for n, name in enumerate(SEGMENTS):
        spans = [marks[n + 1][0] - marks[n][0] for marks in found]
        crossed = sum(marks[n + 1][2] != marks[n][2] for marks in found) / len(found)
        print(f"  {name:<55} p50 {statistics.median(spans):6.1f} µs  "
              f"mean {statistics.mean(spans):6.1f} µs  other CPU {crossed:4.0%}")


if __name__ == "__main__":
    main()
