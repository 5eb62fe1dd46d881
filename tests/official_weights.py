"""State dicts with the official key names and reproducible random values, for the weight
loaders' tests (no weights can be downloaded where the tests run). The values come from a seeded
generator, not from a library's initialiser, so they are the same whatever the timm or torch
version."""
from __future__ import annotations

from pathlib import Path

import torch


def _write_marker(path: str) -> str:
    Path(path).write_text("the pickled payload ran")
    return "payload"


class PicklePayload:
    """A hostile object in a weights file: unpickling it writes ``marker`` (a loader that runs
    pickled code fails the test that finds the file)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def official_shapes() -> dict[str, tuple]:
    """Keys and shapes of the official dino_deitsmall16_pretrain.pth (DINO's vision_transformer.py,
    ViT-S/16: dim 384, 12 blocks, MLP 1536, no head), written out independently of timm."""
    shapes = {"cls_token": (1, 1, 384), "pos_embed": (1, 197, 384), "patch_embed.proj.weight": (384, 3, 16, 16),
              "patch_embed.proj.bias": (384,)}
    for block in range(12):
        for name, shape in (("norm1.weight", (384,)), ("norm1.bias", (384,)), ("attn.qkv.weight", (1152, 384)),
                            ("attn.qkv.bias", (1152,)), ("attn.proj.weight", (384, 384)), ("attn.proj.bias", (384,)),
                            ("norm2.weight", (384,)), ("norm2.bias", (384,)), ("mlp.fc1.weight", (1536, 384)),
                            ("mlp.fc1.bias", (1536,)), ("mlp.fc2.weight", (384, 1536)), ("mlp.fc2.bias", (384,))):
            shapes[f"blocks.{block}.{name}"] = shape
    shapes.update({"norm.weight": (384,), "norm.bias": (384,)})
    return shapes


def official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in official_shapes().items()}
