"""The README's quickstart: three stages, each with its own threads; output in input order."""

import time

import threadpipe as tp


def download(n):  # stands for a network call
    time.sleep(0.1)
    return n


def process(n):  # a little CPU
    return n * n


def save(n):  # stands for a disk write
    time.sleep(0.05)
    return f"saved {n}"


start = time.perf_counter()
pipeline = tp.Pipeline.from_iter(range(20)).map(download, workers=8).map(process).map(save, workers=4)
for line in pipeline:
    print(line)
print(f"20 items in {time.perf_counter() - start:.1f} s; one at a time they take 20 x 0.15 s = 3.0 s")
