"""``datagen preview``: the first samples of some shards as a PNG/JPEG contact sheet or an HTML
page, drawn by :mod:`datagen.format.draw`."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import cv2
import numpy as np

from datagen.format.draw import PAIR_WIDTH, fit_width, render_contact_sheet, render_pair
from datagen.format.schema import PairSample, SchemaError, decode_sample
from datagen.format.shards import ShardError, iter_tar_samples
from datagen.format.storage import location

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
HTML_JPEG_QUALITY = 85
"""Quality of the pictures inlined in an HTML preview (JPEG keeps a page to a few hundred KB a
pair, where PNGs would take about 1 MB)."""
HTML_EXTENSIONS = (".html", ".htm")


def _encode_rgb(image: np.ndarray, extension: str, quality: int = 90) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if extension in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(extension, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"encoding the preview as {extension} failed")
    return buf.tobytes()


def read_samples(shard_paths, n: int, problems: list | None = None) -> list[PairSample]:
    """The first ``n`` readable samples across ``shard_paths``, in order. An unreadable shard
    (from where it breaks) or sample is skipped and described in ``problems`` when given."""
    samples: list[PairSample] = []
    problems = [] if problems is None else problems
    for path in shard_paths:
        if len(samples) >= n:
            break
        try:
            for members in iter_tar_samples(path):
                try:
                    samples.append(decode_sample(members))
                except SchemaError as error:
                    problems.append(f"{location(path).name}: {error}")
                    continue
                if len(samples) >= n:
                    break
        except ShardError as error:
            problems.append(str(error))
    return samples


def _image_id(meta: dict, role: str):
    """The id of the pair's ``source_image`` or ``background_image`` from the sample JSON."""
    return (meta.get(role) or {}).get("id", "?")


def _html_page(samples: list[PairSample], seed: int, fill: bool) -> str:
    figures = []
    for i, sample in enumerate(samples):
        pair = render_pair(sample, seed=seed + i, fill=fill)
        pair = fit_width(pair, min(pair.shape[1], 2 * PAIR_WIDTH))
        jpeg = base64.b64encode(_encode_rgb(pair, ".jpg", HTML_JPEG_QUALITY)).decode("ascii")
        meta = sample.meta
        objects = [o for o in meta.get("objects", []) if isinstance(o, dict)]
        categories = ", ".join(str(o.get("category", "?")) for o in objects) or "?"
        n_objects = len(objects)
        caption = (f"<b>{html.escape(sample.key)}</b> &middot; source image "
                   f"{html.escape(str(_image_id(meta, 'source_image')))} &middot; "
                   f"background image "
                   f"{html.escape(str(_image_id(meta, 'background_image')))} &middot; "
                   f"categories: {html.escape(categories)} &middot; objects: {html.escape(str(n_objects))}")
        figures.append(f'<figure><img src="data:image/jpeg;base64,{jpeg}" alt="{html.escape(sample.key)}">'
                       f"<figcaption>{caption}</figcaption></figure>")
    style = ("body{font-family:sans-serif;background:#f4f4f4;margin:16px}"
             "figure{display:inline-block;margin:8px;background:#fff;padding:8px;vertical-align:top}"
             "img{max-width:100%;display:block}figcaption{font-size:13px;margin-top:4px}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>datagen preview</title>"
            f"<style>{style}</style></head><body>\n<h1>datagen preview: {len(samples)} pairs</h1>\n"
            + "\n".join(figures) + "\n</body></html>\n")


def write_preview(shard_paths, out_path, n: int = 16, seed: int = 0, fill: bool = False,
                  problems: list | None = None) -> int:
    """Render the first ``n`` samples of ``shard_paths`` to ``out_path``; returns the pairs rendered.

    ``.png``/``.jpg``/``.jpeg``: one contact sheet image; ``.html``/``.htm``: a self-contained page,
    one inline JPEG per pair (at most 960 px wide, quality 85: about 100-250 KB a pair) with its
    key, image ids, categories and object count. ``fill``: masks tinted as well as outlined.
    Unreadable shards and samples are skipped and described in ``problems`` when given.
    Raises ValueError for another extension or when the shards hold no readable sample.
    """
    out_path = Path(out_path)
    extension = out_path.suffix.lower()
    if extension not in IMAGE_EXTENSIONS + HTML_EXTENSIONS:
        raise ValueError(f"preview {out_path}: extension must be one of "
                         f"{IMAGE_EXTENSIONS + HTML_EXTENSIONS}, got {extension or 'none'!r}")
    shard_paths = [location(p) for p in shard_paths]
    samples = read_samples(shard_paths, n, problems)
    if not samples:
        raise ValueError(f"preview {out_path}: no samples in {[str(p) for p in shard_paths]}")
    if extension in HTML_EXTENSIONS:
        data = _html_page(samples, seed, fill).encode("utf-8")
    else:
        data = _encode_rgb(render_contact_sheet(samples, seed=seed, fill=fill), extension)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(data)
    return len(samples)
