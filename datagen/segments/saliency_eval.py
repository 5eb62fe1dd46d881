"""Unsupervised saliency metrics of a segment bank against ground-truth masks (the paper's Table 4,
as LOST / TokenCut evaluate on ECSSD, DUTS and DUT-OMRON).

Per image, the predicted mask (all segments of the image, united; empty if the bank has none)
is compared with the binary ground truth (grey level > 127) at the image's resolution:

- IoU = |P ∩ G| / |P ∪ G| (1 when both are empty) and accuracy = fraction of pixels where P = G,
  each averaged over images;
- max F-beta: for 255 thresholds t in linspace(0, 1 - 1e-10), precision and recall of
  ``prediction >= t`` give F = (1 + β²) P R / (β² P + R) with β² = 0.3 (0 where undefined);
  F is averaged over images for each t, and the best t is reported. With binary predictions,
  every t > 0 gives the same mask.

Ground-truth masks are matched to the bank's images by file stem (``0001.png`` to
``images/0001.jpg``). A LOST bank is scored twice: LOST alone (the coarse masks, ``coarse_rle``)
and LOST + bilateral solver (the bank's masks).
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
from datagen.segments.refine import mask_iou

BETA2 = 0.3
THRESHOLDS = np.linspace(0.0, 1.0 - 1e-10, 255)
MASK_SUFFIXES = IMAGE_SUFFIXES
"""Files of a ground-truth folder with these suffixes (any case) are masks: any image file."""
COARSE, REFINED = "LOST", "LOST + bilateral solver"


def precision_recall(prediction: np.ndarray, truth: np.ndarray,
                     thresholds: np.ndarray = THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall ((T,) float64) of ``prediction >= t`` for every threshold t, for an
    (H, W) prediction in [0, 1] (float or bool) and an (H, W) bool truth (one pass of counting)."""
    # number of thresholds each pixel reaches: the pixel is positive at thresholds[:reached]
    reached = np.searchsorted(thresholds, np.asarray(prediction, np.float64).ravel(), side="right")
    truth = np.asarray(truth, bool).ravel()
    size = len(thresholds) + 1
    at_least = lambda counts: np.cumsum(counts[::-1])[::-1][1:]  # noqa: E731 - pixels reaching > i
    positive = at_least(np.bincount(reached, minlength=size))
    true_positive = at_least(np.bincount(reached[truth], minlength=size))
    return true_positive / (positive + 1e-20), true_positive / (truth.sum() + 1e-20)


def fbeta(precision: np.ndarray, recall: np.ndarray, beta2: float = BETA2) -> np.ndarray:
    """F-beta of precision/recall arrays, 0 where both are 0."""
    denominator = beta2 * precision + recall
    with np.errstate(invalid="ignore", divide="ignore"):
        score = (1 + beta2) * precision * recall / denominator
    return np.where(denominator > 0, score, 0.0)


@dataclass
class SaliencyScores:
    """Scores over ``images`` images: max F-beta, mean IoU, mean pixel accuracy (all in [0, 1])."""

    images: int = 0
    max_fbeta: float = float("nan")
    iou: float = float("nan")
    accuracy: float = float("nan")
    _fbeta_sum: np.ndarray = field(default_factory=lambda: np.zeros(len(THRESHOLDS)), repr=False)
    _iou_sum: float = field(default=0.0, repr=False)
    _accuracy_sum: float = field(default=0.0, repr=False)

    def add(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        """Add one image: (H, W) bool prediction and truth."""
        self._fbeta_sum += fbeta(*precision_recall(prediction, truth))
        self._iou_sum += mask_iou(prediction, truth)
        self._accuracy_sum += float(np.mean(prediction == truth))
        self.images += 1
        self.max_fbeta = float(self._fbeta_sum.max() / self.images)
        self.iou = self._iou_sum / self.images
        self.accuracy = self._accuracy_sum / self.images

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


@dataclass
class SaliencyReport:
    """Scores per method (:data:`COARSE`, :data:`REFINED`, or "bank" for a bank without coarse
    masks), and the files that could not be compared, with the reason."""

    scores: dict
    unmatched: list
    """Ground-truth masks whose stem is no image of the bank."""
    problems: list
    """(mask file, reason) of masks that were matched but not compared (unreadable, other size)."""

    def table(self) -> str:
        """The scores as a fixed-width text table."""
        lines = [f"{'method':<26} {'images':>6} {'maxFβ':>7} {'IoU':>7} {'Acc':>7}"]
        for name, score in self.scores.items():
            lines.append(f"{name:<26} {score.images:>6} {score.max_fbeta:>7.3f} {score.iou:>7.3f} "
                         f"{score.accuracy:>7.3f}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"scores": {name: score.to_json() for name, score in self.scores.items()},
                "unmatched": self.unmatched, "problems": [list(p) for p in self.problems], "beta2": BETA2}


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


def read_truth(path: Path) -> np.ndarray | None:
    """(H, W) bool ground truth (grey level > 127, the first channel of a colour file), or None if
    the file cannot be decoded."""
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return None if grey is None else grey > 127


def _decode(counts: str | None, height: int, width: int) -> np.ndarray:
    return mask_utils.decode({"size": [height, width], "counts": counts.encode("ascii")}).astype(bool)


def bank_predictions(bank_dir) -> dict[str, dict]:
    """Image stem -> {"size": (height, width), "masks": {method: (H, W) bool}} of every image of
    the bank; the masks of one image's segments are united. ValueError on a stem held twice."""
    bank = Path(bank_dir)
    SegmentBank.load(bank)  # checks that it is a complete bank
    images = pq.read_table(bank / IMAGES_FILE, columns=["image_id", "image_path", "width", "height"]).to_pylist()
    columns = ["image_id", "rle"] + (["coarse_rle"] if "coarse_rle" in pq.read_schema(bank / SEGMENTS_FILE).names
                                     else [])
    segments = pq.read_table(bank / SEGMENTS_FILE, columns=columns).to_pylist()
    has_coarse = any(row.get("coarse_rle") for row in segments)
    methods = {REFINED: "rle", COARSE: "coarse_rle"} if has_coarse else {"bank": "rle"}
    by_image: dict[int, list] = {}
    for row in segments:
        by_image.setdefault(row["image_id"], []).append(row)
    predictions: dict[str, dict] = {}
    for image in images:
        stem = Path(image["image_path"]).stem
        if stem in predictions:
            raise ValueError(f"{bank}: two images with the stem {stem!r}; ground truth is matched by stem")
        height, width = image["height"], image["width"]
        masks = {}
        for method, column in methods.items():
            mask = np.zeros((height, width), bool)
            for row in by_image.get(image["image_id"], []):
                if row.get(column):
                    mask |= _decode(row[column], height, width)
            masks[method] = mask
        predictions[stem] = {"size": (height, width), "masks": masks}
    return predictions


def evaluate(bank_dir, gt_dir, progress: bool = False) -> SaliencyReport:
    """Score the bank in ``bank_dir`` against the masks of ``gt_dir`` (see the module docstring)."""
    from tqdm import tqdm

    truths = mask_files(gt_dir)
    predictions = bank_predictions(bank_dir)
    methods = next(iter(predictions.values()))["masks"].keys() if predictions else []
    scores = {method: SaliencyScores() for method in sorted(methods, key=[COARSE, REFINED, "bank"].index)}
    unmatched, problems = [], []
    for stem, path in tqdm(sorted(truths.items()), unit="mask", disable=not progress):
        prediction = predictions.get(stem)
        if prediction is None:
            unmatched.append(path.name)
            continue
        truth = read_truth(path)
        if truth is None:
            problems.append((path.name, "cannot decode the mask"))
        elif truth.shape != prediction["size"]:
            problems.append((path.name, f"mask is {truth.shape[1]}x{truth.shape[0]}, its image "
                                        f"{prediction['size'][1]}x{prediction['size'][0]}"))
        else:
            for method, score in scores.items():
                score.add(prediction["masks"][method], truth)
    return SaliencyReport(scores=scores, unmatched=unmatched, problems=problems)
