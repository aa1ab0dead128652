"""Download, process and save images in a three-stage threadpipe pipeline.

The pattern's classic use: most of the time goes to waiting on a slow network, a little to the
CPU, some to storage. Each stage gets its own pool of threads, a bounded buffer keeps downloads
from piling up in memory, and the stages overlap, so a run takes about as long as its slowest
stage rather than the sum of all three.

Nothing leaves the machine. A local HTTP server on 127.0.0.1 serves generated 128x96 PPM images
(37 KB each) and sleeps --latency-ms before each response, like a slow network. Each image is
downloaded with urllib, halved in size with a 2x2 box filter in plain Python, checksummed, and
written to --out (default: a temporary directory). With --compare (on by default), a plain loop
then does the same job on up to 50 images, and the script checks that both produce the same bytes.

    pip install -e .                      # from the repository root, once
    python examples/image_pipeline.py
    python examples/image_pipeline.py --count 500 --latency-ms 20 --download-workers 16 --no-compare
"""

import argparse
import contextlib
import functools
import hashlib
import http.server
import os
import random
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import threadpipe as tp


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with serve_images(args.latency_ms / 1000) as url, tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)  # the temporary directory is removed at exit; --out DIR is kept
        out.mkdir(parents=True, exist_ok=True)
        pipeline = (
            tp.Pipeline.from_iter(range(args.count))
            .map(functools.partial(download, url), workers=args.download_workers, name="download")
            .backpressure(64)  # at most 64 downloaded images wait for the processing stage
            .map(process, workers=args.process_workers, ordered=False, name="process")
            .map(functools.partial(save, out, args.fsync), workers=args.save_workers, name="save")
        )
        start = time.perf_counter()
        with pipeline.start() as run:  # on an error or Ctrl-C, leaving the block cancels the run
            digests = dict(run)  # each output is (file name, sha256)
        rate = report("pipeline", len(digests), time.perf_counter() - start)
        print(f"saved {len(digests)} images to {out}" + ("" if args.out else " (temporary)"))
        if args.compare:
            # The plain loop is slow: time it on 50 images at most.
            return compare_sequential(url, min(args.count, 50), digests, rate)
    return 0


def compare_sequential(url: str, count: int, expected: dict[str, str], rate: float) -> int:
    """Do the same job in a plain loop on the first `count` images; check that the results agree."""
    with tempfile.TemporaryDirectory(prefix="threadpipe-seq-") as tmp:
        start = time.perf_counter()
        digests = dict(save(Path(tmp), False, process(download(url, i))) for i in range(count))
        sequential = report("sequential", count, time.perf_counter() - start)
    same = all(expected[name] == digest for name, digest in digests.items())
    print(f"speedup: {rate / sequential:.1f}x; same bytes as the loop: {'yes' if same else 'NO'}")
    return 0 if same else 1


def report(label: str, items: int, seconds: float) -> float:
    """Print one summary line; return the rate in items per second."""
    print(f"{label + ':':<12}{items:5d} items in {seconds:6.2f} s = {items / seconds:7.1f} items/s")
    return items / seconds


# Loopback only: ignore any http_proxy/https_proxy set in the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def download(url: str, index: int) -> tuple[int, bytes]:
    """Fetch image `index` from the server (blocks for the simulated network latency)."""
    with _opener.open(f"{url}/images/{index}.ppm", timeout=30) as response:
        return index, response.read()


def process(item: tuple[int, bytes]) -> tuple[int, bytes, str]:
    """Halve the image in both directions and checksum the result."""
    index, ppm = item
    small = downscale(ppm)
    return index, small, hashlib.sha256(small).hexdigest()


def save(out: Path, fsync: bool, item: tuple[int, bytes, str]) -> tuple[str, str]:
    """Write the processed image to `out`; return its file name and checksum."""
    index, ppm, digest = item
    name = f"image-{index:04d}.ppm"
    with open(out / name, "wb") as f:
        f.write(ppm)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return name, digest


def make_image(index: int) -> bytes:
    """The image the server serves at /images/<index>.ppm: deterministic noise, binary PPM (P6)."""
    width, height = 128, 96
    pixels = random.Random(index).randbytes(width * height * 3)  # red, green, blue: 36,864 bytes
    return b"P6\n%d %d\n255\n" % (width, height) + pixels


def downscale(ppm: bytes) -> bytes:
    """Average each 2x2 block of pixels into one (a box filter); drop an odd last row or column."""
    _, size, _, pixels = ppm.split(b"\n", 3)  # "P6", "<width> <height>", "255": no comments
    width, height = map(int, size.split())
    row, half_row = width * 3, width // 2 * 3
    out = bytearray()
    for y in range(0, height - 1, 2):
        top, bottom = pixels[y * row : (y + 1) * row], pixels[(y + 1) * row : (y + 2) * row]
        half = bytearray(half_row)
        for c in range(3):  # channels are interleaved: channel c of pixel x is at byte 3 * x + c
            # channel c of pixels 0, 2, 4... and of pixels 1, 3, 5... (not an odd last one)
            even, odd = slice(c, 2 * half_row, 6), slice(c + 3, 2 * half_row, 6)
            blocks = zip(top[even], top[odd], bottom[even], bottom[odd], strict=True)
            half[c::3] = bytes(sum(block) // 4 for block in blocks)
        out += half
    return b"P6\n%d %d\n255\n" % (width // 2, height // 2) + out


@contextlib.contextmanager
def serve_images(latency: float) -> Iterator[str]:
    """Serve make_image() on 127.0.0.1, any free port, `latency` s per request; yield the URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            index = int(self.path.removeprefix("/images/").removesuffix(".ppm"))
            time.sleep(latency)  # the slow network, on the server side
            body = make_image(index)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per request would drown the summary

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 128  # many workers may connect at once
        daemon_threads = False  # so that server_close() waits for requests still being answered

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="image-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()  # stops serve_forever and waits for it
        server.server_close()
        thread.join()


def positive(text: str) -> int:
    """Parse a command-line count that must be at least 1."""
    if (value := int(text)) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--count", type=positive, default=200, help="images to process (default 200)")
    add("--latency-ms", type=float, default=50, help="server delay per request (default 50)")
    add("--download-workers", type=positive, default=8)
    add("--process-workers", type=positive, default=2)
    add("--save-workers", type=positive, default=2)
    add("--out", metavar="DIR", help="keep the images here (default: a temporary directory)")
    add("--fsync", action="store_true", help="fsync every saved file")
    add("--compare", action=argparse.BooleanOptionalAction, default=True)  # or --no-compare
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
