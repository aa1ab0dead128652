"""See a pipeline work: ``python -m threadpipe.demo`` runs three stages with bars, then reports.

The job: download photos, make thumbnails, upload them. Nothing leaves the machine: a download is a
sleep of about 40 ms (a slow network) followed by generating the photo's bytes, a thumbnail is real
work (a 2x2 box filter over the pixels, in plain Python), and an upload is a sleep of about 25 ms (a
slow storage service). Downloads get 8 threads, thumbnails 2 and uploads 2, so the uploads are the
bottleneck, and the report at the end says so and what to try::

    python -m threadpipe.demo                       # 500 photos, about 6 s
    python -m threadpipe.demo --uploaders 6         # take the report's advice
    python -m threadpipe.demo --items 60 --timeline timeline.png --trace trace.json
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence

from ._pipeline import Pipeline

__all__ = ["main"]

_WIDTH, _HEIGHT = 192, 128  # pixels of a photo, one byte per pixel (grey)


def _pause(seconds: float, rng: random.Random) -> None:
    """Wait about ``seconds`` (between 0.5x and 1.5x), as network and storage latencies vary."""
    time.sleep(seconds * rng.uniform(0.5, 1.5))


def _make_photo(index: int) -> bytes:
    return random.Random(index).randbytes(_WIDTH * _HEIGHT)


def thumbnail(photo: tuple[int, bytes]) -> tuple[int, bytes]:
    """Halve a photo in both directions: average each 2x2 block of pixels into one."""
    index, pixels = photo
    out = bytearray()
    for y in range(0, _HEIGHT, 2):
        top = pixels[y * _WIDTH : (y + 1) * _WIDTH]
        bottom = pixels[(y + 1) * _WIDTH : (y + 2) * _WIDTH]
        out += bytes(
            (top[x] + top[x + 1] + bottom[x] + bottom[x + 1]) // 4 for x in range(0, _WIDTH, 2)
        )
    return index, bytes(out)


def build(items: int, latency: float, downloaders: int, uploaders: int) -> Pipeline[int]:
    """The demo's pipeline: download -> thumbnail -> upload, each stage with its own threads.

    Args:
        items: how many photos.
        latency: seconds of a typical download; an upload takes 0.6 of it.
        downloaders: threads of the download stage.
        uploaders: threads of the upload stage.

    Returns:
        The pipeline; its outputs are the photo numbers, as uploads finish.
    """

    def download(index: int) -> tuple[int, bytes]:
        _pause(latency, random.Random(index))
        return index, _make_photo(index)

    def upload(thumb: tuple[int, bytes]) -> int:
        _pause(0.6 * latency, random.Random(-thumb[0]))
        return thumb[0]

    return (
        Pipeline.from_iter(range(items))
        .map(download, workers=downloaders)
        .map(thumbnail, workers=2)
        .map(upload, workers=uploaders, ordered=False)
    )


# The --help text: plain words, not the module docstring's reST (argparse prints it verbatim).
_DESCRIPTION = "See a pipeline work: run three stages with bars, then report."
_EPILOG = """\
The job: download photos, make thumbnails, upload them. Nothing leaves the
machine: downloads and uploads are sleeps, thumbnails are real work. Uploads
have the fewest threads, so they are the bottleneck, and the report at the
end says so and what to try.

examples:
  python -m threadpipe.demo                # 500 photos, about 6 s
  python -m threadpipe.demo --uploaders 6  # take the report's advice
  python -m threadpipe.demo --items 60 --timeline tl.png --trace trace.json
"""


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type=``: an int >= ``minimum``, else a usage error naming the option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    """An argparse ``type=``: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m threadpipe.demo",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--items", type=_int_at_least(0), default=500, help="photos to process (default 500)"
    )
    parser.add_argument(
        "--latency", type=_seconds, default=0.04, help="seconds per download (default 0.04)"
    )
    parser.add_argument(
        "--downloaders", type=_int_at_least(1), default=8, help="download threads (default 8)"
    )
    parser.add_argument(
        "--uploaders", type=_int_at_least(1), default=2, help="upload threads (default 2)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no bars (still sampled)")
    parser.add_argument("--trace", metavar="PATH", help="write a Chrome trace (Perfetto) here")
    parser.add_argument(
        "--timeline",
        metavar="PATH",
        help="draw the timeline here (needs matplotlib: pip install 'threadpipe[plot]')",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the exit status.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0.

    Raises:
        SystemExit: a bad option (status 2, with the usage and a message naming the option), or
            ``--timeline`` without matplotlib (status 2, before the run starts), or ``--help``.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.timeline:
        # Fail now, not after a run of several seconds whose timeline could not be drawn.
        try:
            import matplotlib.figure  # noqa: F401
        except ImportError:
            parser.error(
                "--timeline needs matplotlib, which is not installed: "
                "pip install 'threadpipe[plot]'"
            )

    pipeline = build(args.items, args.latency, args.downloaders, args.uploaders)
    traced = bool(args.trace or args.timeline)
    title = (
        f"threadpipe demo: {args.items} photos: download ({args.downloaders} threads)"
        f" -> thumbnail (2) -> upload ({args.uploaders})"
    )
    print(title, flush=True)
    progress = None if args.no_progress else {"file": sys.stderr}
    with pipeline.start(progress=progress, monitor=True, trace=traced) as run:
        uploaded = sum(1 for _ in run)
    print(f"uploaded {uploaded} thumbnails\n")
    if args.items:
        print(run.report())
    else:
        # The report would call the bottleneck "not known yet": with no photos there is none.
        print("no photos, so no stage did any work and there is no bottleneck to report")
    if args.trace:
        run.save_trace(args.trace)
        print(f"\ntrace written to {args.trace} (open it in https://ui.perfetto.dev)")
    if args.timeline:
        run.plot_timeline(args.timeline, title=f"{title}; one lane per thread")
        print(f"\ntimeline drawn in {args.timeline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
