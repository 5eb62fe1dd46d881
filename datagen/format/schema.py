"""The shard sample schema: one module that both `datagen` (writing) and `trainer` (reading) use.

A sample is a set of tar members sharing a key (``000003_000042``: shard then index, no
dots). Members, in the order ``webdataset.TarWriter`` writes them (sorted by name):

=====================  =========================================================================
``json``               metadata: schema version, ids, warps, seeds, versions (UTF-8 JSON)
``src.jpg``            source image, (H, W, 3) RGB, JPEG
``src.mask.png``       source mask, (H, W) uint8 object ids: 0 = not shared, k = object k
``src.gridmask.npy``   (h, w) float16 soft, cycle-consistent mask of the shared region on the grid
``src.style.jpg``      stylised source image (absent when ``style`` is ``none``)
``src2tgt.npy``        (h, w, 2) float16: for each source cell, x then y of where it lands in the
                       target, normalised to [0, 1] of the target (cell centre at (j + 0.5) / w);
                       meaningful where ``src.gridmask`` > 0
``tgt.*``, ``tgt2src.npy``  the same for the target image
=====================  =========================================================================

Arrays are stored with ``numpy.save(allow_pickle=False)`` and read with ``allow_pickle=False``:
nothing in a shard is ever unpickled.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import cv2
import numpy as np

from datagen.format.imageio import header_size

SCHEMA_VERSION = 1

IMAGE_FIELDS = ("src.jpg", "tgt.jpg")
STYLE_FIELDS = ("src.style.jpg", "tgt.style.jpg")
MASK_FIELDS = ("src.mask.png", "tgt.mask.png")
GRID_MASK_FIELDS = ("src.gridmask.npy", "tgt.gridmask.npy")
FLOW_FIELDS = ("src2tgt.npy", "tgt2src.npy")
REQUIRED_FIELDS = ("json",) + IMAGE_FIELDS + MASK_FIELDS + GRID_MASK_FIELDS + FLOW_FIELDS


MAX_IMAGE_SIDE = 8192
"""Largest width or height an image or mask of a sample may declare (the paper's are 480)."""
MAX_GRID_SIDE = 1024
"""Largest side of a grid array (the paper's grid is 30 x 30)."""
MAX_JSON_BYTES = 1 << 20
"""Largest sample JSON (a pair's is about 2 KB)."""


class SchemaError(ValueError):
    """A sample does not follow the schema; the message names the sample and the field."""


@dataclass
class PairSample:
    """One training pair in memory.

    Images are (H, W, 3) uint8 RGB; masks (H, W) uint8 object ids; grid masks (h, w) float32
    in [0, 1]; ``src_to_tgt`` / ``tgt_to_src`` are (h, w, 2) float32, x then y, normalised to
    [0, 1] of the other image.
    """

    key: str
    src_image: np.ndarray
    tgt_image: np.ndarray
    src_mask: np.ndarray
    tgt_mask: np.ndarray
    src_grid_mask: np.ndarray
    tgt_grid_mask: np.ndarray
    src_to_tgt: np.ndarray
    tgt_to_src: np.ndarray
    meta: dict = field(default_factory=dict)
    src_style_image: np.ndarray | None = None
    tgt_style_image: np.ndarray | None = None


def encode_npy(array: np.ndarray) -> bytes:
    """``numpy.save``'s bytes of ``array`` (C order, no pickle). The header depends only on the
    dtype and the shape: once saved for one array, it is reused for the next of the same kind
    (a sample has four small grid arrays, and numpy.save spends most of its time on the header)."""
    array = np.ascontiguousarray(array)
    key = (array.dtype.str, array.shape) if array.dtype.fields is None and array.dtype.itemsize else None
    header = _NPY_HEADERS.get(key) if key is not None else None
    if header is not None:
        return header + array.tobytes()
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    if key is not None and len(_NPY_HEADERS) < 64:
        _NPY_HEADERS[key] = data[:len(data) - array.nbytes]
    return data


_NPY_HEADERS: dict = {}
"""``numpy.save`` headers by (dtype string, shape), for :func:`encode_npy`."""


def decode_npy(data: bytes, max_side: int | None = None) -> np.ndarray:
    """``.npy`` bytes -> array, never unpickling. With ``max_side``, the header's shape is checked
    before anything is allocated: every dimension at most ``max_side``, a numeric dtype."""
    buffer = io.BytesIO(data)
    if max_side is not None:
        version = np.lib.format.read_magic(buffer)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(buffer)
        if dtype.kind not in "fiu" or any(side > max_side for side in shape):
            raise ValueError(f"declares a {dtype} array of shape {tuple(shape)} (limit: numbers, sides "
                             f"<= {max_side})")
        buffer.seek(0)
    return np.load(buffer, allow_pickle=False)


def decode_grid(data: bytes) -> np.ndarray:
    """A sample's grid array (.npy) as float32, its declared shape checked first."""
    return decode_npy(data, MAX_GRID_SIDE).astype(np.float32)


def _check_declared_size(data: bytes) -> None:
    size = header_size(data)
    if size is None:
        raise ValueError("not a JPEG or PNG with a readable header")
    if max(size) > MAX_IMAGE_SIDE or min(size) < 1:
        raise ValueError(f"declares {size[0]}x{size[1]} pixels (limit: sides 1 to {MAX_IMAGE_SIDE})")


def encode_jpeg(image_rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def encode_png(mask: np.ndarray) -> bytes:
    # Masks are runs of a few values: no filter + RLE strategy is faster than the default and
    # gives smaller files.
    ok, buf = cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, 1,
                                          cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE,
                                          cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> (H, W, 3) uint8 RGB (the declared size checked before decoding)."""
    _check_declared_size(data)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("undecodable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_mask(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W) uint8 (the declared size checked before decoding)."""
    _check_declared_size(data)
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 2:
        raise ValueError("undecodable mask")
    return mask


def encode_sample(sample: PairSample, jpeg_quality: int) -> dict:
    """PairSample -> {"__key__": key, field: bytes} in the schema's field names."""
    if "." in sample.key:
        raise SchemaError(f"sample key {sample.key!r} contains a dot")
    meta = dict(sample.meta)
    meta["schema_version"] = SCHEMA_VERSION
    members = {
        "__key__": sample.key,
        "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
        "src.jpg": encode_jpeg(sample.src_image, jpeg_quality),
        "tgt.jpg": encode_jpeg(sample.tgt_image, jpeg_quality),
        "src.mask.png": encode_png(sample.src_mask),
        "tgt.mask.png": encode_png(sample.tgt_mask),
        "src.gridmask.npy": encode_npy(sample.src_grid_mask.astype(np.float16)),
        "tgt.gridmask.npy": encode_npy(sample.tgt_grid_mask.astype(np.float16)),
        "src2tgt.npy": encode_npy(sample.src_to_tgt.astype(np.float16)),
        "tgt2src.npy": encode_npy(sample.tgt_to_src.astype(np.float16)),
    }
    if sample.src_style_image is not None:
        members["src.style.jpg"] = encode_jpeg(sample.src_style_image, jpeg_quality)
    if sample.tgt_style_image is not None:
        members["tgt.style.jpg"] = encode_jpeg(sample.tgt_style_image, jpeg_quality)
    return members


def decode_sample(members: dict) -> PairSample:
    """{field: bytes} (as webdataset yields it, with "__key__") -> PairSample.

    Raises SchemaError naming the sample and the field for a missing or malformed member.
    """
    key = members.get("__key__", "?")
    missing = [name for name in REQUIRED_FIELDS if name not in members]
    if missing:
        raise SchemaError(f"sample {key}: missing fields {missing}")

    def read(name, decoder):
        try:
            return decoder(members[name])
        except Exception as error:  # noqa: BLE001 - reported with the field's name
            raise SchemaError(f"sample {key}: field {name}: {error}") from error

    if len(members["json"]) > MAX_JSON_BYTES:
        raise SchemaError(f"sample {key}: field json is {len(members['json'])} bytes (limit {MAX_JSON_BYTES})")
    meta = read("json", lambda b: json.loads(b.decode("utf-8")))
    if not isinstance(meta, dict):
        raise SchemaError(f"sample {key}: field json holds a {type(meta).__name__}, not an object")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaError(f"sample {key}: schema version {version}, this code reads {SCHEMA_VERSION}")
    sample = PairSample(
        key=key,
        src_image=read("src.jpg", decode_image),
        tgt_image=read("tgt.jpg", decode_image),
        src_mask=read("src.mask.png", decode_mask),
        tgt_mask=read("tgt.mask.png", decode_mask),
        src_grid_mask=read("src.gridmask.npy", decode_grid),
        tgt_grid_mask=read("tgt.gridmask.npy", decode_grid),
        src_to_tgt=read("src2tgt.npy", decode_grid),
        tgt_to_src=read("tgt2src.npy", decode_grid),
        meta=meta,
        src_style_image=read("src.style.jpg", decode_image) if "src.style.jpg" in members else None,
        tgt_style_image=read("tgt.style.jpg", decode_image) if "tgt.style.jpg" in members else None,
    )
    check_shapes(sample)
    return sample


def check_shapes(sample: PairSample) -> None:
    """Raise SchemaError when array shapes disagree with each other."""
    key = sample.key
    if sample.src_grid_mask.ndim != 2:
        raise SchemaError(f"sample {key}: field src.gridmask.npy has shape {tuple(sample.src_grid_mask.shape)}, "
                          f"expected (h, w)")
    grid_h, grid_w = sample.src_grid_mask.shape
    expect = {
        "src.jpg": (sample.src_image.shape[:2], sample.src_mask.shape),
        "tgt.jpg": (sample.tgt_image.shape[:2], sample.tgt_mask.shape),
        "tgt.gridmask.npy": (sample.tgt_grid_mask.shape, (grid_h, grid_w)),
        "src2tgt.npy": (sample.src_to_tgt.shape, (grid_h, grid_w, 2)),
        "tgt2src.npy": (sample.tgt_to_src.shape, (grid_h, grid_w, 2)),
    }
    for name, styled, plain in (("src.style.jpg", sample.src_style_image, sample.src_image),
                                ("tgt.style.jpg", sample.tgt_style_image, sample.tgt_image)):
        if styled is not None:
            expect[name] = (styled.shape, plain.shape)
    for name, (got, want) in expect.items():
        if tuple(got) != tuple(want):
            raise SchemaError(f"sample {key}: field {name} has shape {tuple(got)}, expected {tuple(want)}")
