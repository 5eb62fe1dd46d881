"""The hard-negative stage (trainer.hardneg): the mining criterion on a network whose masks the
test sets, the loss of a hard negative, and short runs of the stage from a tiny checkpoint."""
import math
import os
import signal

import pytest
import torch

from datagen.format.hashing import sha256_file
from trainer.config import TrainConfig, TransformerConfig
from trainer.hardneg import (
    STAGE,
    HardNegativeConfig,
    HardNegativeTrainer,
    MinedPairs,
    draw_pairs,
    mine,
    pool_pairs,
    stage_config,
)
from trainer.inference import load_for_inference
from trainer.loop import FitOptions, ResumeError, Trainer, load_checkpoint

PARENT = TrainConfig(image_size=64, positives=3, negatives=4, warmup_steps=1, lr=1e-3, steps=1, shuffle_buffer=4,
                     transformer=TransformerConfig(d_model=16, heads=2, feedforward=16, layers="SC"))
STAGE_CONFIG = HardNegativeConfig(pool=6, renew_every=2, steps=5, per_step=2)


# -- the mining criterion, on a network whose masks the test sets --------------------------------

class TableNet(torch.nn.Module):
    """A stand-in network for pools whose image k has the constant feature k (1 channel): the
    source's mask of the pair (i, j) is 2 x SRC[i][j] on the left half of its cells and 0 on the
    right half (mean SRC[i][j], max twice that), the target's is TGT[i][j] everywhere."""

    def __init__(self, src, tgt):
        super().__init__()
        self.src, self.tgt = torch.tensor(src), torch.tensor(tgt)
        self.modes = []

    def forward(self, src_feat, tgt_feat, src_hide=None, tgt_hide=None):
        self.modes.append(self.training)
        i, j = src_feat[:, 0, 0, 0].long(), tgt_feat[:, 0, 0, 0].long()
        batch, _, h, w = src_feat.shape
        src_out = torch.full((batch, 3, h, w), 0.5)
        tgt_out = torch.full((batch, 3, h, w), 0.5)
        src_out[:, 2, :, : w // 2] = 2 * self.src[i, j][:, None, None]
        src_out[:, 2, :, w // 2:] = 0.0
        tgt_out[:, 2] = self.tgt[i, j][:, None, None]
        return src_out, tgt_out


def pool_features(n: int, h: int = 2, w: int = 4) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, h, w).contiguous()


# Four pool images; images 1 and 3 come from the same sample. Scores (mean src + mean tgt):
#   (0, 1) 0.03 + 0.02 = 0.05  passes
#   (0, 2) 0.03 + 0.00 = 0.03  fails, though the max of its source mask (0.06) is above tau
#   (0, 3) 0.00 + 0.04 = 0.04  fails: not strictly above tau
#   (1, 2) 0.30 + 0.30 = 0.60  passes
#   (1, 3) 0.50 + 0.50 = 1.00  same sample: never a candidate
#   (2, 3) 0.02 + 0.03 = 0.05  passes
# (entries below the diagonal are the reversed pairs, scored only when ordered)
SRC = [[0.0, 0.03, 0.03, 0.0], [0.01, 0.0, 0.3, 0.5], [0.0, 0.0, 0.0, 0.02], [0.5, 0.0, 0.2, 0.0]]
TGT = [[0.0, 0.02, 0.0, 0.04], [0.02, 0.0, 0.3, 0.5], [0.0, 0.0, 0.0, 0.03], [0.5, 0.0, 0.0, 0.0]]
KEYS = ["a", "b", "c", "b"]


def test_pairs_whose_mean_masks_sum_above_tau_pass_and_same_sample_pairs_never_do():
    net = TableNet(SRC, TGT).train()
    mined = mine(net, pool_features(4), KEYS, tau=0.04, batch_size=2)
    assert mined.pairs.tolist() == [[0, 1], [1, 2], [2, 3]]
    assert mined.scores.tolist() == pytest.approx([0.05, 0.6, 0.05])
    assert net.modes and not any(net.modes) and net.training  # scored in eval mode, given back in train mode


def test_the_batch_size_does_not_change_what_is_mined():
    results = [mine(TableNet(SRC, TGT), pool_features(4), KEYS, 0.04, batch_size=size) for size in (1, 2, 3, 5, 64)]
    for mined in results[1:]:
        assert torch.equal(mined.pairs, results[0].pairs) and torch.equal(mined.scores, results[0].scores)


def test_ordered_pairs_score_both_orders():
    mined = mine(TableNet(SRC, TGT), pool_features(4), KEYS, tau=0.04, ordered=True)
    # (1, 0): 0.01 + 0.02 fails; (2, x): 0 + 0 fail but (2, 3) 0.05; (3, 0): 1.0; (3, 2): 0.2 + 0 = 0.2
    assert mined.pairs.tolist() == [[0, 1], [1, 2], [2, 3], [3, 0], [3, 2]]


def test_candidate_pairs_of_a_pool():
    assert pool_pairs(["a", "b", "c"]).tolist() == [[0, 1], [0, 2], [1, 2]]
    assert pool_pairs(["a", "b", "a"]).tolist() == [[0, 1], [1, 2]]
    assert len(pool_pairs([str(k) for k in range(500)])) == 500 * 499 // 2  # the paper's pool: 124,750
    assert len(pool_pairs(["a", "b", "c"], ordered=True)) == 6


def test_mining_keeps_one_number_per_pair_and_can_stop():
    calls = []
    stopped = mine(TableNet(SRC, TGT), pool_features(4), KEYS, 0.04, batch_size=1,
                   should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert stopped is None and len(calls) == 3
    with pytest.raises(ValueError, match="3 keys for 4"):
        mine(TableNet(SRC, TGT), pool_features(4), KEYS[:3], 0.04)


def test_hard_negatives_are_drawn_by_score_without_replacement():
    mined = MinedPairs(torch.tensor([[0, 1], [1, 2], [2, 3]]), torch.tensor([0.05, 0.6, 0.05]))
    draws = [tuple(map(tuple, draw_pairs(mined, 2, torch.Generator().manual_seed(seed)).tolist()))
             for seed in range(200)]
    assert all(len(set(pairs)) == 2 for pairs in draws)
    assert sum((1, 2) in pairs for pairs in draws) > 180  # probability 1 - (0.1/0.7)(0.05/0.65) per draw
    assert sorted(draw_pairs(mined, 5).tolist()) == mined.pairs.tolist()  # fewer passing pairs than asked: all
    assert draw_pairs(MinedPairs(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0)), 5).shape == (0, 2)


# -- config -------------------------------------------------------------------------------------

def test_the_papers_settings_are_the_defaults():
    config = HardNegativeConfig().validate()
    assert (config.pool, config.tau, config.renew_every, config.steps, config.lr, config.per_step) == \
        (500, 0.04, 1000, 5000, 1e-5, 5)
    assert HardNegativeConfig.from_dict(config.to_dict()) == config
    stage = stage_config(TrainConfig(), config)
    assert (stage.lr, stage.steps, stage.warmup_steps, stage.milestone) == (1e-5, 5000, 0, None)
    assert (stage.positives, stage.negatives, stage.image_size) == (5, 15, 480)


@pytest.mark.parametrize("change, message", [
    ({"pool": 1}, "--pool"), ({"tau": -0.1}, "--tau"), ({"tau": 2.0}, r"\[0, 2\)"), ({"renew_every": 0}, "--renew"),
    ({"steps": 0}, "--steps"), ({"lr": 0.0}, "--lr"), ({"per_step": 0}, "--per-step"), ({"pool": 5.5}, "--pool"),
])
def test_bad_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        HardNegativeConfig(**change).validate()


# -- the loss of a hard negative ----------------------------------------------------------------

class PixelNet(torch.nn.Module):
    """Masks equal to the feature (the images' first pixel / 255, see ``pixel_features``);
    correspondences at the cell centres."""

    def forward(self, src_feat, tgt_feat, src_hide=None, tgt_hide=None):
        def out(feat):
            b, _, h, w = feat.shape
            xs = ((torch.arange(w) + 0.5) / w).expand(b, h, w)
            ys = ((torch.arange(h) + 0.5) / h)[:, None].expand(b, h, w)
            return torch.stack([xs, ys, feat[:, 0]], dim=1)
        return out(src_feat), out(tgt_feat)


def test_a_hard_negative_adds_exactly_the_negative_term_of_eq2(tmp_path):
    """Both masks of a hard pair go towards 0 in the one BCE mean of Eq. 2: with 1 hard pair of
    2 x 2 masks at 0.2 and 0.3, the mean grows by its elements -log(0.8) and -log(0.7), nothing else
    changes."""
    config = TrainConfig(image_size=32, positives=2, negatives=2, shuffle_buffer=2,
                         transformer=TransformerConfig(d_model=16, heads=2, feedforward=16, layers="SC"))
    with pytest.warns(UserWarning, match="RANDOM"):
        trainer = Trainer(config, [], FitOptions(run_dir=tmp_path, device="cpu", backbone_weights="random",
                                                 progress=False))
    trainer.net = PixelNet()
    trainer.features = lambda images: images[:, :1, :1, 0].float()[:, None].expand(-1, 1, 2, 2) / 255
    pixel = lambda value: torch.full((2, 32, 32, 3), value, dtype=torch.uint8)  # noqa: E731
    batch = {"src_image": pixel(153), "tgt_image": pixel(102), "tgt_hide": torch.zeros(2, 2, 2, dtype=torch.bool),
             "src_mask": torch.ones(2, 1, 2, 2), "tgt_mask": torch.ones(2, 1, 2, 2),
             "src_to_tgt": torch.full((2, 2, 2, 2), 0.25), "tgt_to_src": torch.full((2, 2, 2, 2), 0.25)}
    hard = (torch.full((1, 1, 2, 2), 0.2), torch.full((1, 1, 2, 2), 0.3))
    plain, _ = trainer.forward(batch)
    with_hard, _ = trainer.forward(batch, hard)
    positives, negatives, added = 4 * 2 * 4, 2 * 2 * 4, 2 * 4  # elements: 4 terms of 2 pairs, 2 negatives, 1 hard
    expected_added = 4 * (-math.log(0.8)) + 4 * (-math.log(0.7))
    assert with_hard["mask_bce"] * (positives + negatives + added) == pytest.approx(
        plain["mask_bce"] * (positives + negatives) + expected_added, rel=1e-6)
    assert with_hard["corr_l1"] == plain["corr_l1"]
    # the hard pair's cells count among the negatives' (the usual negatives: sources 0.6, targets 0.4)
    assert (plain["acc_neg"], with_hard["acc_neg"]) == (8 / 16, (8 + 8) / (16 + 8))


# -- the stage ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parent(reference, tmp_path_factory):
    """A one-step checkpoint of the tiny PARENT config on the reference shards."""
    run_dir = tmp_path_factory.mktemp("parent")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        trainer = Trainer(PARENT, reference, FitOptions(run_dir=run_dir, device="cpu", workers=0,
                                                        backbone_weights="random", progress=False))
    trainer.fit()
    return run_dir / "checkpoint.pt"


def stage_trainer(parent, reference, run_dir, config=STAGE_CONFIG, **options) -> HardNegativeTrainer:
    defaults = dict(run_dir=run_dir, device="cpu", workers=0, checkpoint_every=1000, log_every=1,
                    image_every=1000, backbone_weights="random", progress=False)
    with pytest.warns(UserWarning, match="RANDOM"):
        return HardNegativeTrainer(parent, reference, config, FitOptions(**{**defaults, **options}))


@pytest.mark.slow
def test_the_stage_trains_from_the_checkpoint_renews_its_pool_and_records_its_parent(parent, reference, tmp_path):
    trainer = stage_trainer(parent, reference, tmp_path)
    start = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    assert all(torch.equal(value, load_checkpoint(parent)["model"][name]) for name, value in start.items())
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-5
    metrics = trainer.fit()
    assert metrics["step"] == 5 and trainer.renewals == [0, 2, 4]
    assert any(not torch.equal(value, trainer.model.state_dict()[name]) for name, value in start.items())

    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["stage"] == STAGE and checkpoint["step"] == 5
    record = checkpoint[STAGE]
    assert record["config"] == STAGE_CONFIG.to_dict()
    assert record["parent"]["sha256"] == sha256_file(parent) and record["parent"]["step"] == 1
    window = record["window"]
    assert window["start"] == 4 and window["world_size"] == 1
    [mined] = window["mined"]
    assert len(mined["keys"]) == len(set(mined["keys"])) == 6  # six distinct samples
    assert len(mined["pairs"]) == len(mined["scores"]) and (mined["scores"] > STAGE_CONFIG.tau).all()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith("hard_negatives,pool_passing,pool_size") and len(rows) == 1 + 5
    assert all(float(row.split(",")[-3]) == min(2, float(row.split(",")[-2])) for row in rows[1:])
    assert [float(value) for value in rows[-1].split(",")[-2:]] == [len(mined["pairs"]), 6]
    assert '"stage": "hard_negatives"' in (tmp_path / "run.json").read_text()
    loaded = load_for_inference(tmp_path / "checkpoint.pt", device="cpu")  # eval and predict read it as any
    assert loaded.step == 5 and loaded.config == stage_config(PARENT, STAGE_CONFIG)


@pytest.mark.slow
def test_an_interrupted_stage_resumes_to_the_weights_of_an_uninterrupted_one(parent, reference, tmp_path):
    whole = stage_trainer(parent, reference, tmp_path / "whole")
    whole.fit()

    cut = stage_trainer(parent, reference, tmp_path / "cut")
    original = cut.train_step

    def step_then_signal(batch):
        losses = original(batch)
        if cut.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return losses

    cut.train_step = step_then_signal
    cut.fit()
    assert load_checkpoint(cut.checkpoint_path)["step"] == 3 and cut.renewals == [0, 2]

    resumed = stage_trainer(parent, reference, tmp_path / "cut", resume=True)
    assert resumed.fit()["step"] == 5
    assert resumed.renewals == [4]  # window 2 came back from the checkpoint, window 4 was mined
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    lines = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    assert len(lines) == 1 + 5


@pytest.mark.slow
def test_a_stop_during_the_mining_leaves_a_checkpoint_that_mines_again(parent, reference, tmp_path, monkeypatch):
    trainer = stage_trainer(parent, reference, tmp_path)
    monkeypatch.setattr("trainer.hardneg.score_pairs", lambda *args, **kwargs: trainer._on_signal(0, None))
    assert trainer.fit() == {} and trainer.step == 0
    assert load_checkpoint(trainer.checkpoint_path)[STAGE]["window"] is None
    monkeypatch.undo()
    again = stage_trainer(parent, reference, tmp_path, config=HardNegativeConfig(**{**STAGE_CONFIG.to_dict(),
                                                                                   "steps": 1}),
                          resume=True, force=True)
    assert again.fit()["step"] == 1 and again.renewals == [0]


def test_a_resume_of_another_stage_config_or_parent_is_refused(parent, reference, tmp_path):
    stage_trainer(parent, reference, tmp_path, config=HardNegativeConfig(pool=4, renew_every=1, steps=1)).fit()
    other = stage_trainer(parent, reference, tmp_path, config=HardNegativeConfig(pool=4, renew_every=1, steps=1,
                                                                                 tau=0.1), resume=True)
    with pytest.raises(ResumeError, match="hard-negative config differs.*--force"):
        other.fit()
    # a main-stage checkpoint is not one of this stage
    with pytest.raises(ResumeError, match="not a checkpoint of the hard-negative stage"):
        other.restore(parent)
    # nor is a stage started from another checkpoint
    state = load_checkpoint(parent)
    torch.save({**state, "step": 7}, tmp_path / "other-parent.pt")
    elsewhere = stage_trainer(tmp_path / "other-parent.pt", reference, tmp_path,
                              config=HardNegativeConfig(pool=4, renew_every=1, steps=1), resume=True)
    with pytest.raises(ResumeError, match="started from another checkpoint.*--force"):
        elsewhere.fit()
    forced = stage_trainer(parent, reference, tmp_path, config=HardNegativeConfig(pool=4, renew_every=1, steps=2,
                                                                                  tau=0.1), resume=True, force=True)
    assert forced.fit()["step"] == 2


def test_the_stage_does_not_write_over_its_parent(parent, reference):
    with pytest.raises(ValueError, match="overwrite the checkpoint it starts from"):
        HardNegativeTrainer(parent, reference, STAGE_CONFIG, FitOptions(run_dir=parent.parent, device="cpu"))


# -- several processes ----------------------------------------------------------------------------

def stage_rank(rank: int, world_size: int, port: int, parent: str, shards: str, out: str, runs: list) -> None:
    """One rank of a two-process stage (gloo), as torchrun starts it, through ``runs`` ((steps,
    resume) each); its renewals, final weights and window, or its error, go to ``out/rank{rank}-{i}.pt``."""
    import warnings
    from pathlib import Path

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the random backbone's warning
    trainers = []
    for index, (steps, resume) in enumerate(runs):
        config = HardNegativeConfig(**{**STAGE_CONFIG.to_dict(), "pool": 4, "steps": steps})
        options = FitOptions(run_dir=Path(out) / f"run-rank{rank}", device="cpu", workers=0, log_every=1,
                             image_every=1000, backbone_weights="random", progress=False, resume=resume,
                             force=resume)
        trainer = HardNegativeTrainer(parent, shards, config, options)
        trainers.append(trainer)
        try:
            trainer.fit()
        except Exception as error:  # noqa: BLE001 - reported to the test
            record = {"error": f"{type(error).__name__}: {error}"}
        else:
            record = {"renewals": trainer.renewals, "model": trainer.model.state_dict(), "step": trainer.step,
                      "keys": trainer.window.keys}
        torch.save(record, Path(out) / f"rank{rank}-{index}.pt")
    for trainer in trainers:
        trainer.close()


@pytest.mark.slow
def test_two_ranks_mine_their_own_pools_and_resume_them(parent, reference, tmp_path):
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runs = [(3, False), (4, True)]
    context = mp.start_processes(stage_rank, args=(2, port, str(parent), str(reference), str(tmp_path), runs),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the two ranks are still running after 180 s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    first, second = ([torch.load(tmp_path / f"rank{rank}-{index}.pt", weights_only=False) for rank in (0, 1)]
                     for index in range(len(runs)))
    assert [rank.get("error") for rank in first + second] == [None] * 4
    assert [rank["renewals"] for rank in first] == [[0, 2]] * 2
    assert not set(first[0]["keys"]) & set(first[1]["keys"])  # each rank's pool from its own share
    # the checkpoint holds both ranks' windows; the resume takes them back (no mining) and goes on
    window = load_checkpoint(tmp_path / "run-rank0" / "checkpoint.pt")[STAGE]["window"]
    assert window["world_size"] == 2 and [m["keys"] for m in window["mined"]] == [r["keys"] for r in second]
    assert [rank["renewals"] for rank in second] == [[], []] and [rank["step"] for rank in second] == [4, 4]
    for name, value in second[0]["model"].items():
        assert torch.equal(value, second[1]["model"][name]), name
    assert not (tmp_path / "run-rank1").exists()


@pytest.mark.slow
def test_the_command_runs_the_stage_and_names_bad_options(parent, reference, tmp_path):
    from conftest import all_output, make_runner

    from trainer.cli import main

    args = ["hard-negatives", "--from", str(parent), "--shards", str(reference), "--out", str(tmp_path / "stage"),
            "--pool", "6", "--renew-every", "2", "--steps", "3", "--per-step", "2", "--workers", "0",
            "--device", "cpu", "--no-progress"]
    result = make_runner().invoke(main, args)
    assert result.exit_code == 0, all_output(result)
    assert "stopped at step 3" in result.output
    assert load_checkpoint(tmp_path / "stage" / "checkpoint.pt")["stage"] == STAGE
    bad = make_runner().invoke(main, [*args, "--tau", "2.5"])
    assert bad.exit_code == 2 and "--tau" in all_output(bad)
    onto_parent = make_runner().invoke(main, [a if a != str(tmp_path / "stage") else str(parent.parent)
                                             for a in args])
    assert onto_parent.exit_code == 1 and "Traceback" not in all_output(onto_parent)
