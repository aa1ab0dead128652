"""Upload records in batches to a flaky, rate-limited service: batch + retries + rate + resources.

A local HTTP server on 127.0.0.1 stands for the service. It takes JSON batches by POST, answers
503 to about one request in five (a flaky service), and refuses with 429 any client that sends
more than --rate requests a second. The pipeline groups records into batches of --batch (a
partial batch leaves after --flush seconds), posts them from --workers threads that each own one
HTTP connection (``resource=``), retries a failed post with exponential backoff (``retries=``), and
keeps the whole stage under the service's rate (``rate=``). At the end it checks that the server
received every record exactly once.

    python examples/batch_upload.py
    python examples/batch_upload.py --records 2000 --batch 50 --rate 40 --workers 8
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import threadpipe as tp


class Flaky(Exception):
    """The service answered with an error status: worth retrying."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with serve(args.rate) as (port, received):
        start = time.perf_counter()
        run = (
            tp.Pipeline.from_iter({"id": i, "value": i * i} for i in range(args.records))
            .batch(args.batch, timeout=args.flush)
            .map(
                post,
                workers=args.workers,
                retries=8,  # a batch fails 9 times in a row once in 2 million
                retry_delay=0.02,
                retry_on=Flaky,
                rate=args.rate * 0.9,  # a little under the service's limit
                resource=lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=10),
                name="upload",
            )
            .start()
        )
        with run:
            uploaded = sum(run)
        seconds = time.perf_counter() - start
        ids = sorted(record["id"] for record in received)
        stats = {s.name: s for s in run.stats()}
        print(f"uploaded {uploaded} records in {stats['upload'].items_in} batches in {seconds:.2f} s")
        print(f"server saw {len(received)} records, {len(set(ids))} distinct")
        print(f"posts retried after a 503: {Handler.failures}; refused for the rate: {Handler.refused}")
        ok = ids == list(range(args.records))
        print("every record exactly once:", "yes" if ok else "NO")
        return 0 if ok else 1


def post(batch: list[dict[str, int]], conn: http.client.HTTPConnection) -> int:
    """POST one batch on this worker's connection; raise Flaky on an error status."""
    body = json.dumps(batch).encode()
    conn.request("POST", "/records", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise Flaky(f"HTTP {response.status}")
    return len(batch)


class Handler(http.server.BaseHTTPRequestHandler):
    """The service: takes batches, fails about one POST in five, refuses clients over the rate."""

    protocol_version = "HTTP/1.1"  # keep-alive: each worker's connection is reused
    received: list[dict[str, int]] = []
    lock = threading.Lock()
    rate = 50.0
    last = 0.0
    failures = 0
    refused = 0
    rng = random.Random(7)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        cls = Handler
        with cls.lock:
            now = time.monotonic()
            # 0.8 of the interval: the client's limiter spaces calls, but network jitter may
            # bring two a little closer than the nominal interval.
            too_fast = now - cls.last < 0.8 / cls.rate
            cls.last = now
            status = 429 if too_fast else 503 if cls.rng.random() < 0.2 else 200
            if status == 200:
                cls.received.extend(json.loads(body))
            elif status == 503:
                cls.failures += 1
            else:
                cls.refused += 1
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet


@contextmanager
def serve(rate: float) -> Iterator[tuple[int, list[dict[str, int]]]]:
    """Run the service on an ephemeral port of 127.0.0.1 for the duration of the block."""
    Handler.received = []
    Handler.rate = rate
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="service", daemon=True)
    thread.start()
    try:
        yield server.server_address[1], Handler.received
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--flush", type=float, default=0.2, help="seconds a partial batch waits")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=50.0, help="requests/s the service allows")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
