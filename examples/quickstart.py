"""threadpipe quickstart: three stages of fake I/O, each with its own threads; output in order."""

import time

import threadpipe as tp


def wait(seconds, result):  # stands in for a network call or a disk write
    time.sleep(seconds)
    return result


start = time.perf_counter()
pipeline = (
    tp.Pipeline.from_iter(range(20))
    .map(lambda n: wait(0.1, n), workers=8, name="fetch")
    .map(lambda n: wait(0.02, n * n), workers=2, name="square")
    .map(lambda n: wait(0.05, f"stored {n}"), workers=4, name="store")
)
for result in pipeline:
    print(result)
print(f"20 items in {time.perf_counter() - start:.1f} s; one at a time: 20 x 0.17 s = 3.4 s")
