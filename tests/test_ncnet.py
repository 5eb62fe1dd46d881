"""Sparse NC-Net (``--arch ncnet``): the sparse 4-D maths against dense definitions, the network's
symmetry and learning, its configuration and command line, and fit / eval / predict end to end."""
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import all_output, make_runner
from dense_conv4d import conv4d, dense_consensus

from datagen.format.hashing import config_hash
from trainer.cli import main
from trainer.config import NCNetConfig, TrainConfig
from trainer.data import make_loader
from trainer.inference import load_for_inference
from trainer.loop import FitOptions, Trainer
from trainer.loss import pair_loss
from trainer.models import build_model
from trainer.models.ncnet import NeighbourhoodConsensus, SparseNCNet, match_heads, sparse_correlation, top_matches
from trainer.models.sparse4d import (
    build_kernel_map,
    from_dense,
    kernel_offsets,
    site_coords,
    site_keys,
    sparse_conv4d,
    to_dense,
)

IMAGES = Path(__file__).resolve().parents[1] / "datagen" / "sample_data" / "coco" / "train2017"
GRID = (2, 4, 5, 3, 4)
"""(B, hA, wA, hB, wB) of the random sparse tensors: different sizes along every axis."""


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _random_sites(shape=GRID, share=0.3, seed=0):
    """(n,) sorted int64 keys of a random share of the cells of ``shape``."""
    active = torch.rand(shape, generator=_generator(seed)) < share
    return active.flatten().nonzero().squeeze(1)


def _features(b, c, h, w, seed):
    return F.normalize(torch.randn(b, c, h, w, generator=_generator(seed)), dim=1)


# --- Sites and the kernel map ---------------------------------------------------------------------

def test_site_keys_are_row_major_indices_and_invert():
    coords = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [1, 3, 4, 2, 3], [1, 2, 1, 0, 2]])
    keys = site_keys(coords, GRID)
    assert keys.tolist() == [((((b * 4 + ia) * 5 + ja) * 3 + ib) * 4 + jb) for b, ia, ja, ib, jb in coords.tolist()]
    assert keys.tolist() == [0, 1, 4, 479, 240 + (2 * 5 + 1) * 12 + 2]
    dense = torch.zeros(GRID, dtype=torch.int64)
    dense[tuple(coords.t())] = torch.arange(1, 6)
    assert dense.flatten()[keys].tolist() == [1, 2, 3, 4, 5]  # the keys index the flattened grid
    assert torch.equal(site_coords(keys, GRID), coords)


def test_kernel_offsets_follow_the_weight_layout():
    offsets = kernel_offsets(3)
    assert offsets.shape == (81, 4)
    weight = torch.arange(81).view(1, 1, 3, 3, 3, 3)
    for t, (a, b, c, d) in enumerate(offsets.tolist()):
        assert weight.flatten(2)[0, 0, t] == weight[0, 0, a + 1, b + 1, c + 1, d + 1]
    assert offsets[40].tolist() == [0, 0, 0, 0] and offsets[0].tolist() == [-1, -1, -1, -1]
    with pytest.raises(ValueError, match="odd"):
        kernel_offsets(2)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_kernel_map_lists_exactly_the_neighbouring_sites(kernel_size):
    """Brute force: for every site and offset, the site at that offset if it is active and in the grid."""
    keys = _random_sites(seed=1)
    kernel_map = build_kernel_map(keys, GRID, kernel_size)
    n = len(keys)
    position = {tuple(cell): i for i, cell in enumerate(site_coords(keys, GRID).tolist())}
    table = kernel_map.neighbours.tolist()
    for (b, *cell), s in position.items():
        for t, offset in enumerate(kernel_offsets(kernel_size).tolist()):
            other = tuple(c + o for c, o in zip(cell, offset))
            inside = all(0 <= c < size for c, size in zip(other, GRID[1:]))
            assert table[s][t] == (position.get((b, *other), n) if inside else n), (s, offset)
    assert kernel_map.pairs == int((kernel_map.neighbours < n).sum()) > n  # more than the centre alone


# --- The sparse convolution against NC-Net's dense Conv4d -----------------------------------------

@pytest.mark.parametrize("c_in, c_out, kernel_size, map_size", [
    (1, 4, 3, 3),   # gather first (C_in <= C_out)
    (3, 2, 3, 3),   # multiply first (C_in > C_out)
    (2, 3, 3, 5),   # a 3-kernel layer on a map built for 5
    (2, 2, 5, 5),
])
def test_sparse_conv_equals_dense_conv4d_at_the_sites_forwards_and_backwards(c_in, c_out, kernel_size, map_size):
    keys = _random_sites(seed=2)
    kernel_map = build_kernel_map(keys, GRID, map_size)
    g = _generator(3)
    features = torch.randn(len(keys), c_in, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c_out, c_in, *(kernel_size,) * 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c_out, generator=g, dtype=torch.float64, requires_grad=True)

    sparse = sparse_conv4d(features, weight, bias, kernel_map)
    dense = from_dense(conv4d(to_dense(features, keys, GRID), weight, bias), keys)
    assert sparse.shape == (len(keys), c_out)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)

    upstream = torch.randn(sparse.shape, generator=g, dtype=torch.float64)
    sparse_grads = torch.autograd.grad(sparse, (features, weight, bias), upstream)
    dense_grads = torch.autograd.grad(dense, (features, weight, bias), upstream)
    for name, a, b in zip(("features", "weight", "bias"), sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_sparse_conv_passes_gradcheck():
    keys = _random_sites(shape=(1, 3, 3, 3, 2), share=0.5, seed=4)
    kernel_map = build_kernel_map(keys, (1, 3, 3, 3, 2), 3)
    g = _generator(5)
    for c_in, c_out in ((1, 2), (2, 1)):
        inputs = (torch.randn(len(keys), c_in, generator=g, dtype=torch.float64, requires_grad=True),
                  torch.randn(c_out, c_in, 3, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True),
                  torch.randn(c_out, generator=g, dtype=torch.float64, requires_grad=True))
        assert torch.autograd.gradcheck(lambda f, w, b: sparse_conv4d(f, w, b, kernel_map), inputs)


@pytest.mark.parametrize("symmetric", [True, False])
def test_consensus_equals_the_masked_dense_stack_forwards_and_backwards(symmetric):
    """The whole stack (ReLU, conv 3 to 4 channels, ReLU, conv 3 to 1, ReLU) with, after every layer,
    the dense output masked to the active sites; symmetric mode run literally on the swapped tensor."""
    torch.manual_seed(6)
    consensus = NeighbourhoodConsensus(kernel_sizes=(3, 3), channels=(4, 1), symmetric=symmetric).double()
    with torch.no_grad():  # keep units alive so that the ReLUs do not hide differences
        consensus.convs[1].bias.fill_(0.05)
    keys = _random_sites(share=0.4, seed=7)
    kernel_map = build_kernel_map(keys, GRID, consensus.kernel_size)
    correlation = torch.randn(len(keys), generator=_generator(8), dtype=torch.float64, requires_grad=True)

    sparse = consensus(correlation, kernel_map)
    active = to_dense(torch.ones(len(keys), 1, dtype=torch.float64), keys, GRID)
    weights = [conv.weight for conv in consensus.convs]
    biases = [conv.bias for conv in consensus.convs]
    dense = from_dense(dense_consensus(to_dense(correlation[:, None], keys, GRID), active, weights, biases, symmetric),
                       keys)[:, 0]
    assert (sparse > 0).sum() > len(keys) // 4
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)

    upstream = torch.randn(sparse.shape, generator=_generator(9), dtype=torch.float64)
    params = (correlation, *weights, *biases)
    for a, b in zip(torch.autograd.grad(sparse, params, upstream), torch.autograd.grad(dense, params, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --- Sparse correlation and heads -----------------------------------------------------------------

def test_sparse_correlation_is_the_union_of_both_directions_top_k():
    src, tgt = _features(2, 8, 4, 5, 10), _features(2, 8, 3, 4, 11)
    k = 3
    correlation = sparse_correlation(src, tgt, k)
    dense = torch.einsum("bcn,bcm->bnm", src.flatten(2), tgt.flatten(2))  # (B, nA, nB)
    expected = {}
    for b in range(2):
        for a in range(20):
            for t in dense[b, a].topk(k).indices.tolist():
                expected[(b, a, t)] = expected.get((b, a, t), 0.0) + dense[b, a, t].item()
        for t in range(12):
            for a in dense[b, :, t].topk(k).indices.tolist():
                expected[(b, a, t)] = expected.get((b, a, t), 0.0) + dense[b, a, t].item()
    found = {(b, ia * 5 + ja, ib * 4 + jb): value
             for (b, ia, ja, ib, jb), value in zip(correlation.coords.tolist(), correlation.values.tolist())}
    assert found.keys() == expected.keys()
    assert any(abs(expected[key] - dense[key].item()) > 1e-6 for key in expected)  # some are sums of both
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, abs=1e-6)
    assert torch.equal(correlation.keys, correlation.keys.sort().values)
    assert torch.equal(site_keys(correlation.coords, correlation.shape), correlation.keys)


def test_top_matches_in_blocks_equal_one_block():
    src, tgt = _features(2, 8, 5, 5, 12).flatten(2), _features(2, 8, 4, 6, 13).flatten(2)
    for k in (4, 10):  # k above the block size too
        whole = top_matches(src, tgt, k, chunk_elements=1 << 20)
        blocks = top_matches(src, tgt, k, chunk_elements=2 * 24 * 3)  # blocks of 3 source cells
        for a, b in zip(whole, blocks):
            torch.testing.assert_close(a, b)
        assert whole[0].shape == (2, 25, k) and whole[2].shape == (2, 24, k)
    few = top_matches(src[:, :, :2], tgt, 4)  # k clipped to the two source cells
    assert few[2].shape == (2, 24, 2)


def _dense_eq1(logits, other_h, other_w):
    """(G, h' w') logits -> (3, G): soft-argmax x, y and max of the softmax over the other image's cells."""
    probs = torch.softmax(logits, dim=1)
    ys, xs = torch.meshgrid(torch.arange(other_h, dtype=probs.dtype), torch.arange(other_w, dtype=probs.dtype),
                            indexing="ij")
    centre_x, centre_y = ((xs + 0.5) / other_w).flatten(), ((ys + 0.5) / other_h).flatten()
    return torch.stack((probs @ centre_x, probs @ centre_y, probs.max(dim=1).values))


def test_heads_are_eq1_on_the_dense_tensor_that_is_zero_off_the_sites():
    shape = (2, 3, 4, 2, 3)
    keys = _random_sites(shape=shape, share=0.3, seed=14)
    full_row = site_keys(torch.tensor([[1, 2, 0, i, j] for i in range(2) for j in range(3)]), shape)
    keys = torch.unique(torch.cat((keys, full_row)))  # one source cell has every target cell as a site
    coords = site_coords(keys, shape)
    scores = (3 * torch.rand(len(keys), generator=_generator(15), dtype=torch.float64)).requires_grad_()
    b, ia, ja, ib, jb = coords.unbind(1)

    src_heads = match_heads(scores, b * 12 + ia * 4 + ja, ib * 3 + jb, 2 * 12, (2, 3))
    tgt_heads = match_heads(scores, b * 6 + ib * 3 + jb, ia * 4 + ja, 2 * 6, (3, 4))
    dense = to_dense(scores[:, None], keys, shape)[:, 0].reshape(2, 12, 6)
    src_dense = _dense_eq1(dense.reshape(24, 6), 2, 3)
    tgt_dense = _dense_eq1(dense.transpose(1, 2).reshape(12, 12), 3, 4)
    torch.testing.assert_close(src_heads, src_dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tgt_heads, tgt_dense, rtol=1e-12, atol=1e-12)

    upstream = torch.randn(3, 24, generator=_generator(16), dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(src_heads, scores, upstream)[0],
                               torch.autograd.grad(src_dense, scores, upstream)[0], rtol=1e-10, atol=1e-12)


# --- The network ----------------------------------------------------------------------------------

def test_build_model_makes_the_papers_sparse_ncnet():
    model = build_model(TrainConfig(arch="ncnet"))
    assert isinstance(model, SparseNCNet)
    assert model.config == NCNetConfig(k=10, kernel_sizes=(3, 3), channels=(16, 1), symmetric=True)
    assert [tuple(conv.weight.shape) for conv in model.consensus.convs] == [(16, 1, 3, 3, 3, 3), (1, 16, 3, 3, 3, 3)]
    assert model.consensus.symmetric


def test_outputs_follow_the_forward_contract_and_ignore_hide_masks():
    torch.manual_seed(0)
    model = SparseNCNet(NCNetConfig(k=4)).train()
    src, tgt = _features(2, 16, 6, 7, 17), _features(2, 16, 5, 4, 18)
    src_out, tgt_out = model(src, tgt)
    assert src_out.shape == (2, 3, 6, 7) and tgt_out.shape == (2, 3, 5, 4)
    for out in (src_out, tgt_out):
        assert out.dtype == torch.float32 and ((out >= 1e-7) & (out <= 1 - 1e-7)).all()
    hide = torch.rand(2, 5, 4, generator=_generator(19)) < 0.5
    hidden = model(src, tgt, tgt_hide=hide)
    assert torch.equal(hidden[0], src_out) and torch.equal(hidden[1], tgt_out)
    with pytest.raises(ValueError, match="batch size and channels"):
        model(src, _features(2, 8, 5, 4, 0))


def test_autocast_does_not_change_the_result():
    model = SparseNCNet(NCNetConfig(k=4)).eval()
    src, tgt = _features(1, 16, 5, 5, 20), _features(1, 16, 5, 5, 21)
    with torch.no_grad():
        plain = model(src, tgt)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(src, tgt)
    for a, b in zip(plain, autocast):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def _swap_gap(symmetric: bool) -> float:
    """Largest difference between model(src, tgt) and model(tgt, src) with its outputs swapped back."""
    torch.manual_seed(22)
    model = SparseNCNet(NCNetConfig(k=3, channels=(8, 1), symmetric=symmetric)).eval()
    with torch.no_grad():
        model.consensus.convs[1].bias.fill_(0.1)  # alive units: outputs that depend on the weights
        model.consensus.convs[1].weight.mul_(20)
        src, tgt = _features(2, 16, 5, 6, 23), _features(2, 16, 4, 5, 24)
        src_out, tgt_out = model(src, tgt)
        swapped_tgt_out, swapped_src_out = model(tgt, src)
    assert src_out[:, 2].std() > 1e-3  # not a trivially uniform output
    return max((src_out - swapped_src_out).abs().max().item(), (tgt_out - swapped_tgt_out).abs().max().item())


def test_symmetric_mode_swaps_the_outputs_with_the_images():
    assert _swap_gap(symmetric=True) < 1e-5
    assert _swap_gap(symmetric=False) > 1e-3  # the kernels themselves are not symmetric


def _shifted_copy(h, w, dy, dx, channels=16, seed=25):
    """Source features and a target that is the source moved by (dy, dx) cells (new features enter
    at the border), with the ground truth of the loss: masks of the shared cells, correspondences."""
    big = _features(1, channels, h + dy, w + dx, seed)
    src, tgt = big[:, :, :h, :w].contiguous(), big[:, :, dy:, dx:].contiguous()
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    src_mask = ((ys >= dy) & (xs >= dx)).float()[None, None]  # source cell (i, j) is target (i - dy, j - dx)
    tgt_mask = ((ys < h - dy) & (xs < w - dx)).float()[None, None]
    src_to_tgt = torch.stack(((xs - dx + 0.5) / w, (ys - dy + 0.5) / h))[None].clamp(0, 1)
    tgt_to_src = torch.stack(((xs + dx + 0.5) / w, (ys + dy + 0.5) / h))[None].clamp(0, 1)
    return src, tgt, (src_mask, tgt_mask, src_to_tgt, tgt_to_src)


def _displacements(model, src, tgt, src_mask, h, w):
    """(m, 2) predicted (x, y) displacement in cells of the source's m shared cells."""
    with torch.no_grad():
        src_out = model.eval()(src, tgt)[0][0]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    moved = torch.stack((src_out[0] * w - 0.5 - xs, src_out[1] * h - 0.5 - ys), dim=-1)
    return moved[src_mask[0, 0] > 0]


def test_soft_argmax_recovers_a_shift_after_a_few_training_steps():
    h, w, dy, dx = 6, 6, 1, 2
    src, tgt, truth = _shifted_copy(h, w, dy, dx)
    torch.manual_seed(0)
    model = SparseNCNet(NCNetConfig())
    shift = torch.tensor([-dx, -dy], dtype=torch.float32)
    before = _displacements(model, src, tgt, truth[0], h, w)
    assert (before - shift).abs().mean() > 1.0  # untrained: about the centre of the target
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = pair_loss(*model.train()(src, tgt), *truth)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _displacements(model, src, tgt, truth[0], h, w)
    assert (after.mean(dim=0) - shift).abs().max() < 0.2
    assert ((after - shift).abs().max(dim=1).values < 0.25).float().mean() >= 0.8


# --- Configuration and command line ---------------------------------------------------------------

def test_configs_from_before_ncnet_load_and_hash_as_before():
    """A config without the ncnet field hashes as it did before the field existed (the field is
    left out of the dict while it cannot matter), and reads back equal."""
    old = TrainConfig().to_dict()
    assert "ncnet" not in old
    assert config_hash(TrainConfig()) == config_hash(TrainConfig.from_dict(old))
    assert TrainConfig.from_dict(old) == TrainConfig()
    config = TrainConfig(arch="ncnet", ncnet=NCNetConfig(k=5, kernel_sizes=(3, 5), channels=(8, 1)))
    stored = json.loads(json.dumps(config.to_dict()))  # as in run.json and checkpoints: lists
    assert stored["ncnet"]["kernel_sizes"] == [3, 5]
    assert TrainConfig.from_dict(stored) == config and config_hash(TrainConfig.from_dict(stored)) == config_hash(config)
    assert config_hash(config) != config_hash(TrainConfig(arch="ncnet"))


@pytest.mark.parametrize("ncnet, message", [
    (NCNetConfig(k=0), "k must be a positive"),
    (NCNetConfig(kernel_sizes=(3, 4)), "odd"),
    (NCNetConfig(kernel_sizes=(3,), channels=(16, 1)), "same length"),
    (NCNetConfig(channels=(16, 2)), "1 channel"),
    (NCNetConfig(temperature=0.0), "temperature must be positive"),
])
def test_bad_ncnet_settings_are_refused_with_clear_messages(ncnet, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(arch="ncnet", ncnet=ncnet).validate()


def test_fit_options_reach_the_ncnet_config(reference, tmp_path, monkeypatch):
    import trainer.loop

    seen = {}

    def fake_fit(config, shards, options):
        seen["config"] = config
        return {"step": 0}

    monkeypatch.setattr(trainer.loop, "fit", fake_fit)
    args = ["fit", "--shards", str(reference), "--out", str(tmp_path / "run"), "--arch", "ncnet", "--ncnet-k", "5",
            "--ncnet-kernel-sizes", "3,5", "--ncnet-channels", "8,1", "--ncnet-asymmetric", "--ncnet-temperature",
            "0.5", "--backbone-weights", "random", "--no-progress"]
    result = make_runner().invoke(main, args)
    assert result.exit_code == 0, all_output(result)
    assert seen["config"].arch == "ncnet"
    assert seen["config"].ncnet == NCNetConfig(k=5, kernel_sizes=(3, 5), channels=(8, 1), symmetric=False,
                                               temperature=0.5)

    for option, value, words in (("--ncnet-kernel-sizes", "3,4", "odd"), ("--ncnet-channels", "16,2", "1 channel"),
                                 ("--ncnet-kernel-sizes", "3;3", "comma-separated"), ("--arch", "nope", "nope")):
        bad = make_runner().invoke(main, [*args, option, value])
        assert bad.exit_code == 2 and words in all_output(bad), (option, all_output(bad))


def test_fit_help_lists_ncnet_and_its_options():
    result = make_runner().invoke(main, ["fit", "--help"])
    assert result.exit_code == 0
    for words in ("ncnet", "--ncnet-k", "--ncnet-kernel-sizes", "--ncnet-channels", "--ncnet-asymmetric",
                  "--ncnet-temperature"):
        assert words in result.output


# --- End to end -----------------------------------------------------------------------------------

SMALL = TrainConfig(arch="ncnet", image_size=96, positives=3, negatives=4, warmup_steps=1, lr=3e-3, steps=3,
                    shuffle_buffer=4, ncnet=NCNetConfig(k=5))


@pytest.mark.slow
def test_fit_eval_and_predict_run_end_to_end(reference, tmp_path):
    torch.manual_seed(0)
    options = FitOptions(run_dir=tmp_path / "run", device="cpu", workers=0, log_every=1, backbone_weights="random",
                         progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random backbone's warning
        trainer = Trainer(SMALL, reference, options)
        batch = next(iter(make_loader(reference, SMALL, workers=0)))
        first = trainer.train_step(batch)
        for _ in range(5):
            last = trainer.train_step(batch)
        assert last["corr_l1"] < 0.9 * first["corr_l1"]  # it learns on a repeated batch
        trainer.step = 0
        metrics = trainer.fit()
    assert metrics["step"] == SMALL.steps

    config, _, model, step, _ = load_for_inference(trainer.checkpoint_path, "cpu")
    assert config == SMALL and isinstance(model, SparseNCNet) and step == SMALL.steps
    assert torch.equal(model.consensus.convs[0].weight, trainer.model.consensus.convs[0].weight)

    result = make_runner().invoke(main, ["eval", "--shards", str(reference), "--ckpt", str(trainer.checkpoint_path),
                                         "--max-samples", "4", "--json", str(tmp_path / "eval.json"),
                                         "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, all_output(result)
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["samples"] == 4 and 0 <= evaluation["mask_iou"] <= 1 and evaluation["corr_cells"] > 0

    result = make_runner().invoke(main, ["predict", str(IMAGES / "000000000009.jpg"), str(IMAGES / "000000000025.jpg"),
                                         "--ckpt", str(trainer.checkpoint_path), "--out", str(tmp_path / "pred"),
                                         "--device", "cpu"])
    assert result.exit_code == 0, all_output(result)
    record = json.loads((tmp_path / "pred" / "result.json").read_text())
    assert record["step"] == SMALL.steps and all(0 < m < 1 for m in record["mask_mean"])
    assert (tmp_path / "pred" / "pair.png").is_file() and (tmp_path / "pred" / "masks.png").is_file()
