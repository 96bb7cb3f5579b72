"""Streaming helpers every stage uses: row slabs, progress, and a reader thread running ahead of the writer."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from mt.io.safetensors import FileSpan

C = TypeVar("C", np.ndarray, FileSpan)  # a chunk of tensor bytes: an array, or a span of a file

SLAB_BYTES = 16 << 20


Progress = Callable[[int, int], None]  # (bytes just written, total bytes)


def reporting(chunks: Iterable[C], progress: Progress | None, total: int) -> Iterator[C]:
    """`chunks` passed through, each one's bytes reported to `progress` once it has been consumed."""
    for chunk in chunks:
        yield chunk
        if progress is not None:
            progress(chunk.nbytes, total)


def row_ranges(n_rows: int, row_bytes: int, budget: int = SLAB_BYTES) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges of about `budget` bytes (at least one row each) covering `n_rows` rows."""
    step = max(1, budget // max(1, row_bytes))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


Chunk = np.ndarray | FileSpan
Item = TypeVar("Item")


def grouped(items: Sequence[Item], prefetcher: "Prefetcher") -> Iterator[tuple[Item, Iterator[Chunk]]]:
    """Each item with its own chunks, from a prefetcher of (item index, chunk) pairs in order."""
    chunks = iter(prefetcher)
    pending: list[tuple[int, Chunk]] = []

    def entry_chunks(index: int) -> Iterator[Chunk]:
        while True:
            item = pending.pop() if pending else next(chunks, None)
            if item is None:
                return
            if item[0] != index:
                pending.append(item)
                return
            yield item[1]

    for index, item in enumerate(items):
        yield item, entry_chunks(index)


class Prefetcher:
    """Runs an iterator on a daemon thread, at most `depth` items ahead of the consumer."""

    _DONE = object()

    def __init__(self, items: Iterator, depth: int) -> None:
        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        threading.Thread(target=self._work, daemon=True, name="mt-prefetch").start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(e)

    def __iter__(self) -> Iterator:
        while (item := self._queue.get()) is not self._DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
