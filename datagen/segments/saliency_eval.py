"""Unsupervised saliency metrics of a segment bank against ground-truth masks (the paper's Table 4,
as LOST / TokenCut evaluate on ECSSD, DUTS and DUT-OMRON), under two protocols, both reported.

For every image, max F-beta (β² = 0.3), IoU and pixel accuracy compare a prediction with the
ground-truth mask (read as grey levels 0-255, a colour file converted to grey as TokenCut's
``convert('L')`` does) at the image's resolution. F is computed per image
and per threshold t, then averaged over images for each t (F, not precision and recall, is
averaged: TokenCut's ``F_max`` takes ``F_score(precisions, recalls).mean(dim=0).max()`` over
an images x thresholds table), and the best t is reported. IoU and accuracy are averaged over
images.

- :data:`REFERENCE`, TokenCut's protocol (``unsupervised_saliency_detection/metric.py``):
  the prediction of LOST + bilateral solver is the solver's soft output s in [0, 1] before any
  threshold or post-processing, whether or not the bank's segment fell back to the coarse mask
  (TokenCut scores ``output_solver`` whatever its IoU check says); LOST's prediction is its
  binary coarse mask. Truth G = grey > 0. Thresholds t = k / 255, k = 0..254, positive where
  s > t (strictly). P = |s > t ∩ G| / |s > t|, and 1 when nothing is predicted; R = |s > t ∩ G|
  / |G|, and 1 when the truth is empty. F = (1 + β²) P R / (β² P + R), 0 when P = R = 0. IoU and
  accuracy compare s > 0.5 with G (IoU 1 when both are empty, where TokenCut divides 0 by 0).
- :data:`OURS`, this repository's first protocol: the prediction is the bank's binary mask (the
  segments of the image, united; post-processed, the coarse mask on fallback; empty without
  segments). Truth G = grey > 127. Thresholds t in linspace(0, 1 - 1e-10, 255), positive where mask >= t
  (t = 0 predicts every pixel, every other t the mask). P = 0 when nothing is predicted, R = 0
  when the truth is empty. IoU and accuracy compare the mask with G.

The soft output comes from the bank's ``soft_png`` column (8-bit levels ``ceil(255 s)``, see
:func:`datagen.segments.refine.soft_levels`: every ``s > k / 255`` is read exactly; ``s > 0.5``
is read as level >= 128, that is s > 127 / 255). It is at the resolution the solver ran at and
is scaled (bilinear) to the image's when that differs (images larger than ``--max-size``), where
TokenCut runs the solver at full resolution. An image without a stored soft output (a bank
scanned before the column existed, or an image without a segment) is scored on its binary mask
under the reference protocol too, and the report counts such images.

Ground-truth masks are matched to the bank's images by file stem (``0001.png`` to
``images/0001.jpg``). A LOST bank is scored twice: LOST alone (the coarse masks, ``coarse_rle``)
and LOST + bilateral solver (the bank's masks, or the soft outputs); a bank without coarse masks
once, as "bank".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from datagen.format.imageio import IMAGE_SUFFIXES
from datagen.segments.bank import IMAGES_FILE, SEGMENTS_FILE, SegmentBank
from datagen.segments.refine import SOFT_LEVELS, decode_soft, mask_iou

BETA2 = 0.3
THRESHOLDS = np.linspace(0.0, 1.0 - 1e-10, 255)
"""Our thresholds (prediction >= t)."""
REFERENCE_THRESHOLDS = np.arange(255) / 255
"""TokenCut's thresholds (prediction > t): ``np.arange(0, 1, 1 / 255)``, written k / 255 so that a
stored level v reads v / 255 > k / 255 exactly when v > k."""
MASK_SUFFIXES = IMAGE_SUFFIXES
"""Files of a ground-truth folder with these suffixes (any case) are masks: any image file."""
COARSE, REFINED, BANK = "LOST", "LOST + bilateral solver", "bank"
SOFT_COLUMN = "soft_png"


@dataclass(frozen=True, eq=False)
class Protocol:
    """How one image's prediction and ground truth become precision, recall, IoU and accuracy.

    key, label, description: its name in the JSON report, in the table, and in words.
    thresholds, strict: positive pixels are ``prediction > t`` (strict) or ``>= t``.
    empty: the precision of an empty prediction and the recall of an empty truth.
    truth_above: the truth is grey level > this. soft: whether the solver's soft output is scored
    where the bank has one (else the binary mask).
    """

    key: str
    label: str
    description: str
    thresholds: np.ndarray = field(repr=False)
    strict: bool
    empty: float
    truth_above: int
    soft: bool

    def truth(self, grey: np.ndarray) -> np.ndarray:
        """(H, W) bool ground truth of a grey mask."""
        return np.asarray(grey) > self.truth_above


REFERENCE = Protocol(
    key="reference", label="reference (TokenCut)",
    description="max F-beta over t = k/255 (k = 0..254) of soft output > t (the solver's output "
                "before any threshold; LOST: its binary mask), F per image then averaged; precision 1 for an "
                "empty prediction (recall 1 for an empty truth); GT grey > 0; IoU and Acc of soft output > 0.5",
    thresholds=REFERENCE_THRESHOLDS, strict=True, empty=1.0, truth_above=0, soft=True)
OURS = Protocol(
    key="ours", label="ours",
    description="the bank's binary mask (post-processed, coarse on fallback); max F-beta over t in "
                "linspace(0, 1 - 1e-10, 255) of mask >= t, F per image then averaged; precision 0 for an "
                "empty prediction; GT grey > 127",
    thresholds=THRESHOLDS, strict=False, empty=0.0, truth_above=127, soft=False)
PROTOCOLS = (REFERENCE, OURS)


def precision_recall(prediction: np.ndarray, truth: np.ndarray, thresholds: np.ndarray = THRESHOLDS, *,
                     strict: bool = False, empty: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall ((T,) float64) of the positives ``prediction >= t`` (``> t`` when
    ``strict``) for every threshold t (ascending), for an (H, W) prediction (float or bool) and an
    (H, W) bool truth, in one pass of counting. ``empty``: the precision where nothing is
    predicted, and the recall where the truth is empty."""
    # number of thresholds each pixel passes: the pixel is positive at thresholds[:reached]
    side = "left" if strict else "right"
    reached = np.searchsorted(thresholds, np.asarray(prediction, np.float64).ravel(), side=side)
    truth = np.asarray(truth, bool).ravel()
    size = len(thresholds) + 1
    at_least = lambda counts: np.cumsum(counts[::-1])[::-1][1:]  # noqa: E731 - pixels reaching > i
    positive = at_least(np.bincount(reached, minlength=size))
    true_positive = at_least(np.bincount(reached[truth], minlength=size)).astype(np.float64)
    actual = truth.sum()
    precision = np.divide(true_positive, positive, out=np.full(len(thresholds), float(empty)), where=positive > 0)
    recall = true_positive / actual if actual else np.full(len(thresholds), float(empty))
    return precision, recall


def fbeta(precision: np.ndarray, recall: np.ndarray, beta2: float = BETA2) -> np.ndarray:
    """F-beta of precision/recall arrays, 0 where both are 0."""
    denominator = beta2 * precision + recall
    with np.errstate(invalid="ignore", divide="ignore"):
        score = (1 + beta2) * precision * recall / denominator
    return np.where(denominator > 0, score, 0.0)


@dataclass
class SaliencyScores:
    """Scores of one method under one :class:`Protocol` over ``images`` images: max F-beta (at
    ``threshold``), mean IoU, mean pixel accuracy (all in [0, 1]), and how many images were
    scored on a soft output (``soft_images``; the others on a binary mask)."""

    protocol: Protocol = field(default=OURS, repr=False)
    images: int = 0
    max_fbeta: float = float("nan")
    threshold: float = float("nan")
    iou: float = float("nan")
    accuracy: float = float("nan")
    soft_images: int = 0
    _fbeta_sum: np.ndarray | None = field(default=None, repr=False)
    _iou_sum: float = field(default=0.0, repr=False)
    _accuracy_sum: float = field(default=0.0, repr=False)

    def __post_init__(self):
        if self._fbeta_sum is None:
            self._fbeta_sum = np.zeros(len(self.protocol.thresholds))

    def add(self, prediction: np.ndarray, grey: np.ndarray, soft: bool = False) -> None:
        """Add one image: an (H, W) prediction (bool mask, or float soft output in [0, 1], then
        ``soft``) and its (H, W) grey ground truth (0-255), binarised by the protocol."""
        protocol = self.protocol
        truth = protocol.truth(grey)
        self._fbeta_sum = self._fbeta_sum + fbeta(*precision_recall(
            prediction, truth, protocol.thresholds, strict=protocol.strict, empty=protocol.empty))
        binary = np.asarray(prediction, np.float64) > 0.5
        self._iou_sum += mask_iou(binary, truth)
        self._accuracy_sum += float(np.mean(binary == truth))
        self.images += 1
        self.soft_images += bool(soft)
        best = int(np.argmax(self._fbeta_sum))
        self.max_fbeta = float(self._fbeta_sum[best] / self.images)
        self.threshold = float(protocol.thresholds[best])
        self.iou = self._iou_sum / self.images
        self.accuracy = self._accuracy_sum / self.images

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_") and k != "protocol"}


@dataclass
class SaliencyReport:
    """Scores per method (:data:`COARSE`, :data:`REFINED`, or :data:`BANK` for a bank without
    coarse masks) and per protocol key (:data:`PROTOCOLS`), and the files that could not be
    compared, with the reason."""

    scores: dict
    """method -> protocol key -> :class:`SaliencyScores`."""
    unmatched: list
    """Ground-truth masks whose stem is no image of the bank."""
    problems: list
    """(mask file, reason) of masks that were matched but not compared (unreadable, other size)."""

    @property
    def images(self) -> int:
        """How many images were compared (the same for every method and protocol)."""
        return max((score.images for by_protocol in self.scores.values() for score in by_protocol.values()),
                   default=0)

    def notes(self) -> list[str]:
        """What the table's protocols are, and where the reference protocol had no soft output."""
        lines = [f"{protocol.label}: {protocol.description}" for protocol in PROTOCOLS]
        for method, by_protocol in self.scores.items():
            score = by_protocol[REFERENCE.key]
            if method == REFINED and score.soft_images < score.images:
                lines.append(f"{REFERENCE.label}, {method}: {score.images - score.soft_images} of {score.images} "
                             f"images have no stored soft output ({SOFT_COLUMN}: a bank scanned before it was kept, "
                             f"or no segment for the image) and were scored on the binary mask instead")
        return lines

    def table(self) -> str:
        """The scores as a fixed-width text table, with the :meth:`notes` below it."""
        lines = [f"{'method':<26} {'protocol':<21} {'images':>6} {'maxFβ':>7} {'IoU':>7} {'Acc':>7}"]
        for method, by_protocol in self.scores.items():
            for protocol in PROTOCOLS:
                score = by_protocol[protocol.key]
                lines.append(f"{method:<26} {protocol.label:<21} {score.images:>6} {score.max_fbeta:>7.3f} "
                             f"{score.iou:>7.3f} {score.accuracy:>7.3f}")
        return "\n".join(lines + [""] + self.notes())

    def to_json(self) -> dict:
        return {"protocols": {protocol.key: {"label": protocol.label, "description": protocol.description}
                              for protocol in PROTOCOLS},
                "scores": {method: {key: score.to_json() for key, score in by_protocol.items()}
                           for method, by_protocol in self.scores.items()},
                "notes": self.notes(), "unmatched": self.unmatched,
                "problems": [list(p) for p in self.problems], "beta2": BETA2}


def mask_files(gt_dir) -> dict[str, Path]:
    """File stem -> ground-truth mask file directly inside ``gt_dir``; ValueError naming a stem
    held by two files, FileNotFoundError if the folder is missing or holds no mask."""
    folder = Path(gt_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"ground-truth folder not found: {folder} (--gt)")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in MASK_SUFFIXES:
            if path.stem in found:
                raise ValueError(f"{folder}: two ground-truth masks for {path.stem!r}: {found[path.stem].name} "
                                 f"and {path.name}")
            found[path.stem] = path
    if not found:
        raise FileNotFoundError(f"{folder}: no mask file ({', '.join(MASK_SUFFIXES)}) (--gt)")
    return found


def read_grey(path: Path) -> np.ndarray | None:
    """(H, W) uint8 grey levels of a ground-truth mask (a colour file converted to grey), or None
    if the file cannot be decoded. Each protocol binarises it (:meth:`Protocol.truth`)."""
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def _decode(counts: str, height: int, width: int) -> np.ndarray:
    return mask_utils.decode({"size": [height, width], "counts": counts.encode("ascii")}).astype(bool)


@dataclass
class ImagePrediction:
    """What the bank holds for one image: its size (height, width), the RLE ``counts`` of its
    segments per method, and the soft-output PNGs of its segments (the refined method's)."""

    size: tuple[int, int]
    rles: dict[str, list[str]]
    soft: list[bytes] = field(default_factory=list)

    def mask(self, method: str) -> np.ndarray:
        """(H, W) bool: the union of the image's segments of ``method`` (empty without any)."""
        mask = np.zeros(self.size, bool)
        for counts in self.rles[method]:
            mask |= _decode(counts, *self.size)
        return mask

    def soft_output(self) -> np.ndarray | None:
        """(H, W) float64 in [0, 1]: the stored soft output (level / 255; the pixelwise max over
        segments if several), scaled to the image's size if stored at another; None if none."""
        if not self.soft:
            return None
        levels = np.maximum.reduce([decode_soft(data) for data in self.soft])
        height, width = self.size
        if levels.shape != (height, width):
            scaled = cv2.resize(levels.astype(np.float32) / SOFT_LEVELS, (width, height),
                                interpolation=cv2.INTER_LINEAR)
            return np.clip(scaled.astype(np.float64), 0.0, 1.0)
        return levels.astype(np.float64) / SOFT_LEVELS


def bank_predictions(bank_dir, stems=None) -> dict[str, ImagePrediction]:
    """Image stem -> :class:`ImagePrediction` of every image of the bank (of those whose stem is
    in ``stems`` when given). Methods: :data:`REFINED` ("rle") and :data:`COARSE` ("coarse_rle")
    when the bank has coarse masks, else :data:`BANK` ("rle"). ValueError on a stem held twice."""
    bank = Path(bank_dir)
    SegmentBank.load(bank)  # checks that it is a complete bank
    images = pq.read_table(bank / IMAGES_FILE, columns=["image_id", "image_path", "width", "height"]).to_pylist()
    present = pq.read_schema(bank / SEGMENTS_FILE).names
    columns = ["image_id", "rle"] + (["coarse_rle"] if "coarse_rle" in present else [])
    segments = pq.read_table(bank / SEGMENTS_FILE, columns=columns).to_pylist()
    has_coarse = any(row.get("coarse_rle") for row in segments)
    methods = {REFINED: "rle", COARSE: "coarse_rle"} if has_coarse else {BANK: "rle"}
    predictions: dict[str, ImagePrediction] = {}
    by_id: dict[int, ImagePrediction] = {}
    for image in images:
        stem = Path(image["image_path"]).stem
        if stem in predictions:
            raise ValueError(f"{bank}: two images with the stem {stem!r}; ground truth is matched by stem")
        prediction = ImagePrediction(size=(image["height"], image["width"]), rles={method: [] for method in methods})
        predictions[stem] = prediction
        if stems is None or stem in stems:
            by_id[image["image_id"]] = prediction
    for row in segments:
        prediction = by_id.get(row["image_id"])
        if prediction is not None:
            for method, column in methods.items():
                if row.get(column):
                    prediction.rles[method].append(row[column])
    if SOFT_COLUMN in present and has_coarse:  # soft outputs belong to the refined method
        for batch in pq.ParquetFile(bank / SEGMENTS_FILE).iter_batches(batch_size=256,
                                                                       columns=["image_id", SOFT_COLUMN]):
            for image_id, data in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                if data is not None and image_id in by_id:
                    by_id[image_id].soft.append(data)
    return {stem: prediction for stem, prediction in predictions.items() if stems is None or stem in stems}


def evaluate(bank_dir, gt_dir, progress: bool = False) -> SaliencyReport:
    """Score the bank in ``bank_dir`` against the masks of ``gt_dir`` under both protocols (see
    the module docstring)."""
    from tqdm import tqdm

    truths = mask_files(gt_dir)
    predictions = bank_predictions(bank_dir, stems=set(truths))
    methods = next(iter(predictions.values())).rles.keys() if predictions else []
    scores = {method: {protocol.key: SaliencyScores(protocol) for protocol in PROTOCOLS}
              for method in sorted(methods, key=[COARSE, REFINED, BANK].index)}
    unmatched, problems = [], []
    for stem, path in tqdm(sorted(truths.items()), unit="mask", disable=not progress):
        prediction = predictions.get(stem)
        if prediction is None:
            unmatched.append(path.name)
            continue
        grey = read_grey(path)
        if grey is None:
            problems.append((path.name, "cannot decode the mask"))
        elif grey.shape != prediction.size:
            problems.append((path.name, f"mask is {grey.shape[1]}x{grey.shape[0]}, its image "
                                        f"{prediction.size[1]}x{prediction.size[0]}"))
        else:
            try:
                soft = prediction.soft_output() if REFINED in scores else None
            except ValueError as error:
                raise ValueError(f"{bank_dir}: the soft output of image {stem!r}: {error}") from None
            for method, by_protocol in scores.items():
                mask = prediction.mask(method)
                for protocol in PROTOCOLS:
                    use_soft = protocol.soft and method == REFINED and soft is not None
                    by_protocol[protocol.key].add(soft if use_soft else mask, grey, soft=use_soft)
    return SaliencyReport(scores=scores, unmatched=unmatched, problems=problems)
