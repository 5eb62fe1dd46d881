"""Training on several processes: the shard split between ranks and loader workers, and real
two- and three-rank runs on the CPU (gloo), as torchrun would start them."""
from __future__ import annotations

import json
import os
import signal
import socket
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from conftest import REFERENCE_SHARDS

from trainer.config import TrainConfig, TransformerConfig
from trainer.data import PairStream, shard_urls, worker_shards
from trainer.loop import FitOptions, Trainer, initial_model, launched_ranks, load_checkpoint, rank_device

TINY = TrainConfig(image_size=64, positives=2, negatives=2, warmup_steps=1, lr=1e-3, steps=3, shuffle_buffer=2,
                   transformer=TransformerConfig(d_model=16, heads=2, feedforward=16, layers="SC"))


# -- the split of the shards -------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_every_shard_goes_to_exactly_one_worker_of_one_rank_per_epoch(world_size, workers):
    urls = [f"shard-{k}.tar" for k in range(7)]
    per_rank = max(workers, 1)  # a loader without worker processes reads as one worker
    total = world_size * per_rank
    for epoch in range(4):
        shares = {(rank, worker): worker_shards(urls, 0, epoch, rank * per_rank + worker, total)
                  for rank in range(world_size) for worker in range(per_rank)}
        read = [url for share in shares.values() for url in share]
        assert sorted(read) == sorted(urls), (epoch, shares)  # each shard once, none missing
        assert all(shares.values())


def test_the_shares_change_with_the_epoch_and_the_seed():
    """A pure function of (seed, epoch, index, total): every rank computes the same split, and a
    rank reads other shards from one epoch to the next."""
    urls = [f"shard-{k}.tar" for k in range(7)]
    shares = {(seed, epoch): worker_shards(urls, seed, epoch, 1, 2) for seed in (5, 6) for epoch in range(4)}
    assert len({tuple(share) for share in shares.values()}) > 2
    assert worker_shards(urls, 5, 0, 1, 2) == worker_shards(list(urls), 5, 0, 1, 2)


def test_with_fewer_shards_than_workers_every_worker_still_reads_one():
    urls = [f"shard-{k}.tar" for k in range(3)]
    for epoch in range(3):
        shares = [worker_shards(urls, 0, epoch, index, 8) for index in range(8)]
        assert all(len(share) == 1 for share in shares)
        assert {share[0] for share in shares} == set(urls)


def test_a_worker_index_outside_the_job_is_refused():
    with pytest.raises(ValueError, match="worker 4 of 4"):
        worker_shards(["a.tar"], 0, 0, 4, 4)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        PairStream(["a.tar"], TINY, rank=2, world_size=2)


def test_two_ranks_stream_disjoint_samples(reference):
    """Without any process group: the streams of rank 0 and rank 1 of 2 (4 shards) hold disjoint
    samples, and together every sample of the set within one epoch each."""
    urls = shard_urls(reference)
    streams = [iter(PairStream(urls, TINY, rank=rank, world_size=2)) for rank in (0, 1)]
    keys = [[key for _ in range(5) for key in next(stream)["keys"]] for stream in streams]  # 10 = one epoch
    assert not set(keys[0]) & set(keys[1])
    assert len(set(keys[0]) | set(keys[1])) == 20
    assert {k.split("_")[0] for k in keys[0]}.isdisjoint({k.split("_")[0] for k in keys[1]})


def test_torchrun_environment_is_read_and_checked():
    assert launched_ranks({}) is None
    assert launched_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ValueError, match="not a place"):
        launched_ranks({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="not integers"):
        launched_ranks({"RANK": "x", "WORLD_SIZE": "4"})


# -- real multi-process runs ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_rank(rank: int, world_size: int, port: int, shards: str, out: str, runs: list) -> None:
    """One rank as torchrun starts it (its place in the environment; the first Trainer joins the
    gloo group itself, the later ones find it joined), through ``runs``: (steps, resume) each, one
    after the other. Each rank gets its own run folder so that anything a rank other than 0
    wrote would show; for run ``i`` the keys it trained on, its own losses and its final weights,
    or the error it stopped with, go to ``out/rank{rank}-{i}.pt``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the random backbone's warning
    trainers = []
    for index, (steps, resume) in enumerate(runs):
        config = TrainConfig(**{**TINY.__dict__, "steps": steps})
        options = FitOptions(run_dir=Path(out) / f"run-rank{rank}", device="cpu", workers=0, log_every=1,
                             image_every=2, checkpoint_every=1000, backbone_weights="random", progress=False,
                             resume=resume, force=resume)  # more steps: another config
        trainer = Trainer(config, shards, options)
        trainers.append(trainer)
        keys, losses = [], []
        step = trainer.train_step

        def recording_step(batch, step=step, keys=keys, losses=losses):
            keys.extend(batch["keys"])
            out = step(batch)
            losses.append(float(out["loss"]))
            return out

        trainer.train_step = recording_step
        try:
            metrics = trainer.fit()
        except Exception as error:  # noqa: BLE001 - reported to the test
            record = {"error": f"{type(error).__name__}: {error}"}
        else:
            record = {"keys": keys, "losses": losses, "model": trainer.model.state_dict(), "metrics": metrics,
                      "step": trainer.step, "distributed": trainer.distributed, "owns": trainer.owns_process_group}
        torch.save(record, Path(out) / f"rank{rank}-{index}.pt")
    for trainer in trainers:
        trainer.close()


def run_ranks(world_size: int, shards, out: Path, runs: list, timeout: float = 120) -> list:
    """Start ``world_size`` ranks through ``runs`` and wait for them (a hang fails the test
    instead of blocking it); [[rank 0's record, ...] of each run]."""
    context = mp.start_processes(train_rank, args=(world_size, free_port(), str(shards), str(out), runs),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, f"{world_size} ranks still running after {timeout} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return [[torch.load(out / f"rank{rank}-{index}.pt", weights_only=False) for rank in range(world_size)]
            for index in range(len(runs))]


def assert_same_weights(states):
    for name, value in states[0].items():
        for other in states[1:]:
            assert torch.equal(value, other[name]), name


@pytest.mark.slow
def test_two_ranks_train_on_disjoint_samples_and_end_with_the_same_weights(reference, tmp_path):
    assert REFERENCE_SHARDS >= 4  # 2 ranks x 1 loader each: disjoint only with at least 2 shards
    [ranks] = run_ranks(2, reference, tmp_path, [(3, False)])
    assert all(rank["distributed"] and rank["owns"] and rank["step"] == 3 for rank in ranks)
    assert [len(rank["keys"]) for rank in ranks] == [3 * TINY.positives] * 2
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
    assert_same_weights([rank["model"] for rank in ranks])
    untrained = initial_model(TINY).state_dict()  # seeded as the ranks' network was
    assert any(not torch.equal(value, ranks[0]["model"][name]) for name, value in untrained.items())
    # the logged losses are the averages over both ranks, on both
    assert ranks[0]["losses"][-1] != ranks[1]["losses"][-1]
    for rank in ranks:
        assert rank["metrics"]["loss"] == pytest.approx((ranks[0]["losses"][-1] + ranks[1]["losses"][-1]) / 2)

    run0, run1 = tmp_path / "run-rank0", tmp_path / "run-rank1"
    assert not run1.exists()  # rank 1 writes nothing
    assert {p.name for p in run0.iterdir()} == {"checkpoint.pt", "run.json", "metrics.csv", "tensorboard"}
    assert json.loads((run0 / "run.json").read_text())["world_size"] == 2
    assert len((run0 / "metrics.csv").read_text().splitlines()) == 1 + 3
    checkpoint = load_checkpoint(run0 / "checkpoint.pt")
    assert checkpoint["step"] == 3
    assert_same_weights([checkpoint["model"], ranks[0]["model"]])  # the unwrapped network's names

    # three ranks: a new run in the same folder, which rank 0 refuses and every rank stops with
    # its error; then a resumed one (4 shards: shares of 2, 1 and 1; no rank waits for another),
    # which reads the checkpoint from rank 0 alone
    refused, again = run_ranks(3, reference, tmp_path, [(3, False), (5, True)])
    assert all("ResumeError" in rank.get("error", "") and "--resume" in rank["error"] for rank in refused)
    assert [rank["step"] for rank in again] == [5, 5, 5]
    assert [len(rank["keys"]) for rank in again] == [2 * TINY.positives] * 3
    assert not any(set(a["keys"]) & set(b["keys"]) for i, a in enumerate(again) for b in again[i + 1:])
    assert_same_weights([rank["model"] for rank in again])
    assert not (tmp_path / "run-rank1").exists() and not (tmp_path / "run-rank2").exists()
    assert len((run0 / "metrics.csv").read_text().splitlines()) == 1 + 5
    assert load_checkpoint(run0 / "checkpoint.pt")["step"] == 5

    # and by one process without any process group
    with pytest.warns(UserWarning, match="RANDOM"):
        alone = Trainer(TrainConfig(**{**TINY.__dict__, "steps": 6}), reference,
                        FitOptions(run_dir=run0, device="cpu", workers=0, backbone_weights="random", progress=False,
                                   resume=True, force=True))
    assert not alone.distributed
    alone.restore(alone.checkpoint_path, force=True)
    assert_same_weights([alone.model.state_dict(), again[0]["model"]])
    assert alone.fit()["step"] == 6


def test_without_a_launcher_nothing_is_distributed(reference, tmp_path):
    assert launched_ranks() is None
    with pytest.warns(UserWarning, match="RANDOM"):
        trainer = Trainer(TrainConfig(**{**TINY.__dict__, "steps": 1}), reference,
                          FitOptions(run_dir=tmp_path, device="cpu", workers=0, backbone_weights="random",
                                     progress=False))
    assert not trainer.distributed and trainer.net is trainer.model and (trainer.rank, trainer.world_size) == (0, 1)
    assert trainer.fit()["step"] == 1
    assert not torch.distributed.is_initialized()
    assert json.loads((tmp_path / "run.json").read_text())["world_size"] == 1
    assert load_checkpoint(tmp_path / "checkpoint.pt")["world_size"] == 1


def test_each_rank_of_a_machine_takes_its_own_gpu_or_the_cpu():
    assert rank_device("cpu", 3, 4) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            rank_device("cuda", 1, 2)
    elif torch.cuda.device_count() > 1:
        assert rank_device("auto", 1, 2) == rank_device("cuda", 1, 2) == torch.device("cuda:1")
        with pytest.raises(ValueError, match="LOCAL_RANK"):
            rank_device("cuda:0", 1, 2)


def test_a_signal_delivered_twice_to_a_rank_is_one_request():
    """Under a batch system every process gets the signal and torchrun forwards its own: the
    second copy must not turn a clean stop into an interrupt; a later second signal still does."""
    rank = SimpleNamespace(stop_requested=False, distributed=True, _signalled_at=0.0)
    Trainer._on_signal(rank, signal.SIGTERM, None)
    Trainer._on_signal(rank, signal.SIGTERM, None)
    assert rank.stop_requested
    rank._signalled_at -= 10
    with pytest.raises(KeyboardInterrupt):
        Trainer._on_signal(rank, signal.SIGINT, None)
    alone = SimpleNamespace(stop_requested=False, distributed=False, _signalled_at=0.0)
    Trainer._on_signal(alone, signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):  # one process: a second Ctrl-C stops at once, as before
        Trainer._on_signal(alone, signal.SIGINT, None)
