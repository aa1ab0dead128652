"""Resources with the real clients users call: aiohttp, requests, sqlite3, a process pool.

Everything runs against local servers on 127.0.0.1 (an aiohttp server, ``http.server``), a real
sqlite3 file and a real process pool; request loops are bounded in count and time.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from remote_calls import MakeProcessResource, which_resource

from threadpipe import Pipeline

# -------------------------------------------------------------------------- aiohttp, 200 in flight

_AIOHTTP_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, threading
    import aiohttp
    from aiohttp import web
    import threadpipe as tp

    PAGES = int(sys.argv[1])
    made = []

    def counted_session() -> aiohttp.ClientSession:
        made.append(aiohttp.ClientSession())
        return made[-1]

    async def page(request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)
        return web.Response(text="page " + request.match_info["n"])

    # The server: its own loop in its own thread, on 127.0.0.1 at a free port.
    ready = threading.Event()
    server = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/{n}", page)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        server["port"] = site._server.sockets[0].getsockname()[1]
        server["loop"], server["runner"] = loop, runner
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve)
    thread.start()
    ready.wait(30)
    base = f"http://127.0.0.1:{server['port']}/"

    async def fetch(n: int, session: aiohttp.ClientSession) -> str:
        async with session.get(base + str(n)) as response:
            return await response.text()

    # The contract: resource=aiohttp.ClientSession just works.
    pages = tp.Pipeline.from_iter(range(PAGES)).map(
        fetch, workers=200, resource=aiohttp.ClientSession, ordered=False
    ).to_list()
    assert sorted(pages) == sorted(f"page {n}" for n in range(PAGES)), pages[:3]
    # And the same through a factory that keeps the session: one, closed after the run.
    pages = tp.Pipeline.from_iter(range(PAGES)).map(
        fetch, workers=200, resource=counted_session
    ).to_list()
    assert pages == [f"page {n}" for n in range(PAGES)], pages[:3]
    assert len(made) == 1 and made[0].closed, made
    server["loop"].call_soon_threadsafe(server["loop"].stop)
    thread.join(30)
    print("ok", len(pages))
    """
)


def test_an_aiohttp_session_resource_serves_200_calls_in_flight_and_is_closed() -> None:
    """``resource=aiohttp.ClientSession`` just works: one session for the stage, made on the run's
    loop, closed on it before it stops. Run with ``-X dev -W error``: an unclosed session or
    transport (a ResourceWarning, asyncio's "Unclosed" report) fails the run."""
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", _AIOHTTP_SCRIPT, "400"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok 400"
    for sign in ("Unclosed", "ResourceWarning", "Exception ignored"):
        assert sign not in result.stderr, result.stderr[-3000:]


# ------------------------------------------------------------------ coroutine stage resource rules


class AsyncResource:
    """An async context manager that records how it was entered and exited, and on which thread."""

    instances: list[AsyncResource] = []

    def __init__(self) -> None:
        self.entered = False
        self.exited: tuple[Any, ...] | None = None
        self.thread = ""
        AsyncResource.instances.append(self)

    async def __aenter__(self) -> AsyncResource:
        self.entered = True
        self.thread = threading.current_thread().name
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await asyncio.sleep(0)
        self.exited = exc_info


@pytest.fixture
def resources() -> Iterator[list[AsyncResource]]:
    AsyncResource.instances = []
    yield AsyncResource.instances
    AsyncResource.instances = []


def test_a_coroutine_stage_makes_one_resource_on_the_runs_loop_and_exits_it_cleanly(
    resources: list[AsyncResource],
) -> None:
    async def call(x: int, resource: AsyncResource) -> tuple[int, int]:
        await asyncio.sleep(0)
        return x, id(resource)

    out = Pipeline.from_iter(range(50)).map(call, workers=10, resource=AsyncResource).to_list()
    assert [x for x, _ in out] == list(range(50))
    assert len(resources) == 1 and {r for _, r in out} == {id(resources[0])}
    resource = resources[0]
    assert resource.thread == "threadpipe-loop-0"
    assert resource.exited == (None, None, None)


def test_a_coroutine_stages_resource_sees_the_call_failure_that_ended_the_run(
    resources: list[AsyncResource],
) -> None:
    error = ValueError("bad item")

    async def call(x: int, resource: AsyncResource) -> int:
        if x == 7:
            raise error
        return x

    run = Pipeline.from_iter(range(20)).map(call, workers=4, resource=AsyncResource).start()
    with pytest.raises(ValueError) as info:
        run.join(timeout=10)  # the loop exits the resource as it shuts down, before join returns
    assert info.value is error
    (resource,) = resources
    assert resource.exited is not None and resource.exited[1] is error


def test_a_coroutine_stages_resource_exits_cleanly_on_cancel_and_on_another_stages_failure(
    resources: list[AsyncResource],
) -> None:
    started = threading.Event()

    async def wait_forever(x: int, resource: AsyncResource) -> int:
        started.set()
        await asyncio.sleep(3600)
        return x

    run = Pipeline.from_iter(range(5)).map(wait_forever, workers=2, resource=AsyncResource).start()
    assert started.wait(10)
    run.cancel()
    run.join(timeout=10)
    assert resources[0].exited == (None, None, None)  # cancelled: no failure to see

    def boom(x: int) -> int:
        raise KeyError(x)

    async def ok(x: int, resource: AsyncResource) -> int:
        return x

    run = Pipeline.from_iter(range(5)).map(ok, resource=AsyncResource).map(boom).start()
    with pytest.raises(KeyError):
        run.join(timeout=10)
    assert resources[1].exited == (None, None, None)  # another stage failed


def test_resource_on_an_executor_other_than_processes_is_refused_at_build_time() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool, pytest.raises(TypeError, match="executor='processes'"):
        Pipeline.from_iter([1]).map(which_resource, executor=pool, resource=object)


# ------------------------------------------------------------------ requests, a session per worker


class _Pages(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the handler's protocol
        body = f"page {self.path[1:]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    thread = threading.Thread(target=server.serve_forever, name="test-http-server")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class CountedSession(requests.Session):
    made: list[CountedSession] = []
    closed: list[CountedSession] = []

    def __init__(self) -> None:
        super().__init__()
        CountedSession.made.append(self)

    def close(self) -> None:
        super().close()
        CountedSession.closed.append(self)


def test_a_requests_session_per_worker_fetches_every_page_and_is_closed(http_server: str) -> None:
    CountedSession.made, CountedSession.closed = [], []

    def get(n: int, session: requests.Session) -> str:
        response = session.get(http_server + str(n), timeout=10)
        response.raise_for_status()
        return response.text

    pages = Pipeline.from_iter(range(60)).map(get, workers=4, resource=CountedSession).to_list()
    assert pages == [f"page {n}" for n in range(60)]
    assert 1 <= len(CountedSession.made) <= 4
    assert sorted(map(id, CountedSession.closed)) == sorted(map(id, CountedSession.made))


# ------------------------------------------------------------------ sqlite3: a failure rolls back


def _insert(db: Path, fail_at: int | None) -> Any:
    def insert(x: int, conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO items VALUES (?)", (x,))
        if x == fail_at:
            raise RuntimeError(f"failed after inserting {x}")
        return x

    return insert


def _count(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])
    finally:
        conn.close()


def test_a_sqlite3_connection_resource_commits_a_clean_run_and_rolls_back_a_failed_one(
    tmp_path: Path,
) -> None:
    db = tmp_path / "items.db"
    setup = sqlite3.connect(db)
    setup.execute("CREATE TABLE items (x INTEGER)")
    setup.commit()
    setup.close()
    connections: list[sqlite3.Connection] = []

    def connect() -> sqlite3.Connection:
        # check_same_thread=False only so that the test can close it afterwards.
        conn = sqlite3.connect(db, check_same_thread=False)
        connections.append(conn)
        return conn

    # A connection is a context manager: its exit commits, or rolls back given an exception.
    Pipeline.from_iter(range(10)).each(_insert(db, None), resource=connect).run()
    assert _count(db) == 10
    with pytest.raises(RuntimeError, match="failed after inserting 15"):
        Pipeline.from_iter(range(10, 20)).each(_insert(db, 15), resource=connect).run()
    assert _count(db) == 10, "the failed run's transaction was committed, not rolled back"
    for conn in connections:
        conn.close()


# ------------------------------------------------------------------ a resource per worker process


def test_a_process_stage_makes_its_resource_once_per_process_and_closes_it(tmp_path: Path) -> None:
    factory = MakeProcessResource(str(tmp_path))
    out = (
        Pipeline.from_iter(range(40))
        .map(which_resource, workers=2, executor="processes", resource=factory)
        .to_list()
    )
    assert len(out) == 40
    by_process: dict[int, set[str]] = {}
    for pid, resource_pid, token in out:
        assert pid == resource_pid != os.getpid()
        by_process.setdefault(pid, set()).add(token)
    assert all(len(tokens) == 1 for tokens in by_process.values()), by_process
    made = sorted(p.name.removeprefix("made-") for p in tmp_path.glob("made-*"))
    closed = sorted(p.name.removeprefix("closed-") for p in tmp_path.glob("closed-*"))
    assert len(made) <= 3  # at most one per process the pool started (2, and a spare replaced)
    assert set(made) >= {f"{pid}-{next(iter(t))}" for pid, t in by_process.items()}
    assert closed == made, "a process's resource was not closed when the pool shut down"


def test_a_process_resource_factory_must_pickle() -> None:
    with pytest.raises(Exception) as info:
        Pipeline.from_iter([1]).map(
            which_resource, executor="processes", resource=lambda: None
        ).to_list()
    assert any("resource factory" in note for note in getattr(info.value, "__notes__", ()))


def test_a_coroutine_stage_takes_a_timeout_and_a_resource_together(
    resources: list[AsyncResource],
) -> None:
    async def call(x: int, resource: AsyncResource) -> int:
        return x

    out = Pipeline.from_iter(range(5)).map(call, timeout=5, resource=AsyncResource).to_list()
    assert out == [0, 1, 2, 3, 4]
