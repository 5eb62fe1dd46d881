"""How built pairs meet the stylizer: a background thread per worker, or one style server shared
by every worker process (the GPU set-up). The bytes must not depend on which one runs."""
import multiprocessing
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import output_files
from skimage import data

from datagen.cli import SAMPLE_ROOT
from datagen.config import BuildConfig
from datagen.runner.run import SourceSpec, StyleSpec, build
from datagen.style import StyleError
from datagen.style.adain_net import make_decoder, make_full_vgg
from datagen.style.pipeline import BLOCK_DIR, BLOCK_PREFIX, LocalStyler, StyleServer


class InvertingStylizer:
    """Stylisation by definition: the image inverted where alpha > 0.5, shifted by the style index."""

    name = "invert"
    n_styles = 3
    style_paths = [Path("a.jpg"), Path("b.jpg"), Path("c.jpg")]

    def stylize(self, images, styles, alphas):
        if any(a < 0 for a in alphas):
            raise ValueError("negative alpha")
        return [(255 - image if alpha > 0.5 else image) + np.uint8(style)
                for image, style, alpha in zip(images, styles, alphas)]


def expected(images, styles, alphas):
    return InvertingStylizer().stylize(images, styles, alphas)


@pytest.fixture()
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 250, size=shape, dtype=np.uint8) for shape in ((20, 30, 3), (7, 5, 3), (20, 30, 3))]


@pytest.fixture(scope="module")
def manager():
    with multiprocessing.Manager() as shared:
        yield shared


def shared_memory_blocks() -> set[str]:
    return {p.name for p in Path(BLOCK_DIR or tempfile.gettempdir()).glob(BLOCK_PREFIX + "*")}


def test_the_server_returns_what_the_stylizer_makes_in_request_order(images, manager):
    before = shared_memory_blocks()
    with StyleServer(InvertingStylizer(), manager) as server:
        styler = server.styler()
        assert styler.n_styles == 3 and styler.style_names == ["a.jpg", "b.jpg", "c.jpg"]
        first = styler.submit(images, [0, 1, 2], [0.9, 0.1, 0.7])
        second = styler.submit(images[:1], [2], [0.0])
        # answers are matched to their requests whatever order they are collected in
        assert all(np.array_equal(a, b) for a, b in zip(second.result(), expected(images[:1], [2], [0.0])))
        got = first.result()
        assert [g.shape for g in got] == [i.shape for i in images]
        assert all(np.array_equal(a, b) for a, b in zip(got, expected(images, [0, 1, 2], [0.9, 0.1, 0.7])))
        assert server.served == 2
    assert shared_memory_blocks() <= before  # every block was freed


def test_a_failing_request_is_raised_in_the_worker_and_the_server_goes_on(images, manager):
    with StyleServer(InvertingStylizer(), manager) as server:
        styler = server.styler()
        with pytest.raises(StyleError, match="negative alpha"):
            styler.submit(images, [0, 0, 0], [0.5, -1.0, 0.5]).result()
        again = styler.submit(images, [1, 1, 1], [0.6, 0.6, 0.6]).result()
        assert all(np.array_equal(a, b) for a, b in zip(again, expected(images, [1] * 3, [0.6] * 3)))


def test_the_local_styler_stylises_on_its_thread(images):
    with LocalStyler(InvertingStylizer()) as styler:
        got = styler.submit(images, [1, 2, 0], [0.9, 0.9, 0.2]).result()
    assert all(np.array_equal(a, b) for a, b in zip(got, expected(images, [1, 2, 0], [0.9, 0.9, 0.2])))


@pytest.fixture(scope="module")
def style_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("styles")
    for name, image in (("astronaut", data.astronaut()), ("coffee", data.coffee())):
        cv2.imwrite(str(folder / f"{name}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("method", ["color", "adain"])
def test_workers_sharing_a_style_server_write_the_same_bytes(method, style_dir, tmp_path):
    """Two workers stylising through the main process's server (AdaIN: torch on the server's
    thread, as on a GPU), against one worker stylising itself: byte-identical shards, and the
    server was really used."""
    spec = SourceSpec("coco", {"root": SAMPLE_ROOT, "split": "train2017"})
    config = BuildConfig(style=method, shard_size=3, style_batch=2)
    options = {"style_dir": style_dir}
    if method == "adain":
        torch.manual_seed(0)
        options.update(vgg_path=tmp_path / "vgg_normalised.pth", decoder_path=tmp_path / "decoder.pth",
                       device="cpu", max_side=32)
        torch.save(make_full_vgg().state_dict(), options["vgg_path"])
        torch.save(make_decoder().state_dict(), options["decoder_path"])
    style = StyleSpec(options)
    messages = []
    for name, workers, serve in (("alone", 1, None), ("served", 2, True)):
        build(config, spec, 6, tmp_path / name, workers=workers, style=style, style_server=serve,
              show_progress=False, log=messages.append, manifests_dir=tmp_path / f"{name}-manifests")
    assert any("style server: 2 workers" in m for m in messages)
    assert any(m.startswith("style server: 4 requests") for m in messages)  # 2 shards x 2 batches
    assert output_files(tmp_path / "alone") == output_files(tmp_path / "served")


def test_a_discarded_request_leaves_no_memory_behind(images, manager):
    """A shard that fails with requests in flight removes their blocks."""
    before = shared_memory_blocks()
    stylizer = InvertingStylizer()
    with StyleServer(stylizer, manager) as server:
        styler = server.styler()
        job = styler.submit(images, [0, 0, 0], [0.9, 0.9, 0.9])
        assert len(shared_memory_blocks() - before) == 1
        job.discard()
        assert shared_memory_blocks() <= before


def test_a_full_shared_memory_sends_the_blocks_to_the_temporary_directory(images, manager, monkeypatch):
    """docker's default /dev/shm (64 MB) is smaller than 16 workers' requests: when shared memory
    cannot hold a block, the request goes through a file of the temporary directory and gives the
    same images (instead of a SIGBUS when tmpfs runs out of pages)."""
    import errno
    import os

    from datagen.style import pipeline

    if pipeline.BLOCK_DIR is None:
        pytest.skip("no /dev/shm here: blocks are always in the temporary directory")
    seen, real = [], os.posix_fallocate

    def fallocate(fd, offset, length):
        where = os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))
        seen.append(where)
        if where == str(pipeline.BLOCK_DIR):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)

    monkeypatch.setattr(pipeline.os, "posix_fallocate", fallocate)
    before_tmp = set(Path(tempfile.gettempdir()).glob(BLOCK_PREFIX + "*"))
    with StyleServer(InvertingStylizer(), manager) as server:
        job = server.styler().submit(images, [0, 1, 2], [0.9, 0.1, 0.7])
        assert len(set(Path(tempfile.gettempdir()).glob(BLOCK_PREFIX + "*")) - before_tmp) == 1
        got = job.result()
    assert seen == [str(pipeline.BLOCK_DIR), tempfile.gettempdir()]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected(images, [0, 1, 2], [0.9, 0.1, 0.7])))
    assert set(Path(tempfile.gettempdir()).glob(BLOCK_PREFIX + "*")) <= before_tmp
