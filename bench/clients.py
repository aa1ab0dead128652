"""A real client: 2,000 pages from a local aiohttp server, 200 requests in flight, one session.

threadpipe (a coroutine stage with ``resource=aiohttp.ClientSession``) against the same job written
by hand with asyncio (one session, a semaphore of 200, ``asyncio.gather``), and against one session
per call (the only clean pattern before ``resource=`` existed for coroutine stages). Interleaved in
one process, median of the repeats. Run::

    python bench/clients.py [--pages 2000] [--in-flight 200] [--latency-ms 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web

import threadpipe as tp


def serve(latency: float) -> tuple[int, Callable[[], None]]:
    """Start the server in a thread of its own; return its port and a function that stops it."""
    ready = threading.Event()
    state: dict[str, object] = {}

    async def page(request: web.Request) -> web.Response:
        await asyncio.sleep(latency)
        return web.Response(text="page " + request.match_info["n"])

    def run() -> None:
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/{n}", page)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        loop.run_until_complete(site.start())
        state.update(loop=loop, port=runner.addresses[0][1])
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="bench-server")
    thread.start()
    ready.wait()
    loop = state["loop"]

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)  # type: ignore[attr-defined]
        thread.join()

    return state["port"], stop  # type: ignore[return-value]


def with_threadpipe(urls: list[str], in_flight: int) -> int:
    async def fetch(url: str, session: aiohttp.ClientSession) -> str:
        async with session.get(url) as response:
            return await response.text()

    pipeline = tp.Pipeline.from_iter(urls).map(
        fetch, workers=in_flight, resource=aiohttp.ClientSession, ordered=False
    )
    return pipeline.run()


def by_hand(urls: list[str], in_flight: int) -> int:
    async def main() -> int:
        limit = asyncio.Semaphore(in_flight)
        async with aiohttp.ClientSession() as session:

            async def fetch(url: str) -> str:
                async with limit, session.get(url) as response:
                    return await response.text()

            return len(await asyncio.gather(*(fetch(url) for url in urls)))

    return asyncio.run(main())


def session_per_call(urls: list[str], in_flight: int) -> int:
    async def fetch(url: str) -> str:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return await response.text()

    return tp.Pipeline.from_iter(urls).map(fetch, workers=in_flight, ordered=False).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    port, stop = serve(args.latency_ms / 1000)
    urls = [f"http://127.0.0.1:{port}/{i}" for i in range(args.pages)]
    ways = {
        "threadpipe, resource=ClientSession": with_threadpipe,
        "asyncio by hand, one session": by_hand,
        "threadpipe, a session per call": session_per_call,
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(args.repeats):
            for name, way in ways.items():  # interleaved: the machine's noise hits all alike
                started = time.perf_counter()
                count = way(urls, args.in_flight)
                times[name].append(time.perf_counter() - started)
                assert count == args.pages, (name, count)
    finally:
        stop()
    ideal = args.pages / args.in_flight * args.latency_ms / 1000
    print(
        f"{args.pages} pages, {args.in_flight} in flight, {args.latency_ms:g} ms each "
        f"(ideal {ideal:.2f} s); median of {args.repeats}, interleaved"
    )
    for name, values in times.items():
        print(f"  {name:<38} {statistics.median(values):6.2f} s  (min {min(values):.2f})")


if __name__ == "__main__":
    main()
