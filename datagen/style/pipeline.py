"""Where the pair builder meets the stylizer, so that neither waits for the other.

A shard worker builds pairs on the CPU and hands each batch of ``config.style_batch`` pairs to a
*styler*, which returns a job at once; the worker goes on building the next batch and collects
the stylised images only when it writes the batch (double buffering: one batch stylised while the
next is built). Two stylers:

- :class:`LocalStyler`: the worker's own stylizer, run on one background thread of the worker
  (torch and OpenCV release the GIL). The default on the CPU, and with a single worker.
- :class:`RemoteStyler`: the handle of a :class:`StyleServer`, the single stylizer of the main
  process (on the GPU), shared by every worker process. A worker writes its images into a block
  of shared memory, sends the block's name through a queue and goes on building; the server
  stylises requests in arrival order, writes the results back into the same block and answers.
  A block is a file memory-mapped by both processes, in ``/dev/shm`` where there is one with
  room (so in memory), else in the temporary directory; the worker deletes it when it has the
  results.
  The GPU is fed by all workers at once and holds one copy of the networks, and the images cross
  between processes as one memory copy each way (pickling a batch of images through a queue
  costs far more).

Each request is stylised by one ``stylizer.stylize`` call on exactly the images the worker would
have stylised itself, so the bytes do not depend on which process did it, on the number of
workers or on timing.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from datagen.style import StyleError


def style_names(stylizer) -> list[str]:
    """File names of the stylizer's style images ([] when it has no paths)."""
    return [path.name for path in getattr(stylizer, "style_paths", [])]


class _LocalJob:
    """A stylisation running on a :class:`LocalStyler`'s thread."""

    def __init__(self, future: Future):
        self._future = future

    def result(self) -> list[np.ndarray]:
        return self._future.result()

    def discard(self) -> None:
        """Give up on it (it holds no resources beyond the thread's work)."""
        self._future.cancel()


class LocalStyler:
    """Runs ``stylizer`` on one background thread of this process; use as a context manager
    (the thread stops on exit)."""

    def __init__(self, stylizer):
        self.stylizer = stylizer
        self.n_styles = stylizer.n_styles
        self.style_names = style_names(stylizer)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stylize")

    def submit(self, images: list[np.ndarray], styles: list[int], alphas: list[float]) -> _LocalJob:
        """Start stylising (H, W, 3) uint8 ``images``; ``.result()`` gives the stylised list."""
        return _LocalJob(self._executor.submit(self.stylizer.stylize, images, styles, alphas))

    def __enter__(self) -> LocalStyler:
        return self

    def __exit__(self, *exc) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _images_layout(images: list[np.ndarray]) -> tuple[list[tuple], int]:
    """Shapes of same-dtype uint8 images and the bytes they take back to back."""
    shapes = [tuple(image.shape) for image in images]
    for image in images:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise StyleError(f"images to stylise must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    return shapes, sum(int(np.prod(shape)) for shape in shapes)


BLOCK_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
"""Where request blocks live: shared memory on Linux, else the temporary directory."""
BLOCK_PREFIX = "segswap-style-"


def _views(block: np.memmap, shapes: list[tuple]) -> list[np.ndarray]:
    """(H, W, 3) uint8 views of the flat uint8 ``block``, one per shape, back to back."""
    views, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        views.append(block[offset:offset + size].reshape(shape))
        offset += size
    return views


def _new_block(size: int) -> tuple[str, np.memmap]:
    """A new memory-mapped file of ``size`` bytes: (path, flat uint8 writable map).

    Its memory is reserved when it is made (``posix_fallocate``): a full ``/dev/shm`` (docker
    gives containers 64 MB unless told otherwise, less than 16 workers' requests) is then an
    error here, and the block goes to the temporary directory instead, rather than a SIGBUS
    when a process writes into pages that tmpfs cannot give."""
    size = max(1, size)
    for directory in (BLOCK_DIR, None) if BLOCK_DIR is not None else (None,):
        handle, path = tempfile.mkstemp(prefix=BLOCK_PREFIX, dir=directory)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(handle, 0, size)
            else:
                os.ftruncate(handle, size)
        except OSError:
            os.close(handle)
            os.unlink(path)
            if directory is None:
                raise
            continue
        os.close(handle)
        return path, np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,))
    raise AssertionError("unreachable")


class _RemoteJob:
    """A request in flight at the style server; :meth:`result` waits for it and frees its memory."""

    def __init__(self, styler: RemoteStyler, number: int, path: str, shapes: list[tuple]):
        self._styler, self._number, self._path, self._shapes = styler, number, path, shapes
        self._images: list[np.ndarray] | None = None

    def result(self) -> list[np.ndarray]:
        if self._images is None:
            try:
                status, detail = self._styler._reply(self._number)
                if status != "ok":
                    raise StyleError(f"the style server failed on this request: {detail}")
                block = np.fromfile(self._path, dtype=np.uint8)
                self._images = [view.copy() for view in _views(block, self._shapes)]
            finally:
                os.unlink(self._path)
        return self._images

    def discard(self) -> None:
        """Give up on the request: remove its block unless :meth:`result` already has (the server
        may still stylise it into the unlinked file, or answer that it is gone)."""
        if self._images is None:
            Path(self._path).unlink(missing_ok=True)


class RemoteStyler:
    """A worker's handle on a :class:`StyleServer`: picklable, made in the main process by
    :meth:`StyleServer.styler`, used in one worker at a time."""

    def __init__(self, requests, replies, n_styles: int, names: list[str]):
        self._requests, self._replies = requests, replies
        self.n_styles, self.style_names = n_styles, names
        self._sent = 0
        self._received: dict[int, tuple] = {}

    def submit(self, images: list[np.ndarray], styles: list[int], alphas: list[float]) -> _RemoteJob:
        """Copy ``images`` into shared memory and queue them; returns at once."""
        shapes, size = _images_layout(images)
        path, block = _new_block(size)
        for view, image in zip(_views(block, shapes), images):
            view[...] = image
        block.flush()
        del block
        number, self._sent = self._sent, self._sent + 1
        self._requests.put((self._replies, number, path, shapes,
                            [int(s) for s in styles], [float(a) for a in alphas]))
        return _RemoteJob(self, number, path, shapes)

    def styler(self, config=None) -> RemoteStyler:
        """Itself: a shard worker asks its style option for a styler (see ``StyleSpec.styler``)."""
        return self

    def _reply(self, number: int) -> tuple:
        """(status, detail) of request ``number``; answers of earlier requests are kept."""
        while number not in self._received:
            answered, status, detail = self._replies.get()
            self._received[answered] = (status, detail)
        return self._received.pop(number)

    def __enter__(self) -> RemoteStyler:
        return self

    def __exit__(self, *exc) -> None:
        pass


class StyleServer:
    """Serves ``stylizer`` (of this process) to worker processes through ``manager``'s queues, on
    one thread of this process; a context manager (the thread stops on exit).

    Requests are handled one at a time in arrival order; a failing request is answered with the
    error's text (the worker raises it), and the server goes on."""

    def __init__(self, stylizer, manager):
        self.stylizer = stylizer
        self._manager = manager
        self._requests = manager.Queue()
        self._thread = threading.Thread(target=self._serve, name="style-server", daemon=True)
        self.served = 0
        """Requests stylised so far."""
        self.busy_seconds = 0.0
        """Time spent stylising (the rest of :attr:`open_seconds` it waited for requests)."""
        self._opened = None
        self._closed = None

    def styler(self) -> RemoteStyler:
        """A new handle for one worker task, with its own answer queue."""
        return RemoteStyler(self._requests, self._manager.Queue(), self.stylizer.n_styles,
                            style_names(self.stylizer))

    @property
    def open_seconds(self) -> float:
        """Seconds since the server started (until it stopped)."""
        if self._opened is None:
            return 0.0
        return (self._closed or time.perf_counter()) - self._opened

    def __enter__(self) -> StyleServer:
        self._opened = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._requests.put(None)
        self._thread.join()
        self._closed = time.perf_counter()

    def _serve(self) -> None:
        while (request := self._requests.get()) is not None:
            replies, number, path, shapes, styles, alphas = request
            started = time.perf_counter()
            try:
                self._stylize_block(path, shapes, styles, alphas)
                answer = ("ok", None)
                self.served += 1
            except Exception as error:  # noqa: BLE001 - answered to the worker, which raises it
                answer = ("error", f"{type(error).__name__}: {error}")
            self.busy_seconds += time.perf_counter() - started
            replies.put((number, *answer))

    def _stylize_block(self, path: str, shapes: list[tuple], styles: list[int], alphas: list[float]) -> None:
        """Stylise the images laid out in the block at ``path`` and write the results over them."""
        block = np.memmap(path, dtype=np.uint8, mode="r+")
        views = _views(block, shapes)
        results = self.stylizer.stylize([np.array(view) for view in views], styles, alphas)
        for view, result in zip(views, results):
            view[...] = result
        block.flush()
