"""Summarise a log by host, up to a marker line: take_while + group_by over a local file.

The script first writes a log of its own to a temporary directory: request lines from a few hosts,
interleaved, then a marker line (``=== log rotated ===``) and the lines of the next period, which
this report must not read. The pipeline reads the file line by line and

* stops at the marker (``take_while``): the run ends there, the file is read no further and is
  closed by the feeder;
* parses each line (two threads, in order);
* groups the requests by host (``group_by``), at most --group lines a group; a group that has
  waited --flush seconds leaves partial (for a log still being written), and at the end every
  open group leaves, oldest first;
* summarises each group (lines, errors, total milliseconds).

It adds the summaries up per host and checks them against a plain loop over the same lines.

    python examples/group_logs.py
    python examples/group_logs.py --lines 20000 --hosts 8 --group 200
"""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import threadpipe as tp

MARKER = "=== log rotated ==="


@dataclass(frozen=True)
class Request:
    """One parsed log line."""

    host: str
    status: int
    ms: int


def write_log(path: Path, lines: int, hosts: int, seed: int) -> int:
    """Write ``lines`` request lines, the marker two thirds of the way, return the lines before it."""
    rng = random.Random(seed)
    names = [f"web-{i + 1}" for i in range(hosts)]
    before = lines * 2 // 3
    with path.open("w", encoding="utf-8") as log:
        for i in range(lines):
            if i == before:
                log.write(f"{MARKER}\n")
            status = rng.choice([200] * 18 + [404, 500])
            log.write(
                f"2025-01-01T12:{i // 60 % 60:02d}:{i % 60:02d} {rng.choice(names)} "
                f"GET /items/{rng.randrange(1000)} {status} {rng.randrange(5, 120)}ms\n"
            )
    return before


def before_marker(line: str) -> bool:
    return not line.startswith(MARKER)


def parse(line: str) -> Request:
    _, host, _, _, status, ms = line.split()
    return Request(host, int(status), int(ms.removesuffix("ms")))


def host_of(request: Request) -> str:
    return request.host


def summarise(group: tuple[str, list[Request]]) -> tuple[str, int, int, int]:
    """A group's host, lines, server errors and total milliseconds."""
    host, requests = group
    errors = sum(r.status >= 500 for r in requests)
    return host, len(requests), errors, sum(r.ms for r in requests)


def plain_totals(path: Path) -> Counter[tuple[str, str]]:
    """The same totals, one line at a time, with no pipeline."""
    totals: Counter[tuple[str, str]] = Counter()
    with path.open(encoding="utf-8") as log:
        for line in itertools.takewhile(before_marker, log):
            request = parse(line)
            totals[request.host, "lines"] += 1
            totals[request.host, "errors"] += request.status >= 500
            totals[request.host, "ms"] += request.ms
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=3000, help="log lines to write (default 3000)")
    parser.add_argument("--hosts", type=int, default=5, help="hosts in the log (default 5)")
    parser.add_argument("--group", type=int, default=100, help="most lines a group (default 100)")
    parser.add_argument(
        "--flush", type=float, default=5.0, help="seconds before a partial group leaves (default 5)"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the log's contents")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="group-logs-") as folder:
        path = Path(folder) / "app.log"
        expected_lines = write_log(path, args.lines, args.hosts, args.seed)
        print(f"wrote {args.lines + 1} lines ({expected_lines} before the marker) to a temporary log")

        totals: Counter[tuple[str, str]] = Counter()
        groups = 0
        with path.open(encoding="utf-8") as log:
            pipeline = (
                tp.Pipeline.from_iter(log)
                .take_while(before_marker)  # the run ends at the marker: the file is read no further
                .map(parse, workers=2)
                .group_by(host_of, args.group, timeout=args.flush)
                .map(summarise)
            )
            for host, lines, errors, ms in pipeline:
                groups += 1
                totals[host, "lines"] += lines
                totals[host, "errors"] += errors
                totals[host, "ms"] += ms

        hosts = sorted({host for host, _ in totals})
        print(f"{'host':<8}{'lines':>7}{'errors':>8}{'mean ms':>9}")
        for host in hosts:
            lines = totals[host, "lines"]
            print(
                f"{host:<8}{lines:>7}{totals[host, 'errors']:>8}{totals[host, 'ms'] / lines:>9.1f}"
            )
        read = sum(totals[host, "lines"] for host in hosts)
        print(f"read {read} lines up to the marker, in {groups} groups of at most {args.group}")
        same = totals == plain_totals(path) and read == expected_lines
        print(f"the same totals as a plain loop: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
