"""The parts of a build on their own: typed style options, the per-process worker state, the shard
task as a picklable callable and the distributor seam, the style batches of a shard."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
from conftest import REFERENCE_N, REFERENCE_SHARD_SIZE, REFERENCE_SHARDS, output_files

from datagen.cli import SAMPLE_ROOT
from datagen.config import BuildConfig
from datagen.runner.distribute import InProcessDistributor, local_distributor
from datagen.runner.run import SourceSpec, StyleOptions, StyleSpec, build
from datagen.runner.task import ShardTask, _Batches
from datagen.runner.worker_state import WorkerState
from datagen.style import StyleError


@pytest.fixture
def style_dir(tmp_path):
    folder = tmp_path / "styles"
    folder.mkdir()
    for path in sorted((SAMPLE_ROOT / "train2017").glob("*.jpg"))[:2]:
        shutil.copy(path, folder / path.name)
    return folder


# -- style options -----------------------------------------------------------------------------

def test_style_options_are_typed_and_an_unknown_one_is_an_error_naming_it(style_dir):
    spec = StyleSpec({"style_dir": style_dir, "device": "cpu"})
    assert spec.options == StyleOptions(style_dir=style_dir, device="cpu")
    with pytest.raises(ValueError, match="unknown option 'styles_dir' of the style; its options: style_dir, "):
        StyleSpec({"styles_dir": style_dir})


def test_an_option_the_method_does_not_take_is_an_error_not_dropped(style_dir):
    with pytest.raises(StyleError, match="device does not apply to style 'color' \\(its options: style_dir\\)"):
        StyleSpec(StyleOptions(style_dir=style_dir, device="cpu")).make(BuildConfig(style="color"))


def test_the_library_default_is_adain_and_without_styles_it_says_what_to_give():
    assert BuildConfig().style == "adain"
    with pytest.raises(StyleError, match=r"style_dir=.*style='none'"):
        StyleSpec().make(BuildConfig())
    assert StyleSpec().make(BuildConfig(style="none")) is None


def test_a_process_makes_its_stylizer_once_per_options(style_dir, tmp_path):
    config = BuildConfig(style="color")
    first = StyleSpec({"style_dir": style_dir}).make(config)
    assert StyleSpec(StyleOptions(style_dir=style_dir)).make(config) is first
    other = shutil.copytree(style_dir, tmp_path / "other")
    assert StyleSpec(StyleOptions(style_dir=other)).make(config).style_dir == other


# -- per-process state ---------------------------------------------------------------------------

def test_a_worker_keeps_its_bank_until_the_inputs_change(reference):
    state, bank = WorkerState(), reference / "bank"
    image_root = json.loads((bank / "inputs.json").read_text())["image_root"]
    config = BuildConfig(shard_size=REFERENCE_SHARD_SIZE, style="none")
    first = state.shard_tools(bank, image_root, config, "a")
    assert state.shard_tools(str(bank), image_root, config, "a") is first
    assert state.shard_tools(bank, image_root, config, "b") is not first  # a rescan into the same folder


# -- shard tasks and distributors ----------------------------------------------------------------

class PickledReversed:
    """A distributor as a cluster one would be: every task crosses a pickle, and they run in
    another order than they were planned."""

    def __init__(self):
        self.ran = []

    def run(self, tasks, progress):
        stats = []
        for task in reversed(tasks):
            copy = pickle.loads(pickle.dumps(task))
            assert copy == task
            stats.append(copy(progress=progress))
            self.ran.append(copy.shard)
        return stats


@pytest.mark.slow
def test_a_library_build_on_another_distributor_gives_the_commands_bytes(reference, tmp_path):
    """The command's defaults are the library's: BuildConfig(shard_size, style='none') is the
    reference command's config, and its shard tasks, pickled and run backwards, write the same files."""
    distributor = PickledReversed()
    spec = SourceSpec("coco", {"root": SAMPLE_ROOT.resolve(), "split": "train2017"})
    out = tmp_path / "out"
    written = []
    build(BuildConfig(shard_size=REFERENCE_SHARD_SIZE, style="none"), spec, REFERENCE_N, out,
          distributor=distributor, show_progress=False, log=written.append)
    assert distributor.ran == list(reversed(range(REFERENCE_SHARDS)))
    assert output_files(out) == output_files(reference)


def test_the_local_distributor_is_in_process_for_one_worker():
    assert isinstance(local_distributor(1), InProcessDistributor)
    assert not isinstance(local_distributor(2), InProcessDistributor)


def test_a_shard_task_is_plain_data(reference):
    task = ShardTask(0, 5, BuildConfig(style="none"), str(reference / "bank"), "images", 0, str(reference),
                     "abc", StyleSpec({"style_dir": "styles"}))
    assert pickle.loads(pickle.dumps(task)) == task and hash(task) == hash(pickle.loads(pickle.dumps(task)))


# -- the style batches of a shard ----------------------------------------------------------------

class FakeJob:
    def __init__(self, log, number):
        self.log, self.number = log, number

    def result(self):
        self.log.append(("result", self.number))
        return ["styled"] * 2 * self.number

    def discard(self):
        self.log.append(("discard", self.number))


class FakeStyler:
    """Records submissions; a job's result is one 'styled' image per input image."""

    def __init__(self):
        self.log = []

    def submit(self, images, styles, alphas):
        self.log.append(("submit", len(images) // 2))
        return FakeJob(self.log, len(images) // 2)


class Sample:
    def __init__(self):
        self.src_image = self.tgt_image = "image"
        self.src_style_image = self.tgt_style_image = None
        self.meta = {"style": {"src": {"style": 0, "alpha": 0.5}, "tgt": {"style": 0, "alpha": 0.5}}}


def test_the_stylizer_works_one_batch_ahead_of_the_writer():
    styler = FakeStyler()
    batches = _Batches(styler)
    first = [(Sample(), {}), (Sample(), {})]
    for pair in first:
        batches.add(*pair)
    assert len(batches) == 2 and batches.send() == [] and len(batches) == 0
    batches.add(Sample(), {})
    assert batches.send() == first  # the first batch comes back after the second was sent
    assert styler.log == [("submit", 2), ("submit", 1), ("result", 2)]
    assert all(sample.src_style_image == "styled" for sample, _ in first)
    assert len(batches.collect()) == 1 and batches.collect() == []


def test_a_failing_shard_discards_the_batches_in_flight():
    styler = FakeStyler()
    batches = _Batches(styler)
    batches.add(Sample(), {})
    batches.send()
    batches.discard()
    assert styler.log[-1] == ("discard", 1) and batches.collect() == []


def test_without_a_stylizer_batches_pass_through_one_call_later():
    batches = _Batches(None)
    batches.add("a", {})
    assert batches.send() == []
    batches.add("b", {})
    assert [s for s, _ in batches.send()] == ["a"] and [s for s, _ in batches.collect()] == ["b"]
