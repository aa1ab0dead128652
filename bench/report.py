"""Output of a benchmark run: aligned text tables, CSV files and PNG plots."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

Series = dict[str, list[tuple[float, float]]]


@dataclass
class Section:
    """The results of one workload.

    Attributes:
        name: Workload key; names the CSV and PNG files.
        title: Heading of the printed table.
        headers: Column names of the printed table.
        rows: Printed cells, one list per row.
        notes: Lines printed under the table.
        records: One dict per run, written to CSV as they are.
        plot: Draws the PNG at the given path (matplotlib already imported), if any.
    """

    name: str
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    plot: Callable[[Path], None] | None = None


def format_table(section: Section) -> str:
    """Formats a section as a title, an aligned table (first column left) and its notes."""
    grid = [section.headers, *section.rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(section.headers))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * len(line(section.headers))
    out = [f"== {section.title}", line(section.headers), rule, *(line(r) for r in section.rows)]
    out += [f"   {note}" for note in section.notes]
    return "\n".join(out)


def paired(ours: Sequence[float], theirs: Sequence[float]) -> str:
    """``ours`` against ``theirs``, repeat by repeat: the median of ``ours[i] / theirs[i]`` and in
    how many repeats ours was the faster, as ``0.93x 4/5``.

    Both lists must come from the same interleaved repeats (repeat i of each ran back to back), so
    each ratio compares two runs under the same load: the machine's noise, which moves the medians
    of both from one hour to the next, mostly cancels in it. A library is *ahead* when its ratio is
    under 1 in most repeats, not when its median time happens to be lower in one table.
    """
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return f"{statistics.median(ratios):.2f}x {sum(r < 1 for r in ratios)}/{len(ratios)}"


def rotated(items: Sequence[T], turn: int) -> list[T]:
    """``items`` in the order of repeat ``turn`` of an interleaved comparison: rotated by ``turn``,
    so that over the repeats each runs first, second ... as often as the others. A run's place in
    its repeat moves its time by a few percent on a shared machine; a fixed order would put that
    into every ``paired`` ratio."""
    if not items:
        return []
    shift = turn % len(items)
    return [*items[shift:], *items[:shift]]


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    """Writes records as CSV, columns in first-seen order."""
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(records)


def load_pyplot() -> Any:
    """Imports matplotlib's pyplot with a file-only backend.

    Raises:
        ImportError: If matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class Panel:
    """One subplot: lines over a log2 x axis.

    Attributes:
        ylabel: Label of the y axis.
        series: Label -> (x, y) points.
        logy: Whether the y axis is logarithmic.
    """

    ylabel: str
    series: Series
    logy: bool = False


def line_plot(path: Path, title: str, xlabel: str, panels: Sequence[Panel]) -> None:
    """Draws the panels side by side, one line per series, and saves them as PNG."""
    plt = load_pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, points in panel.series.items():
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        if panel.logy:
            ax.set_yscale("log")
        ax.set(xlabel=xlabel, ylabel=panel.ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_plot(
    path: Path, title: str, xlabel: str, bars: dict[str, float], logx: bool = False
) -> None:
    """Draws one horizontal bar per label and saves it as PNG."""
    plt = load_pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.4 * max(len(bars), 1)))
    labels = list(bars)
    ax.barh(labels, [bars[label] for label in labels])
    ax.invert_yaxis()
    if logx:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(section: Section, results_dir: Path, plots: bool) -> list[Path]:
    """Writes a section's CSV and, when asked and possible, its PNG.

    Returns:
        The files written.
    """
    written = []
    if section.records:
        csv_path = results_dir / f"{section.name}.csv"
        write_csv(csv_path, section.records)
        written.append(csv_path)
    if plots and section.plot is not None and section.records:
        png_path = results_dir / f"{section.name}.png"
        section.plot(png_path)
        written.append(png_path)
    return written
