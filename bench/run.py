"""Benchmarks threadpipe against its peers on the workloads of shared/BENCHMARKS.md.

Usage::

    python bench/run.py --quick                 # under 2 minutes on 2 cores
    python bench/run.py                         # the full set
    python bench/run.py --only headline --libs threadpipe,handwritten

Every run of every library happens in a fresh subprocess (``child.py``) under a timeout,
so an error or a hang becomes a table cell ("error: Type", "timeout") and the rest goes on.
Tables are printed; CSV, PNG and machine info are written to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import REPO_ROOT, ErrorLog, Outcome, run_child, run_idle_child
from peers import PEERS
from report import Panel, Section, bar_plot, format_table, line_plot, load_pyplot, save
from sysinfo import format_info, machine_info
from workloads import SEED, Table, ideal_fifo, lower_bound, spiky_table, uniform_table

HEADLINE_ITEMS = 1000
SPIKY_BUFFER = 128
OVERHEAD_STAGES = 3
MEMORY_WORKERS = 4
MEMORY_SLOW_S, MEMORY_CONSUMER_S = 0.001, 0.002
MEMORY_PROBE_MB = 200
# A run in which no stage call finishes and no CPU is used for this long is deadlocked
# (see child.Watchdog); the longest stage call of any workload is 20 ms.
STALL_S = 1.5
IDEAL_NOTE = (
    "ideal FIFO = zero-overhead simulation of c slots per stage serving items in arrival order"
    " (workloads.ideal_fifo)."
)
IDLE_STAGES, IDLE_WORKERS, IDLE_PERIOD_S = 2, 4, 2.0


@dataclass(frozen=True)
class Plan:
    """How much of each workload a mode runs.

    Attributes:
        headline_c: Concurrencies of the headline workload (sequential runs only at c=1).
        c1_libs: Libraries run at c=1 where a section restricts it (None: all).
        spiky_c: Concurrencies of the spiky variant.
        overhead_items: Items of the overhead workload.
        overhead_reps: Repetitions per overhead run (the best is reported).
        memory_items: Item counts of the memory workload.
        idle_window_s: Seconds of CPU measurement in the idle workload.
        probes: Whether the memory and idle tables include the known-answer probe rows.
        time_limit_s: Fixed part of a timed run's limit (plus four lower bounds).
    """

    headline_c: tuple[int, ...]
    c1_libs: frozenset[str] | None
    spiky_c: tuple[int, ...]
    overhead_items: int
    overhead_reps: int
    memory_items: tuple[int, ...]
    idle_window_s: float
    probes: bool
    time_limit_s: float


FULL = Plan(
    (1, 2, 4, 8, 16, 32, 64, 128, 256), None, (1, 2, 4, 8), 100_000, 3, (500, 2000), 6.0, True, 30.0
)
# Quick keeps N=1000 and every library but drops c=1 (7.5 s a run, 23 s sequential), uses
# fewer overhead items and shorter limits, and leaves the probe rows to the full mode.
QUICK = Plan(
    (8, 64, 256), frozenset({"threadpipe", "sequential"}), (8,), 20_000, 3, (500,), 4.0, False, 5.0
)


@dataclass(frozen=True)
class Config:
    """What this invocation runs and where it writes."""

    plan: Plan
    quick: bool
    libs: list[str]
    results: Path
    log: ErrorLog


def fmt_seconds(seconds: float) -> str:
    """Seconds with three significant digits."""
    return f"{seconds:.3g}s"


def timed(
    cfg: Config,
    lib: str,
    c: int,
    buffer: int | None,
    stages: dict[str, Any],
    n_items: int,
    reps: int,
    timeout: float,
) -> Outcome:
    """One guarded timed run of ``lib`` (see ``child.run_timed``)."""
    job = {
        "mode": "timed",
        "lib": lib,
        "concurrency": c,
        "buffer": buffer,
        "stages": stages,
        "n_items": n_items,
        "reps": reps,
        "stall_s": STALL_S,
    }
    return run_child(job, timeout, cfg.log)


def timeout_for(cfg: Config, table: Table, c: int) -> float:
    """A timed run's limit: the plan's fixed part plus four lower bounds."""
    return cfg.plan.time_limit_s + 4 * lower_bound(table, c)


def limits_note(cfg: Config) -> str:
    """Explains what "timeout" means in a timed table."""
    return (
        f"timeout = no result within {cfg.plan.time_limit_s:g} s + 4 x LB(c), or deadlocked"
        f" (no stage call finished and the process idle for {STALL_S:g} s)."
    )


def lb_cell(seconds: float, lb: float, ideal: float | None = None) -> str:
    """A measured cell: seconds, ratio to the lower bound and, if given, to the ideal schedule."""
    cell = f"{fmt_seconds(seconds)} {seconds / lb:.2f}x"
    return cell if ideal is None else f"{cell}|{seconds / ideal:.2f}x"


def ideal_row(table: Table, cs: Sequence[int]) -> list[str]:
    """The ideal FIFO schedule's row: its seconds and its ratio to LB(c), per concurrency."""
    return [
        "ideal FIFO",
        *(lb_cell(ideal_fifo(table, c), lower_bound(table, c)) for c in cs),
    ]


def sweep(
    cfg: Config,
    section: Section,
    table: Table,
    runs: Sequence[tuple[str, int, int | None]],
    variant: str,
) -> dict[tuple[str, int, int | None], str]:
    """Runs the sleep-table workload for each (lib, c, buffer), recording every outcome.

    Returns:
        The table cell of each run.
    """
    stages = {"kind": "sleep", "table": table}
    cells = {}
    ideals = {c: ideal_fifo(table, c) for _, c, _ in runs}
    for lib, c, buffer in runs:
        lb = lower_bound(table, c)
        ideal = ideals[c]
        outcome = timed(cfg, lib, c, buffer, stages, len(table[0]), 1, timeout_for(cfg, table, c))
        seconds = outcome.data["seconds"][0] if outcome.ok else None
        cells[(lib, c, buffer)] = (
            lb_cell(seconds, lb, ideal) if seconds is not None else outcome.label()
        )
        section.records.append(
            {
                "variant": variant,
                "library": lib,
                "concurrency": c,
                "buffer": buffer or "",
                "status": outcome.status,
                "seconds": seconds,
                "lower_bound_s": lb,
                "ideal_fifo_s": ideal,
                "ratio": seconds / lb if seconds is not None else None,
                "ratio_ideal": seconds / ideal if seconds is not None else None,
                "threads_left": outcome.data.get("threads_left"),
                "error": outcome.data.get("type", ""),
            }
        )
    return cells


def ratio_panels(section: Section) -> list[Panel]:
    """Seconds, ratio-to-LB and ratio-to-ideal panels, one series per (library, buffer).

    The ideal FIFO schedule is drawn as a series of its own in the first two panels; in the
    third it is the line y = 1.
    """
    seconds: dict[str, list[tuple[float, float]]] = {}
    ratios: dict[str, list[tuple[float, float]]] = {}
    to_ideal: dict[str, list[tuple[float, float]]] = {}
    ideal: dict[float, tuple[float, float]] = {}
    for r in section.records:
        if r.get("ideal_fifo_s") is not None:
            ideal[r["concurrency"]] = (r["ideal_fifo_s"], r["ideal_fifo_s"] / r["lower_bound_s"])
        if r["status"] == "ok":
            label = r["library"] + (f" bp{r['buffer']}" if r["buffer"] else "")
            seconds.setdefault(label, []).append((r["concurrency"], r["seconds"]))
            ratios.setdefault(label, []).append((r["concurrency"], r["ratio"]))
            if r.get("ratio_ideal") is not None:
                to_ideal.setdefault(label, []).append((r["concurrency"], r["ratio_ideal"]))
    if ideal:
        seconds["ideal FIFO"] = [(c, s) for c, (s, _) in ideal.items()]
        ratios["ideal FIFO"] = [(c, x) for c, (_, x) in ideal.items()]
    panels = [Panel("wall seconds", seconds, logy=True), Panel("ratio to LB(c)", ratios, logy=True)]
    if to_ideal:
        panels.append(Panel("ratio to the ideal FIFO schedule", to_ideal, logy=True))
    return panels


def headline(cfg: Config) -> Section:
    """Workload 1: three sleeping stages, N=1000, over the concurrency sweep."""
    table = uniform_table(HEADLINE_ITEMS)
    plan = cfg.plan
    section = Section(
        "headline",
        f"1. headline: N={HEADLINE_ITEMS}, 3 stages, sleeps uniform 5-10 ms (seed {SEED}),"
        " unordered;"
        " cells: seconds, ratio to LB(c)|to the ideal FIFO schedule",
        ["library", *(f"c={c}" for c in plan.headline_c)],
    )
    runs = [
        (lib, c, None) for lib in cfg.libs for c in plan.headline_c if c == 1 or lib != "sequential"
    ]
    cells = sweep(cfg, section, table, runs, "uniform")
    section.rows.append(["LB(c)", *(fmt_seconds(lower_bound(table, c)) for c in plan.headline_c)])
    section.rows.append(ideal_row(table, plan.headline_c))
    for lib in cfg.libs:
        section.rows.append([lib, *(cells.get((lib, c, None), "-") for c in plan.headline_c)])
    section.notes.append("'-' = not run in this mode (sequential runs at c=1 only).")
    section.notes.append(IDEAL_NOTE)
    section.notes.append(limits_note(cfg))
    if cfg.quick:
        section.notes.append(
            f"quick mode: c in {plan.headline_c}; full mode runs c in {FULL.headline_c}."
        )
    title = f"headline: N={HEADLINE_ITEMS}, 3 stages sleeping 5-10 ms"
    section.plot = lambda path: line_plot(
        path, title, "workers per stage (c)", ratio_panels(section)
    )
    return section


def spiky(cfg: Config) -> Section:
    """Workload 1, spiky variant: 20% of executions 20 ms, with and without backpressure."""
    table = spiky_table(HEADLINE_ITEMS)
    plan = cfg.plan
    variants = [(c, b) for c in plan.spiky_c for b in (None, SPIKY_BUFFER)]
    section = Section(
        "spiky",
        f"1b. spiky: as headline, 20% of executions 20 ms; bp = buffer {SPIKY_BUFFER}"
        " around every stage; cells: seconds, ratio to LB(c)|to the ideal FIFO schedule",
        ["library", *(f"c={c}" + (f" bp{b}" if b else "") for c, b in variants)],
    )
    runs = [(lib, c, b) for lib in cfg.libs if lib != "sequential" for c, b in variants]
    cells = sweep(cfg, section, table, runs, "spiky")
    section.rows.append(["LB(c)", *(fmt_seconds(lower_bound(table, c)) for c, _ in variants)])
    section.rows.append(ideal_row(table, [c for c, _ in variants]))
    for lib in cfg.libs:
        if lib != "sequential":
            section.rows.append([lib, *(cells[(lib, c, b)] for c, b in variants)])
    section.notes.append(
        "n/a = the library has no buffer bound to set (Executor.map submits its whole input)."
    )
    section.notes.append(IDEAL_NOTE + " Buffers are not simulated.")
    section.notes.append(limits_note(cfg))
    if cfg.quick:
        section.notes.append(
            f"quick mode: c in {plan.spiky_c} only; full mode runs c in {FULL.spiky_c}."
        )
    section.plot = lambda path: line_plot(
        path, "spiky variant", "workers per stage (c)", ratio_panels(section)
    )
    return section


def overhead(cfg: Config) -> Section:
    """Workload 2: per-item cost of three identity stages, best of several repetitions."""
    plan = cfg.plan
    n = plan.overhead_items
    workers = (1, 4)
    section = Section(
        "overhead",
        f"2. overhead: {OVERHEAD_STAGES} identity stages, {n:,} ints, best of {plan.overhead_reps};"
        " items/s (x = relative to handwritten)",
        ["library", *(h for w in workers for h in (f"workers={w}", "x"))],
    )
    stages = {"kind": "identity", "count": OVERHEAD_STAGES}
    rates: dict[tuple[str, int], float] = {}
    labels: dict[tuple[str, int], str] = {}
    for lib in cfg.libs:
        for w in workers:
            if lib == "sequential" and w != 1:
                continue
            # Limit: 25 us per item and stage hop is already 5x slower than the slowest peer seen.
            limit = plan.time_limit_s + plan.overhead_reps * n * OVERHEAD_STAGES * 25e-6
            outcome = timed(cfg, lib, w, None, stages, n, plan.overhead_reps, limit)
            best = min(outcome.data["seconds"]) if outcome.ok else None
            if best is not None:
                rates[(lib, w)] = n / best
            labels[(lib, w)] = f"{n / best:,.0f}" if best is not None else outcome.label()
            section.records.append(
                {
                    "library": lib,
                    "workers": w,
                    "items": n,
                    "status": outcome.status,
                    "best_s": best,
                    "all_s": ";".join(f"{s:.4f}" for s in outcome.data.get("seconds", [])),
                    "items_per_s": n / best if best is not None else None,
                    "error": outcome.data.get("type", ""),
                }
            )
    for lib in cfg.libs:
        row = [lib]
        for w in workers:
            ref = rates.get(("handwritten", w))
            mine = rates.get((lib, w))
            row += [labels.get((lib, w), "-"), f"{mine / ref:.2f}" if mine and ref else ""]
        section.rows.append(row)
    if "sequential" in cfg.libs:
        section.notes.append(
            "sequential: a plain loop calling the three functions (workers=1 only)."
        )
    if "streamable" in cfg.libs:
        section.notes.append("streamable: concurrency=1 maps in the consuming thread, no threads.")
    if cfg.quick:
        section.notes.append(f"quick mode: {n:,} items; full mode uses {FULL.overhead_items:,}.")
    section.plot = lambda path: bar_plot(
        path,
        f"overhead: {OVERHEAD_STAGES} identity stages, {n:,} items",
        "items/s (log scale)",
        {f"{lib} w={w}": rate for (lib, w), rate in rates.items()},
        logx=True,
    )
    return section


def memory_job(lib: str, n_items: int) -> dict[str, Any]:
    """The child job of one memory run; ``lib`` "probe:hold" just holds ``n_items`` MB."""
    return {
        "mode": "memory",
        "lib": lib,
        "n_items": n_items,
        "concurrency": 1 if lib == "sequential" else MEMORY_WORKERS,
        "buffer": None,
        "slow_delay": MEMORY_SLOW_S,
        "consumer_delay": MEMORY_CONSUMER_S,
        "sample_interval": 0.002,
        "stall_s": STALL_S,
    }


def memory_cells(outcome: Outcome, bound: str) -> list[str]:
    """Peak sampled, peak from the kernel, baseline, seconds and the bound column."""
    d = outcome.data
    if not outcome.ok:
        return [outcome.label(), "", "", "", bound]
    if d.get("bound_mb") is not None:
        bound = f"{d['bound_mb']} (buffer_bound)"
    kernel = "n/a" if d["peak_kernel_mb"] is None else f"{d['peak_kernel_mb']:.0f}"
    peaks = [f"{d['peak_sampled_mb']:.0f}", kernel, f"{d['baseline_mb']:.0f}"]
    return [*peaks, f"{d['seconds']:.2f}", bound]


def memory(cfg: Config) -> Section:
    """Workload 3: peak RSS above baseline, 1 MB items, a consumer slower than the stages."""
    plan = cfg.plan
    section = Section(
        "memory",
        f"3. memory: 1 MB bytes items made lazily; stage 1 identity, stage 2"
        f" {MEMORY_SLOW_S * 1e3:g} ms, consumer {MEMORY_CONSUMER_S * 1e3:g} ms/item;"
        f" {MEMORY_WORKERS} workers per stage, default buffers",
        ["library", "N", "peak MB (sampled)", "peak MB (kernel)", "baseline MB", "s", "bound MB"],
    )
    jobs: list[tuple[str, dict[str, Any], str]] = []
    if plan.probes:
        expected = f"~{MEMORY_PROBE_MB} expected"
        jobs.append(("probe: hold all items", memory_job("probe:hold", MEMORY_PROBE_MB), expected))
    for n in plan.memory_items:
        for lib in cfg.libs:
            jobs.append((lib, memory_job(lib, n), "see README" if lib == "threadpipe" else "-"))
    # Every 1 MB allocation gets its own mmap, returned on free: RSS then follows live items
    # instead of the high-water mark of glibc's heap (whose mmap threshold adapts upward).
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    for name, job, bound in jobs:
        limit = 30.0 + job["n_items"] * MEMORY_CONSUMER_S * 5
        outcome = run_child(job, limit, cfg.log, env)
        section.rows.append([name, str(job["n_items"]), *memory_cells(outcome, bound)])
        record = {"library": name, "n_items": job["n_items"], "status": outcome.status}
        section.records.append({**record, **outcome.data})
    section.notes += [
        "peak = highest RSS during the run minus RSS before it: sampled every 2 ms by a thread,",
        "and from the kernel's VmHWM (reset before the run). Each row is a fresh process.",
    ]
    if cfg.quick:
        section.notes.append(
            f"quick mode: N={plan.memory_items[0]} only, no probe row; full mode also runs"
            " N=2000 (growth with N) and a known-answer probe."
        )
    section.plot = lambda path: bar_plot(
        path,
        "peak RSS above baseline",
        "MB",
        {
            f"{r['library']} N={r['n_items']}": r["peak_sampled_mb"]
            for r in section.records
            if r["status"] == "ok"
        },
    )
    return section


def idle(cfg: Config) -> Section:
    """Workload 4: CPU burnt by 8 idle workers waiting on a source that ticks every 2 s."""
    window = cfg.plan.idle_window_s
    section = Section(
        "idle",
        f"4. idle: {IDLE_STAGES} stages x {IDLE_WORKERS} workers, source yields every"
        f" {IDLE_PERIOD_S:g} s;"
        f" CPU over {window:g} s",
        ["library", "% of one core", "CPU s", "wall s", "outputs seen", "expected"],
    )
    rows = [
        ("probe: busy-poll loop", "probe:busy", "~100"),
        ("probe: Event.wait", "probe:wait", "~0"),
    ]
    rows = rows if cfg.plan.probes else []
    rows += [(lib, lib, "") for lib in cfg.libs if lib != "sequential"]
    for name, lib, expected in rows:
        job = {
            "mode": "idle",
            "lib": lib,
            "concurrency": IDLE_WORKERS,
            "buffer": None,
            "n_stages": IDLE_STAGES,
            "period": IDLE_PERIOD_S,
        }
        outcome = run_idle_child(job, 15.0, window, cfg.log)
        d = outcome.data
        if outcome.ok:
            cells = [
                f"{d['cpu_pct']:.1f}",
                f"{d['cpu_pct'] * d['wall_s'] / 100:.2f}",
                f"{d['wall_s']:.1f}",
                str(d["outputs"]),
            ]
        else:
            cells = [outcome.label(), "", "", ""]
        section.rows.append([name, *cells, expected])
        section.records.append({"library": name, "status": outcome.status, **d})
    section.notes.append(
        "CPU = user+system seconds of the whole child process (psutil) per wall second, from the"
    )
    section.notes.append(
        "moment the pipeline pulls its second source item; outputs seen = outputs consumed"
        " in the window."
    )
    if cfg.quick:
        section.notes.append(
            "quick mode: shorter window, no probe rows; full mode adds the known-answer probes."
        )
    section.plot = lambda path: bar_plot(
        path,
        "idle CPU (% of one core)",
        "% of one core",
        {r["library"]: r["cpu_pct"] for r in section.records if r["status"] == "ok"},
    )
    return section


def coroutine(cfg: Config) -> Section:
    """Workload 1, coroutine variant: the headline durations slept with ``asyncio.sleep`` in ``async def``
    stages, for the libraries that take coroutines (see ``coroutine.py``, which also runs on its own).

    ``handwritten`` is the pattern written by hand in asyncio (c worker tasks and an
    ``asyncio.Queue(c)`` per stage); ``executor`` and ``sequential`` have no coroutine form.
    """
    import coroutine as co

    plan = cfg.plan
    libs = [lib for lib in cfg.libs if lib in co.PEER_NAMES]
    table = uniform_table(HEADLINE_ITEMS)
    section = Section(
        "coroutine",
        f"1c. coroutine: as headline, async def stages with asyncio.sleep (seed {SEED}), unordered;"
        " cells: seconds, ratio to LB(c)|to the ideal FIFO schedule, peak threads",
        ["library", *(f"c={c}" for c in plan.headline_c)],
    )
    c1_libs = libs if plan.c1_libs is None else [lib for lib in libs if lib in plan.c1_libs]
    cells = {}
    for lib, c in co.plan(libs, plan.headline_c, c1_libs):
        cell = co.measure(co.PEER_NAMES[lib], c, HEADLINE_ITEMS)
        lb = lower_bound(table, c)
        ideal = ideal_fifo(table, c)
        cells[(lib, c)] = co.cell_text(cell, lb, ideal)
        section.records.append(
            {
                "variant": "coroutine",
                "library": lib,
                "concurrency": c,
                "buffer": "",
                "status": cell.status,
                "seconds": cell.seconds,
                "lower_bound_s": lb,
                "ideal_fifo_s": ideal,
                "ratio": cell.seconds / lb if cell.seconds is not None else None,
                "ratio_ideal": cell.seconds / ideal if cell.seconds is not None else None,
                "threads": cell.threads,
                "error": cell.error,
            }
        )
    section.rows.append(["LB(c)", *(fmt_seconds(lower_bound(table, c)) for c in plan.headline_c)])
    section.rows.append(ideal_row(table, plan.headline_c))
    for lib in libs:
        section.rows.append([lib, *(cells.get((lib, c), "-") for c in plan.headline_c)])
    section.notes.append(IDEAL_NOTE)
    section.notes.append(
        "at high c it is well above LB(c), which ignores that the last items still have 3 stages to go."
    )
    section.notes.append(
        "threads = peak threads besides the main one while outputs came (t); '-' = not run in this mode."
    )
    section.plot = lambda path: line_plot(
        path, section.title[:60], "coroutines per stage (c)", ratio_panels(section)
    )
    return section


WORKLOADS: dict[str, Callable[[Config], Section]] = {
    "headline": headline,
    "spiky": spiky,
    "overhead": overhead,
    "memory": memory,
    "idle": idle,
    "coroutine": coroutine,
}


def csv_list(choices: list[str]) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of ``choices``."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {unknown or text!r}; choose from {', '.join(choices)}"
            )
        return names

    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="reduced set, under 2 minutes on 2 cores"
    )
    parser.add_argument(
        "--only",
        type=csv_list(list(WORKLOADS)),
        default=list(WORKLOADS),
        help=f"comma-separated workloads: {', '.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--libs",
        type=csv_list(list(PEERS)),
        default=list(PEERS),
        help=f"comma-separated libraries: {', '.join(PEERS)}",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="output directory (default: bench/results)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser.parse_args(argv)


def plots_available(wanted: bool) -> bool:
    """Whether PNGs can be drawn; says why not when they can't."""
    if not wanted:
        return False
    try:
        load_pyplot()
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install matplotlib)")
        return False
    return True


def provenance(machine: Path) -> dict[str, str]:
    """Which run wrote each results file, as the ``machine.json`` there records it: its
    ``results`` map, or, in one written before there was such a map, its one run for every CSV
    and PNG of the directory."""
    try:
        recorded = json.loads(machine.read_text())
    except (OSError, ValueError):
        return {}
    if "results" in recorded:
        return dict(recorded["results"])
    run = f"{recorded.get('date (UTC)', '?')}: {recorded.get('command', '?')}"
    return {
        path.name: run
        for path in sorted(machine.parent.iterdir())
        if path.suffix in (".csv", ".png")
    }


def main(argv: list[str]) -> int:
    """Runs the selected workloads and writes their results."""
    args = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    libs = [name for name in PEERS if name in args.libs]  # table order, not argument order
    cfg = Config(
        QUICK if args.quick else FULL,
        args.quick,
        libs,
        args.results,
        ErrorLog(args.results / "errors.log"),
    )
    info = machine_info([PEERS[name].dist for name in libs], REPO_ROOT, ["bench/run.py", *argv])
    info["mode"] = "quick" if args.quick else "full"
    print(format_info(info) + "\n", flush=True)
    machine = args.results / "machine.json"
    # Which run wrote each file: a run of some workloads (``--only``) leaves the others' files,
    # and what machine.json says of them, as they were.
    produced = provenance(machine)
    this_run = f"{info['date (UTC)']}: {info['command']}"

    def record() -> None:
        machine.write_text(
            json.dumps({**info, "results": dict(sorted(produced.items()))}, indent=2) + "\n"
        )

    record()
    plots = plots_available(not args.no_plots)
    started = time.monotonic()
    written: list[Path] = [machine]
    for name in args.only:
        section = WORKLOADS[name](cfg)
        print(format_table(section) + "\n", flush=True)
        files = save(section, args.results, plots)
        produced.update((path.name, this_run) for path in files)
        record()
        written += files
    print(
        f"total {time.monotonic() - started:.0f} s; wrote"
        f" {', '.join(p.name for p in written)} to {args.results}"
    )
    if cfg.log.path.stat().st_size:
        print(f"stderr of failed runs: {cfg.log.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
