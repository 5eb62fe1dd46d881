"""trainer.retrieval.datasets on tiny hand-built files: Brueghel's JSON and image folder, NetVLAD's
dbStruct .mat files (written by scipy.io.savemat in the real layout), short-lists as CSV, parquet
and .npy."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.io

from trainer.retrieval.datasets import (
    BrueghelQuery,
    DatasetError,
    brueghel_images,
    read_brueghel,
    read_place_mat,
    read_shortlists,
)

# -- Brueghel -----------------------------------------------------------------------------------

QUOTED = '"Baulo_Graca"_Vestigi delle antichita.png'  # the real collection has names like this one
BRUEGHEL = {
    "11": [
        {"query": ["Bridal_unknown.png", [389, 5, 511, 255]],
         "gt": [["Bridal_Antwerp.png", [389, 17, 524, 251]], ["Bridal_Paris.png", [381, 0, 504, 225.5]]]},
        {"query": ["Bridal_Paris.png", [381, 0, 504, 225]],
         "gt": [["Bridal_Paris.png", [381, 0, 504, 225]], ["Bridal_Antwerp.png", [389, 17, 524, 251]],
                ["Bridal_Antwerp.png", [10, 10, 20, 20]], [QUOTED, [1, 2, 3, 4]]]},
    ],
    "0000": [
        {"query": ["Fire.png", [430, 467, 483, 532]], "gt": [["Air_and_Fire.png", [531, 496, 598, 558]]]},
    ],
}
BRUEGHEL_IMAGES = ["Bridal_unknown.png", "Bridal_Antwerp.png", "Bridal_Paris.png", QUOTED, "Fire.png",
                   "Air_and_Fire.png"]


def write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def make_folder(folder, names):
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_read_brueghel(tmp_path):
    queries = read_brueghel(write_json(tmp_path / "brueghelVal.json", BRUEGHEL))
    # categories sorted ('0000' before '11'), queries in file order
    assert [(q.category, q.index, q.image) for q in queries] == [
        ("0000", 0, "Fire.png"), ("11", 0, "Bridal_unknown.png"), ("11", 1, "Bridal_Paris.png")]
    first = queries[1]
    assert isinstance(first, BrueghelQuery)
    assert first.box == (389.0, 5.0, 511.0, 255.0)
    assert all(isinstance(v, float) for v in first.box)
    assert first.gt == (("Bridal_Antwerp.png", (389.0, 17.0, 524.0, 251.0)),
                        ("Bridal_Paris.png", (381.0, 0.0, 504.0, 225.5)))
    # the query image itself is not its own ground truth; an image with two boxes counts once
    assert queries[2].relevant_images == ("Bridal_Antwerp.png", QUOTED)
    assert first.relevant_images == ("Bridal_Antwerp.png", "Bridal_Paris.png")
    with pytest.raises(AttributeError):
        first.image = "other.png"


def test_read_brueghel_checks_the_images_exist(tmp_path):
    path = write_json(tmp_path / "brueghelTest.json", BRUEGHEL)
    folder = make_folder(tmp_path / "Image", BRUEGHEL_IMAGES)
    assert len(read_brueghel(path, folder)) == 3
    (folder / "Bridal_Paris.png").unlink()
    (folder / "Fire.png").unlink()
    with pytest.raises(DatasetError, match="brueghelTest.json: 2 named images .*'Fire.png', 'Bridal_Paris.png'"):
        read_brueghel(path, folder)


@pytest.mark.parametrize("entry, message", [
    ({"query": ["a.png", [10, 0, 5, 10]], "gt": []}, "x2 > x1"),
    ({"query": ["a.png", [0, 10, 5, 10]], "gt": []}, "x2 > x1 and y2 > y1"),
    ({"query": ["a.png", [0, 0, 5]], "gt": []}, "not 4 numbers"),
    ({"query": ["a.png", [0, 0, 5, True]], "gt": []}, "not 4 numbers"),
    ({"query": ["a.png", [0, 0, 5, "9"]], "gt": []}, "not 4 numbers"),
    ({"query": ["../secret.png", [0, 0, 5, 5]], "gt": []}, "plain file name"),
    ({"query": ["/etc/passwd", [0, 0, 5, 5]], "gt": []}, "plain file name"),
    ({"query": ["a.png", [0, 0, 5, 5]], "gt": [["sub/b.png", [0, 0, 5, 5]]]}, "gt 0: image name .*plain file name"),
    ({"query": ["a.png", [0, 0, 5, 5]], "gt": [["..", [0, 0, 5, 5]]]}, "plain file name"),
    ({"query": ["", [0, 0, 5, 5]], "gt": []}, "non-empty"),
    ({"query": ["a.png", [0, 0, 5, 5]]}, "'query' and 'gt'"),
    ({"query": ["a.png", [0, 0, 5, 5]], "gt": "b.png"}, "'gt' is not a list"),
    ({"query": "a.png", "gt": []}, r"expected \[image_name"),
])
def test_read_brueghel_rejects_bad_entries(tmp_path, entry, message):
    data = {"7": [{"query": ["ok.png", [0, 0, 5, 5]], "gt": []}, entry]}
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(DatasetError, match="bad.json: category '7', query 1") as error:
        read_brueghel(path)
    assert error.match(message)


def test_read_brueghel_rejects_bad_files(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DatasetError, match="broken.json"):
        read_brueghel(tmp_path / "broken.json")
    (tmp_path / "twice.json").write_text('{"1": [], "1": []}')
    with pytest.raises(DatasetError, match="twice.json.*duplicate keys '1'"):
        read_brueghel(tmp_path / "twice.json")
    with pytest.raises(DatasetError, match="list.json"):
        read_brueghel(write_json(tmp_path / "list.json", [1, 2]))
    with pytest.raises(DatasetError, match="category '3'"):
        read_brueghel(write_json(tmp_path / "dict.json", {"3": {"query": 1}}))


def test_brueghel_images(tmp_path):
    folder = make_folder(tmp_path / "Image", ["b.png", "A.PNG", "c.jpg", "notes.txt", ".hidden.png", "d.webp"])
    (folder / "folder.png").mkdir()
    assert brueghel_images(folder) == ["A.PNG", "b.png", "c.jpg", "d.webp"]
    with pytest.raises(DatasetError, match="no images"):
        brueghel_images(make_folder(tmp_path / "empty", ["readme.md"]))
    with pytest.raises(DatasetError, match="not a folder"):
        brueghel_images(tmp_path / "nowhere")


# -- place recognition .mat ---------------------------------------------------------------------

DB_IMAGES = ["000/000000_pitch1_yaw1.jpg", "000/000000_pitch1_yaw2.jpg", "001/001000_pitch2_yaw3.jpg"]
QUERY_IMAGES = ["queries/q0.jpg", "queries/q1.jpg"]
# easting, northing of each image: distinct values, so a transposed read shows
DB_UTM = np.array([[585001.0, 4477001.0], [585002.0, 4477002.0], [585103.0, 4477203.0]])
QUERY_UTM = np.array([[585010.0, 4477010.0], [585110.0, 4477210.0]])


def cell(strings, column: bool = False) -> np.ndarray:
    """A MATLAB cell of strings as savemat takes it: a numpy object array (here D x 1 when ``column``,
    as MATLAB's own files hold dbImage, else 1 x D)."""
    array = np.array(strings, dtype=object)
    return array.reshape(-1, 1) if column else array


def db_struct(**changes) -> dict:
    struct = {"whichSet": "test", "dbImage": cell(DB_IMAGES, column=True), "utmDb": DB_UTM.T,
              "qImage": cell(QUERY_IMAGES), "utmQ": QUERY_UTM.T, "numImages": 3, "numQueries": 2,
              "posDistThr": 25, "posDistSqThr": 625, "nonTrivPosDistSqThr": 100}
    struct.update(changes)
    return {name: value for name, value in struct.items() if value is not None}


def write_mat(path, struct) -> str:
    scipy.io.savemat(path, {"dbStruct": struct})
    return str(path)


def test_read_place_mat_reads_the_netvlad_layout(tmp_path):
    path = write_mat(tmp_path / "pitts30k_test.mat", db_struct(posDistThr=30.0))
    # the layout the reader relies on: a 1 x 1 struct whose fields are MATLAB's names
    raw = scipy.io.loadmat(path)["dbStruct"]
    assert raw.shape == (1, 1) and "utmDb" in raw.dtype.names and raw[0, 0]["utmDb"].shape == (2, 3)
    places = read_place_mat(path)
    assert places.db_images == tuple(DB_IMAGES)
    assert places.query_images == tuple(QUERY_IMAGES)
    assert places.db_utm.shape == (3, 2) and places.db_utm.dtype == np.float64
    np.testing.assert_array_equal(places.db_utm, DB_UTM)
    np.testing.assert_array_equal(places.query_utm, QUERY_UTM)
    assert places.db_utm[2].tolist() == [585103.0, 4477203.0]  # image 2's easting, northing
    assert places.pos_dist_thr == 30.0
    assert places.name == "pitts30k_test"
    assert places.which_set == "test"
    with pytest.raises(ValueError):
        places.db_utm[0, 0] = 0.0  # read-only


def test_read_place_mat_defaults(tmp_path):
    path = write_mat(tmp_path / "tokyo247.mat", db_struct(posDistThr=None, whichSet=None, numImages=None,
                                                           numQueries=None, qImage=cell(QUERY_IMAGES, column=True)))
    places = read_place_mat(path)
    assert places.pos_dist_thr == 25.0
    assert places.which_set is None
    assert places.query_images == tuple(QUERY_IMAGES)


@pytest.mark.parametrize("changes, message", [
    ({"utmQ": None}, "dbStruct has no field 'utmQ'"),
    ({"dbImage": None}, "no field 'dbImage'"),
    ({"utmDb": DB_UTM}, r"dbStruct.utmDb: expected a 2 x 3 array.*shape \(3, 2\)"),
    ({"utmQ": QUERY_UTM.T[:, :1]}, r"dbStruct.utmQ: expected a 2 x 2"),
    ({"dbImage": cell(["000/a.jpg", "../../etc/passwd", "b.jpg"])}, "dbImage, entry 1: .*'\\.\\.'"),
    ({"dbImage": cell(["000/a.jpg", "/abs/b.jpg", "b.jpg"])}, "dbImage, entry 1: .*absolute"),
    ({"qImage": cell(["q.jpg", "q.jpg"])}, "qImage: 'q.jpg' appears more than once"),
    ({"qImage": cell(["q.jpg", ""])}, "qImage, entry 1: .*non-empty"),
    ({"numImages": 4}, "numImages is 4 but there are 3"),
    ({"posDistThr": -1.0}, "posDistThr must be a positive"),
    ({"utmDb": np.array([[1.0, np.nan, 3.0], [4.0, 5.0, 6.0]])}, "utmDb: positions must be finite"),
])
def test_read_place_mat_rejects_bad_fields(tmp_path, changes, message):
    path = write_mat(tmp_path / "bad.mat", db_struct(**changes))
    with pytest.raises(DatasetError, match="bad.mat") as error:
        read_place_mat(path)
    assert error.match(message)


def test_read_place_mat_rejects_bad_files(tmp_path):
    scipy.io.savemat(tmp_path / "other.mat", {"something": np.zeros(3)})
    with pytest.raises(DatasetError, match="other.mat: no 'dbStruct' variable .*something"):
        read_place_mat(tmp_path / "other.mat")
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DatasetError, match="junk.mat"):
        read_place_mat(tmp_path / "junk.mat")
    with pytest.raises(FileNotFoundError):
        read_place_mat(tmp_path / "missing.mat")


# -- short-lists --------------------------------------------------------------------------------

QUERIES = ["q/0.jpg", "q/1.jpg"]
DATABASE = ["007", "d/a.jpg", "d/b.jpg", "d/c.jpg"]  # '007' stays a string, not the number 7


def write_csv(path, header, rows) -> str:
    path.write_text("\n".join([",".join(header)] + [",".join(str(v) for v in row) for row in rows]) + "\n")
    return str(path)


def test_shortlists_from_csv_ranks(tmp_path):
    rows = [("q/1.jpg", "d/c.jpg", 2), ("q/0.jpg", "d/b.jpg", 1), ("q/0.jpg", "007", 3),
            ("q/1.jpg", "d/a.jpg", 0), ("q/0.jpg", "d/c.jpg", 2)]
    path = write_csv(tmp_path / "top.csv", ["query", "candidate", "rank"], rows)
    lists = read_shortlists(path, QUERIES, DATABASE)
    assert lists == {"q/0.jpg": ["d/b.jpg", "d/c.jpg", "007"], "q/1.jpg": ["d/a.jpg", "d/c.jpg"]}
    assert list(lists) == QUERIES
    assert read_shortlists(path, QUERIES, DATABASE, top=2)["q/0.jpg"] == ["d/b.jpg", "d/c.jpg"]


def test_shortlists_from_csv_scores_descending(tmp_path):
    rows = [("q/0.jpg", "d/a.jpg", 0.1), ("q/0.jpg", "d/b.jpg", 0.9), ("q/0.jpg", "d/c.jpg", 0.5),
            ("q/1.jpg", "007", -2.0)]
    path = write_csv(tmp_path / "top.csv", ["query", "candidate", "score"], rows)
    assert read_shortlists(path, QUERIES, DATABASE) == {"q/0.jpg": ["d/b.jpg", "d/c.jpg", "d/a.jpg"],
                                                       "q/1.jpg": ["007"]}


def test_shortlists_from_parquet(tmp_path):
    table = pa.table({"query": ["q/0.jpg", "q/0.jpg", "q/1.jpg", "q/1.jpg"],
                      "candidate": ["d/a.jpg", "d/b.jpg", "d/c.jpg", "d/a.jpg"],
                      "score": [0.2, 0.3, 5.0, 6.0]})
    pq.write_table(table, tmp_path / "top.parquet")
    assert read_shortlists(tmp_path / "top.parquet", QUERIES, DATABASE, top=1) == {
        "q/0.jpg": ["d/b.jpg"], "q/1.jpg": ["d/a.jpg"]}


@pytest.mark.parametrize("header, rows, message", [
    (["query", "candidate", "rank"], [("q/0.jpg", "d/a.jpg", 0), ("q/9.jpg", "d/a.jpg", 0)],
     "1 unknown queries: 'q/9.jpg'"),
    (["query", "candidate", "rank"], [("q/0.jpg", "d/zzz.jpg", 0), ("q/1.jpg", "d/a.jpg", 0)],
     "unknown database images .*'d/zzz.jpg'"),
    (["query", "candidate", "rank"], [("q/0.jpg", "d/a.jpg", 0), ("q/0.jpg", "d/a.jpg", 1), ("q/1.jpg", "007", 0)],
     "query 'q/0.jpg' lists candidate 'd/a.jpg' more than once"),
    (["query", "candidate", "rank"], [("q/0.jpg", "d/a.jpg", 0), ("q/0.jpg", "d/b.jpg", 0), ("q/1.jpg", "007", 0)],
     "query 'q/0.jpg' has rank 0 more than once"),
    (["query", "candidate"], [("q/0.jpg", "d/a.jpg")], "need columns query, candidate and rank or score"),
    (["query", "candidate", "rank"], [("q/0.jpg", "d/a.jpg", 0)], "no short-list for 1 queries: 'q/1.jpg'"),
    (["query", "candidate", "rank"], [("q/0.jpg", "d/a.jpg", "first")], "cannot read"),
    (["query", "candidate", "score"], [("q/0.jpg", "d/a.jpg", "inf"), ("q/1.jpg", "007", 0)], "non-finite"),
    (["query", "candidate", "score"], [("q/0.jpg", "d/a.jpg", "nan"), ("q/1.jpg", "007", 0)], "empty or null"),
    (["query", "candidate", "score"], [("q/0.jpg", "", 0.5), ("q/1.jpg", "007", 0)], "unknown database images .*''"),
])
def test_shortlists_reject_bad_tables(tmp_path, header, rows, message):
    path = write_csv(tmp_path / "lists.csv", header, rows)
    with pytest.raises(DatasetError, match="lists.csv") as error:
        read_shortlists(path, QUERIES, DATABASE)
    assert error.match(message)


def test_shortlists_may_cover_some_queries(tmp_path):
    path = write_csv(tmp_path / "top.csv", ["query", "candidate", "rank"], [("q/1.jpg", "d/a.jpg", 0)])
    assert read_shortlists(path, QUERIES, DATABASE, require_all=False) == {"q/1.jpg": ["d/a.jpg"]}


def test_shortlists_from_npy_indices(tmp_path):
    np.save(tmp_path / "top100.npy", np.array([[2, 0, 3], [1, 2, 0]], dtype=np.int32))
    assert read_shortlists(tmp_path / "top100.npy", QUERIES, DATABASE) == {
        "q/0.jpg": ["d/b.jpg", "007", "d/c.jpg"], "q/1.jpg": ["d/a.jpg", "d/b.jpg", "007"]}
    assert read_shortlists(tmp_path / "top100.npy", QUERIES, DATABASE, top=1) == {
        "q/0.jpg": ["d/b.jpg"], "q/1.jpg": ["d/a.jpg"]}


@pytest.mark.parametrize("array, message", [
    (np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]]), "float64 values, not database indices.*argsort"),
    (np.array([[2, 0, 4], [1, 2, 0]]), "query 'q/0.jpg', rank 2: 4 is not a database index"),
    (np.array([[2, 0, -1], [1, 2, 0]]), "rank 2: -1 is not a database index"),
    (np.array([[2, 0, 2], [1, 2, 0]]), "query 'q/0.jpg' lists candidate 'd/b.jpg' \\(index 2\\) more than once"),
    (np.array([[2, 0, 1]]), r"expected a \(2, K\) array"),
    (np.array([[2, None], [1, 0]], dtype=object), "object arrays are refused"),
])
def test_shortlists_reject_bad_npy(tmp_path, array, message):
    np.save(tmp_path / "top100.npy", array, allow_pickle=True)
    with pytest.raises(DatasetError, match="top100.npy") as error:
        read_shortlists(tmp_path / "top100.npy", QUERIES, DATABASE)
    assert error.match(message)


def test_shortlists_reject_bad_arguments(tmp_path):
    path = write_csv(tmp_path / "top.csv", ["query", "candidate", "rank"], [("q/0.jpg", "d/a.jpg", 0)])
    with pytest.raises(DatasetError, match="top.txt: short-lists must be"):
        read_shortlists(tmp_path / "top.txt", QUERIES, DATABASE)
    with pytest.raises(ValueError, match="top must be a positive integer"):
        read_shortlists(path, QUERIES, DATABASE, top=0)
    with pytest.raises(ValueError, match="database image 'd/a.jpg' appears more than once"):
        read_shortlists(path, QUERIES, ["d/a.jpg", "d/a.jpg"])
