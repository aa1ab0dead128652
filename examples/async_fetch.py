"""Coroutine stages: fetch 200 pages from a slow local HTTP server, 50 requests in flight at once.

A synchronous script written with plain ``for`` loops, whose fetch step is an ``async def``:
threadpipe runs it on an event loop of its own, so the script needs to know nothing about event
loops, and 50 requests in flight cost no more threads than one.

The server is local (127.0.0.1, a free port), made with asyncio; it answers each request after
``--latency-ms`` milliseconds, standing for the network. Run::

    python examples/async_fetch.py [--pages 200] [--in-flight 50] [--latency-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import threadpipe as tp

# ------------------------------------------------------------------ a slow local server


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, latency: float
) -> None:
    request = await reader.readuntil(b"\r\n\r\n")
    path = request.split(b" ", 2)[1].decode()
    await asyncio.sleep(latency)  # the "network"
    body = f"<html><body>page {path} says hello</body></html>".encode()
    head = f"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


@contextmanager
def local_server(latency: float) -> Iterator[int]:
    """Serve on 127.0.0.1 from a thread of its own for the duration of the block; yield the port."""
    ready = threading.Event()
    port: list[int] = []
    stop: list[asyncio.Event] = []
    loop: list[asyncio.AbstractEventLoop] = []

    async def serve() -> None:
        server = await asyncio.start_server(
            lambda r, w: _handle(r, w, latency), "127.0.0.1", 0, backlog=256
        )
        port.append(server.sockets[0].getsockname()[1])
        stop.append(asyncio.Event())
        loop.append(asyncio.get_running_loop())
        ready.set()
        async with server:
            await stop[0].wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="example-server")
    thread.start()
    ready.wait()
    try:
        yield port[0]
    finally:
        loop[0].call_soon_threadsafe(stop[0].set)
        thread.join()


# ------------------------------------------------------------------ the pipeline's stages


async def fetch(url: str) -> bytes:
    """GET ``url`` (http://127.0.0.1:PORT/PATH); return the body. Runs on the run's event loop."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200"):
        raise OSError(f"{url}: {head.splitlines()[0]!r}")
    return body


def digest(body: bytes) -> str:
    """A little CPU work, in a plain thread stage."""
    return hashlib.sha256(body).hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--in-flight", type=int, default=50)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    latency = args.latency_ms / 1000

    with local_server(latency) as port:
        urls = [f"http://127.0.0.1:{port}/page/{i}" for i in range(args.pages)]
        pipeline = (
            tp.Pipeline.from_iter(urls)
            .map(fetch, workers=args.in_flight)  # async def: up to 50 coroutines in flight
            .map(digest, workers=2)  # plain def: two threads
        )
        started = time.perf_counter()
        run = pipeline.start()
        digests = []
        threads = 0
        for value in run:
            digests.append(value)
            threads = max(
                threads, sum(t.name.startswith("threadpipe-") for t in threading.enumerate())
            )
        elapsed = time.perf_counter() - started

    for url, value in list(zip(urls, digests, strict=True))[:3]:
        print(f"{url.split('/', 3)[3]:<10} {value}")
    print(f"... {len(digests)} pages in input order, {len(set(digests))} distinct digests")
    print(
        f"{len(digests)} pages in {elapsed:.2f} s with {args.in_flight} requests in flight and "
        f"{threads} threads; one at a time: {len(digests) * latency:.1f} s"
    )


if __name__ == "__main__":
    main()
