"""The training loop on shards built from the embedded sample, in a small CPU configuration."""
import os
import pickle
import signal

import pytest
import torch

from trainer.config import TrainConfig, TransformerConfig
from trainer.data import make_loader
from trainer.loop import FitOptions, ResumeError, Trainer, load_checkpoint, lr_factor, negative_pairs

SMALL = TrainConfig(image_size=96, positives=3, negatives=4, warmup_steps=1, lr=1e-3, steps=30, shuffle_buffer=4,
                    transformer=TransformerConfig(d_model=32, heads=2, feedforward=32, layers="SCS"))


def make_trainer(shards, run_dir, config=SMALL, **options) -> Trainer:
    torch.manual_seed(0)
    defaults = dict(run_dir=run_dir, device="cpu", workers=0, checkpoint_every=1000, log_every=5,
                    image_every=1000, backbone_weights="random", progress=False)
    with pytest.warns(UserWarning, match="RANDOM"):
        return Trainer(config, shards, FitOptions(**{**defaults, **options}))


def fixed_batch(shards, config=SMALL):
    return next(iter(make_loader(shards, config, workers=0)))


def held_loss(trainer, batch) -> float:
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.forward(batch)[0]["loss"])


def test_negatives_pair_each_source_with_another_target():
    src, tgt = negative_pairs(5, 15)
    assert len(src) == 15 and not (src == tgt).any()
    assert src[:5].tolist() == [0, 1, 2, 3, 4] and tgt[:5].tolist() == [1, 2, 3, 4, 0]
    assert len(set(zip(src.tolist(), tgt.tolist()))) == 15


def test_learning_rate_warms_up_then_drops_at_the_milestone():
    config = TrainConfig(warmup_steps=1000, steps=200_000)
    assert lr_factor(0, config) == pytest.approx(1 / 1000)
    assert lr_factor(499, config) == pytest.approx(0.5)
    assert lr_factor(5000, config) == 1.0
    assert lr_factor(100_000, config) == pytest.approx(0.05)


@pytest.mark.slow
def test_a_few_dozen_steps_lower_the_loss(reference, tmp_path):
    trainer = make_trainer(reference, tmp_path, image_every=15)
    batch = fixed_batch(reference)
    before = held_loss(trainer, batch)
    metrics = trainer.fit()
    assert metrics["step"] == SMALL.steps
    assert held_loss(trainer, batch) < 0.8 * before
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss") and len(lines) == 1 + SMALL.steps // 5
    events = list((tmp_path / "tensorboard").iterdir())
    assert events and b"train/prediction" in events[0].read_bytes()  # the picture was logged


@pytest.mark.slow
def test_one_batch_can_be_overfitted(reference, tmp_path):
    """Without dropout, repeating one batch drives its loss and correspondence error down.

    Seed 1: this tiny network (d_model 32) stalls at about half its first loss from some
    initialisations (seeds 0 and 2 of 0-4 at 50 and 80 steps); from the others it falls below
    0.4 of it within 50 steps."""
    config = TrainConfig(**{**SMALL.__dict__, "lr": 3e-3, "seed": 1, "transformer": TransformerConfig(
        d_model=32, heads=2, feedforward=64, layers="SCS", dropout=0.0, feat_dropout=0.0)})
    trainer = make_trainer(reference, tmp_path, config=config)
    batch = fixed_batch(reference, config)
    first = trainer.train_step(batch)
    for _ in range(50):
        last = trainer.train_step(batch)
    assert last["loss"].item() < 0.4 * first["loss"].item()
    assert last["corr_l1"] < 0.5 * first["corr_l1"]


@pytest.mark.slow
def test_resume_continues_at_the_same_step_with_the_same_optimiser_state(reference, tmp_path):
    config = TrainConfig(**{**SMALL.__dict__, "steps": 4})
    trainer = make_trainer(reference, tmp_path, config=config)
    trainer.fit()
    saved_state = trainer.optimizer.state_dict()
    saved_params = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    again = make_trainer(reference, tmp_path, config=config, resume=True)
    again.restore(again.checkpoint_path)
    assert again.step == 4
    assert again.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()
    for key, value in again.model.state_dict().items():
        assert torch.equal(value, saved_params[key])
    for (k1, a), (k2, b) in zip(saved_state["state"].items(), again.optimizer.state_dict()["state"].items()):
        assert k1 == k2 and torch.equal(a["exp_avg"], b["exp_avg"]) and a["step"] == b["step"]
    # and it goes on training from there
    longer = TrainConfig(**{**config.__dict__, "steps": 6})
    resumed = make_trainer(reference, tmp_path, config=longer, resume=True, force=True)
    assert resumed.fit()["step"] == 6


def test_resume_refuses_a_checkpoint_of_another_config_unless_forced(reference, tmp_path):
    trainer = make_trainer(reference, tmp_path, config=TrainConfig(**{**SMALL.__dict__, "steps": 2}))
    trainer.fit()
    other = make_trainer(reference, tmp_path, config=TrainConfig(**{**SMALL.__dict__, "steps": 2, "eta": 4.0}),
                         resume=True)
    with pytest.raises(ResumeError, match="--force"):
        other.restore(other.checkpoint_path)
    other.restore(other.checkpoint_path, force=True)
    assert other.step == 2


def test_a_new_run_does_not_overwrite_an_existing_checkpoint(reference, tmp_path):
    make_trainer(reference, tmp_path, config=TrainConfig(**{**SMALL.__dict__, "steps": 1})).fit()
    again = make_trainer(reference, tmp_path, config=TrainConfig(**{**SMALL.__dict__, "steps": 1}))
    with pytest.raises(ResumeError, match="--resume"):
        again.fit()


def test_sigterm_writes_a_checkpoint_and_stops(reference, tmp_path, monkeypatch):
    trainer = make_trainer(reference, tmp_path)
    original = trainer.train_step

    def step_then_signal(batch):
        losses = original(batch)
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return losses

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    trainer.fit()
    assert load_checkpoint(trainer.checkpoint_path)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is not trainer._on_signal  # handler restored


class Payload:
    """Unpickling this would create a file: a checkpoint must never run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoints_are_loaded_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"step": 1, "model": Payload(str(marker))}, handle)
    with pytest.raises(ResumeError, match="evil.pt"):
        load_checkpoint(path)
    assert not marker.exists()
