"""Coroutine stages: fetch 200 pages from a slow local HTTP server, 50 requests in flight at once.

A synchronous script written with plain ``for`` loops, whose fetch step is an ``async def`` using
aiohttp: threadpipe runs it on an event loop of its own, so the script needs to know nothing about
event loops, and 50 requests in flight cost no more threads than one. The stage's client session is
its resource (``resource=aiohttp.ClientSession``): made once on the run's loop, passed to every
call, closed on that loop when the stage is done, so nothing is left unclosed.

The server is local (127.0.0.1, a free port), made with aiohttp; it answers each request after
``--latency-ms`` milliseconds, standing for the network. Needs aiohttp (``pip install -e
".[test]"`` brings it). Run::

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

import aiohttp
from aiohttp import web

import threadpipe as tp

# ------------------------------------------------------------------ a slow local server


@contextmanager
def local_server(latency: float) -> Iterator[int]:
    """Serve on 127.0.0.1 from a thread of its own for the duration of the block; yield the port."""

    async def page(request: web.Request) -> web.Response:
        await asyncio.sleep(latency)  # the "network"
        return web.Response(text=f"<html><body>page {request.path} says hello</body></html>")

    ready = threading.Event()
    started: dict[str, object] = {}

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", page)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=256)
        await site.start()
        stop = asyncio.Event()
        started.update(port=runner.addresses[0][1], stop=stop, loop=asyncio.get_running_loop())
        ready.set()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="example-server")
    thread.start()
    ready.wait()
    try:
        yield started["port"]  # type: ignore[misc]
    finally:
        loop, stop = started["loop"], started["stop"]
        loop.call_soon_threadsafe(stop.set)  # type: ignore[attr-defined]
        thread.join()


# ------------------------------------------------------------------ the pipeline's stages


async def fetch(url: str, session: aiohttp.ClientSession) -> bytes:
    """GET ``url`` with the stage's session; return the body. Runs on the run's event loop."""
    async with session.get(url) as response:
        response.raise_for_status()
        return await response.read()


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
            # async def: up to 50 coroutines in flight, sharing one session.
            .map(fetch, workers=args.in_flight, resource=aiohttp.ClientSession)
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
