"""Readers of the retrieval benchmarks' own files, validated; every error names the file and the entry.

- Brueghel one-shot retrieval (:func:`read_brueghel`, :func:`brueghel_images`): ``brueghelVal.json``
  / ``brueghelTest.json`` and the folder of the 1587 images. The protocol: the database is every
  image of the folder; each query (an image and a box) ranks the database with the query image
  itself removed; its ground truth is the set of its ``gt`` images other than the query image
  (:attr:`BrueghelQuery.relevant_images`); AP is divided by the number of those images.
- Place recognition (:func:`read_place_mat`): NetVLAD's ``dbStruct`` ``.mat`` files of Pitts30k
  (``pitts30k_test.mat``) and Tokyo 24/7 (``tokyo247.mat``).
- Short-lists (:func:`read_shortlists`): the top candidates of a global descriptor for each query,
  which the place-recognition protocol re-ranks, as CSV, parquet or the authors' ``.npy`` index arrays.

Nothing here unpickles: ``.npy`` files are read with ``allow_pickle=False``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import scipy.io

from datagen.format.imageio import IMAGE_SUFFIXES

from .images import plain_name_problem, relative_path_problem

DEFAULT_POS_DIST_THR = 25.0
"""Metres within which a database image matches a query, when a ``.mat`` file has no ``posDistThr``."""
SHORTLIST_SUFFIXES = (".csv", ".parquet", ".pq", ".npy")


class DatasetError(ValueError):
    """A benchmark file that cannot be used; ``str()`` names the file and the entry."""


def _first(items: Sequence, count: int = 5) -> str:
    shown = ", ".join(repr(item) for item in items[:count])
    return shown + (f" and {len(items) - count} more" if len(items) > count else "")


# -- Brueghel -----------------------------------------------------------------------------------

Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class BrueghelQuery:
    """One query of the Brueghel benchmark.

    ``category``: the category's key in the file; ``index``: the query's position in that
    category's list; ``image``: the query's file name; ``box``: (x1, y1, x2, y2) pixel corners in
    that image; ``gt``: the file's ground truth, ((image name, box), ...) in file order.
    """

    category: str
    index: int
    image: str
    box: Box
    gt: tuple[tuple[str, Box], ...]

    @property
    def relevant_images(self) -> tuple[str, ...]:
        """The ground-truth image names other than the query image, each once, in file order: the
        images the query must retrieve (its AP is divided by their number)."""
        return tuple(dict.fromkeys(name for name, _ in self.gt if name != self.image))


def brueghel_images(image_dir) -> list[str]:
    """The sorted file names of the images of ``image_dir`` (suffixes of
    :data:`datagen.format.imageio.IMAGE_SUFFIXES`, any case; hidden files left out): the Brueghel
    database."""
    folder = Path(image_dir)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    names = sorted(entry.name for entry in folder.iterdir()
                   if not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_SUFFIXES and entry.is_file())
    if not names:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return names


def _reject_duplicate_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {_first(duplicates)}")
    return dict(pairs)


def _box(value, where: str) -> Box:
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise DatasetError(f"{where}: box {value!r} is not 4 numbers [x1, y1, x2, y2]")
    box = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in box):
        raise DatasetError(f"{where}: box {value!r} is not finite")
    if not (box[2] > box[0] and box[3] > box[1]):
        raise DatasetError(f"{where}: box {value!r} does not have x2 > x1 and y2 > y1")
    return box


def _named_box(value, where: str) -> tuple[str, Box]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise DatasetError(f"{where}: expected [image_name, [x1, y1, x2, y2]], got {value!r}")
    problem = plain_name_problem(value[0])
    if problem:
        raise DatasetError(f"{where}: image name {problem}")
    return value[0], _box(value[1], f"{where} ({value[0]})")


def read_brueghel(path, image_dir=None) -> list[BrueghelQuery]:
    """The queries of ``brueghelVal.json`` / ``brueghelTest.json``, categories in sorted order (as
    the authors' evaluation), queries in file order within each.

    The file: ``{category: [{"query": [image_name, [x1, y1, x2, y2]], "gt": [[image_name, [x1, y1,
    x2, y2]], ...]}, ...]}``. Boxes must be 4 finite numbers with x2 > x1 and y2 > y1; image names
    plain file names. With ``image_dir``, every named image must be one of
    :func:`brueghel_images` of that folder.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file, object_pairs_hook=_reject_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        raise DatasetError(f"{path}: not a valid Brueghel JSON file: {error}") from error
    if not isinstance(data, dict) or not data:
        raise DatasetError(f"{path}: expected a non-empty object {{category: [queries]}}")
    queries = []
    for category in sorted(data):
        entries = data[category]
        if not isinstance(entries, list):
            raise DatasetError(f"{path}: category {category!r}: expected a list of queries, "
                               f"got {type(entries).__name__}")
        for index, entry in enumerate(entries):
            where = f"{path}: category {category!r}, query {index}"
            if not isinstance(entry, dict) or "query" not in entry or "gt" not in entry:
                raise DatasetError(f"{where}: expected an object with 'query' and 'gt'")
            image, box = _named_box(entry["query"], f"{where}, 'query'")
            if not isinstance(entry["gt"], list):
                raise DatasetError(f"{where}: 'gt' is not a list")
            gt = tuple(_named_box(item, f"{where}, gt {i}") for i, item in enumerate(entry["gt"]))
            queries.append(BrueghelQuery(category=category, index=index, image=image, box=box, gt=gt))
    if image_dir is not None:
        available = set(brueghel_images(image_dir))
        named = dict.fromkeys(name for query in queries for name in (query.image, *(n for n, _ in query.gt)))
        missing = [name for name in named if name not in available]
        if missing:
            raise DatasetError(f"{path}: {len(missing)} named images are not images of {image_dir}: {_first(missing)}")
    return queries


# -- place recognition (.mat) -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class PlaceSet:
    """A place-recognition benchmark of NetVLAD's ``dbStruct`` layout.

    ``db_images`` (D names) and ``query_images`` (Q names): relative paths under the benchmark's
    database and query folders; ``db_utm`` (D, 2) and ``query_utm`` (Q, 2) float64: UTM easting,
    northing in metres; ``pos_dist_thr``: metres within which a database image matches a query;
    ``name``: the file's stem (e.g. 'pitts30k_test'); ``which_set``: the file's ``whichSet``
    ('train', 'val', 'test'), or None when it has none. The arrays are read-only; instances compare
    by identity.
    """

    db_images: tuple[str, ...]
    db_utm: np.ndarray
    query_images: tuple[str, ...]
    query_utm: np.ndarray
    pos_dist_thr: float
    name: str
    which_set: str | None = None


def _mat_strings(value, where: str) -> list[str]:
    """A MATLAB cell of strings (an object array of 1-element string arrays, any shape) or a char
    array, as a list of strings."""
    array = np.asarray(value)
    if array.dtype.kind == "U":
        return [str(item) for item in array.ravel()]
    if array.dtype != object:
        raise DatasetError(f"{where}: expected a cell of strings, got a {array.dtype} array")
    strings = []
    for i, item in enumerate(array.ravel()):
        item = np.asarray(item)
        if item.dtype.kind != "U" or item.size > 1:
            raise DatasetError(f"{where}: entry {i} is not a string ({item.dtype}, shape {item.shape})")
        strings.append(str(item.item()) if item.size else "")
    return strings


def _mat_scalar(value, where: str) -> float:
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "iuf":
        raise DatasetError(f"{where}: expected one number, got {array.dtype} of shape {array.shape}")
    return float(array.item())


def _checked_names(names: list[str], where: str) -> tuple[str, ...]:
    if not names:
        raise DatasetError(f"{where}: no images")
    for i, name in enumerate(names):
        problem = relative_path_problem(name)
        if problem:
            raise DatasetError(f"{where}, entry {i}: {problem}")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DatasetError(f"{where}: {name!r} appears more than once")
        seen.add(name)
    return tuple(names)


def _utm(value, count: int, where: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "iuf" or array.shape != (2, count):
        raise DatasetError(f"{where}: expected a 2 x {count} array of numbers (easting, northing by image), "
                           f"got {array.dtype} of shape {array.shape}")
    utm = np.ascontiguousarray(array.T, dtype=np.float64)
    if not np.isfinite(utm).all():
        raise DatasetError(f"{where}: positions must be finite")
    utm.flags.writeable = False
    return utm


def read_place_mat(path) -> PlaceSet:
    """The place-recognition benchmark of a NetVLAD ``dbStruct`` ``.mat`` file (MATLAB v5, as
    ``pitts30k_test.mat`` and ``tokyo247.mat``).

    Fields read by name from the ``dbStruct`` struct: ``dbImage`` (cell of D relative paths),
    ``utmDb`` (2 x D), ``qImage`` (cell of Q relative paths), ``utmQ`` (2 x Q), ``posDistThr``
    (default 25 m when absent), ``whichSet`` (optional); ``numImages`` and ``numQueries``, when
    present, must equal D and Q.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError as error:  # MATLAB v7.3 (HDF5)
        raise DatasetError(f"{path}: cannot read this MATLAB file version ({error}); "
                           f"the NetVLAD files are MATLAB v5") from error
    except (ValueError, TypeError, OSError) as error:
        raise DatasetError(f"{path}: not a readable .mat file: {error}") from error
    if "dbStruct" not in mat:
        fields = sorted(key for key in mat if not key.startswith("__"))
        raise DatasetError(f"{path}: no 'dbStruct' variable (variables: {', '.join(fields) or 'none'})")
    struct = np.asarray(mat["dbStruct"])
    if struct.dtype.names is None or struct.size != 1:
        raise DatasetError(f"{path}: 'dbStruct' is not a 1 x 1 struct")
    record = struct.ravel()[0]
    fields = struct.dtype.names

    def field(name: str):
        if name not in fields:
            raise DatasetError(f"{path}: dbStruct has no field '{name}' (fields: {', '.join(fields)})")
        return record[name]

    db_images = _checked_names(_mat_strings(field("dbImage"), f"{path}: dbStruct.dbImage"), f"{path}: dbStruct.dbImage")
    query_images = _checked_names(_mat_strings(field("qImage"), f"{path}: dbStruct.qImage"), f"{path}: dbStruct.qImage")
    db_utm = _utm(field("utmDb"), len(db_images), f"{path}: dbStruct.utmDb")
    query_utm = _utm(field("utmQ"), len(query_images), f"{path}: dbStruct.utmQ")
    for count_field, count in (("numImages", len(db_images)), ("numQueries", len(query_images))):
        if count_field in fields:
            declared = _mat_scalar(record[count_field], f"{path}: dbStruct.{count_field}")
            if declared != count:
                raise DatasetError(f"{path}: dbStruct.{count_field} is {declared:g} but there are {count} names")
    pos_dist_thr = DEFAULT_POS_DIST_THR
    if "posDistThr" in fields:
        pos_dist_thr = _mat_scalar(record["posDistThr"], f"{path}: dbStruct.posDistThr")
        if not (math.isfinite(pos_dist_thr) and pos_dist_thr > 0):
            raise DatasetError(f"{path}: dbStruct.posDistThr must be a positive number of metres, got {pos_dist_thr}")
    which_set = None
    if "whichSet" in fields:
        strings = _mat_strings(record["whichSet"], f"{path}: dbStruct.whichSet")
        if len(strings) != 1:
            raise DatasetError(f"{path}: dbStruct.whichSet is not one string")
        which_set = strings[0]
    return PlaceSet(db_images=db_images, db_utm=db_utm, query_images=query_images, query_utm=query_utm,
                    pos_dist_thr=pos_dist_thr, name=path.stem, which_set=which_set)


# -- short-lists --------------------------------------------------------------------------------

def _name_index(names: Sequence[str], what: str) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in index:
            raise ValueError(f"read_shortlists: {what} {name!r} appears more than once")
        index[name] = i
    return index


def _read_table(path: Path) -> pa.Table:
    try:
        if path.suffix.lower() == ".csv":
            types = {"query": pa.string(), "candidate": pa.string(), "rank": pa.int64(), "score": pa.float64()}
            return pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(column_types=types))
        return pq.read_table(path)
    except pa.ArrowException as error:
        raise DatasetError(f"{path}: cannot read the short-lists: {error}") from error


def _table_shortlists(path: Path, table: pa.Table, query_index: dict, db_index: dict) -> dict[str, list[str]]:
    columns = set(table.column_names)
    missing = {"query", "candidate"} - columns
    if missing or not columns & {"rank", "score"}:
        raise DatasetError(f"{path}: short-lists need columns query, candidate and rank or score; "
                           f"found {', '.join(table.column_names)}")
    order_by = "rank" if "rank" in columns else "score"
    for column, kinds in (("query", (pa.types.is_string, pa.types.is_large_string)),
                          ("candidate", (pa.types.is_string, pa.types.is_large_string)),
                          (order_by, (pa.types.is_integer,) if order_by == "rank" else
                           (pa.types.is_floating, pa.types.is_integer))):
        column_type = table.schema.field(column).type
        if not any(kind(column_type) for kind in kinds):
            raise DatasetError(f"{path}: column {column!r} has type {column_type}")
        if table.column(column).null_count:
            raise DatasetError(f"{path}: column {column!r} has empty or null values (e.g. '', 'nan', 'null')")
    queries = table.column("query").to_pylist()
    candidates = table.column("candidate").to_pylist()
    keys = table.column(order_by).to_pylist()
    if order_by == "score":
        bad = [key for key in keys if not math.isfinite(key)]
        if bad:
            raise DatasetError(f"{path}: column 'score' has a non-finite value {bad[0]}")
        keys = [-key for key in keys]
    unknown = list(dict.fromkeys(q for q in queries if q not in query_index))
    if unknown:
        raise DatasetError(f"{path}: {len(unknown)} unknown queries: {_first(unknown)}")
    unknown = list(dict.fromkeys(c for c in candidates if c not in db_index))
    if unknown:
        raise DatasetError(f"{path}: {len(unknown)} unknown database images (candidates): {_first(unknown)}")
    rows: dict[str, list] = {}
    for row, (query, candidate, key) in enumerate(zip(queries, candidates, keys)):
        rows.setdefault(query, []).append((key, row, candidate))
    shortlists = {}
    for query, entries in rows.items():
        entries.sort()  # by rank (or -score), ties in file order
        names = [candidate for _, _, candidate in entries]
        if len(set(names)) != len(names):
            duplicate = next(name for i, name in enumerate(names) if name in names[:i])
            raise DatasetError(f"{path}: query {query!r} lists candidate {duplicate!r} more than once")
        if order_by == "rank":
            ranks = [key for key, _, _ in entries]
            if len(set(ranks)) != len(ranks):
                duplicate = next(rank for i, rank in enumerate(ranks) if rank in ranks[:i])
                raise DatasetError(f"{path}: query {query!r} has rank {duplicate} more than once")
        shortlists[query] = names
    return shortlists


def _npy_shortlists(path: Path, query_names: Sequence[str], db_names: Sequence[str]) -> dict[str, list[str]]:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise DatasetError(f"{path}: not a plain .npy array (object arrays are refused): {error}") from error
    if not isinstance(array, np.ndarray):
        raise DatasetError(f"{path}: not a single .npy array")
    if not np.issubdtype(array.dtype, np.integer):
        raise DatasetError(f"{path}: holds {array.dtype} values, not database indices; a score matrix must be "
                           f"turned into indices first (e.g. np.argsort(-scores, axis=1))")
    if array.ndim != 2 or array.shape[0] != len(query_names):
        raise DatasetError(f"{path}: expected a ({len(query_names)}, K) array, one row per query, "
                           f"got shape {array.shape}")
    bad = (array < 0) | (array >= len(db_names))
    if bad.any():
        q, k = np.argwhere(bad)[0]
        raise DatasetError(f"{path}: query {query_names[q]!r}, rank {k}: {array[q, k]} is not a database index "
                           f"(0 to {len(db_names) - 1})")
    shortlists = {}
    for q, row in enumerate(array.tolist()):
        if len(set(row)) != len(row):
            duplicate = next(index for i, index in enumerate(row) if index in row[:i])
            raise DatasetError(f"{path}: query {query_names[q]!r} lists candidate {db_names[duplicate]!r} "
                               f"(index {duplicate}) more than once")
        shortlists[query_names[q]] = [db_names[index] for index in row]
    return shortlists


def read_shortlists(path, query_names: Sequence[str], db_names: Sequence[str], top: int | None = None,
                    *, require_all: bool = True) -> dict[str, list[str]]:
    """Each query's candidate database images, best first: {query name: [database name, ...]}, in
    the order of ``query_names``.

    - ``.csv`` / ``.parquet``: one row per (query, candidate), columns ``query``, ``candidate`` (names
      as in ``query_names`` and ``db_names``) and ``rank`` (ascending) or ``score`` (descending; ties
      keep file order); with both, ``rank`` is used.
    - ``.npy``: a (Q, K) integer array, row q the database indices of ``query_names[q]``'s candidates
      in order (the authors' ``top100_*.npy`` held scores, which they argsorted: pass the indices).

    Unknown names, an index out of range, a candidate twice in one list or a rank twice are errors.
    ``top`` keeps the first ``top`` candidates of each list. ``require_all``: every query of
    ``query_names`` must have a list.
    """
    path = Path(path)
    if top is not None and (isinstance(top, bool) or int(top) != top or top < 1):
        raise ValueError(f"read_shortlists: top must be a positive integer, got {top!r}")
    suffix = path.suffix.lower()
    if suffix not in SHORTLIST_SUFFIXES:
        raise DatasetError(f"{path}: short-lists must be {', '.join(SHORTLIST_SUFFIXES)} files")
    query_index = _name_index(query_names, "query")
    db_index = _name_index(db_names, "database image")
    if suffix == ".npy":
        found = _npy_shortlists(path, list(query_names), list(db_names))
    else:
        found = _table_shortlists(path, _read_table(path), query_index, db_index)
    if require_all:
        missing = [name for name in query_names if name not in found]
        if missing:
            raise DatasetError(f"{path}: no short-list for {len(missing)} queries: {_first(missing)}")
    return {name: found[name][:top] for name in query_names if name in found}
