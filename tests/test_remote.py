"""Shard sets by URL, against real servers on loopback: Python's HTTP server for ``http://`` and
moto's S3 server for ``s3://``. Every command that reads a set takes its URL (folder, manifest,
brace pattern, one .tar), streams it, and checks it against its manifest; a hostile manifest can
neither reach outside its set nor run a command."""
from __future__ import annotations

import functools
import http.server
import json
import shutil
import tarfile
import threading

import pytest
from conftest import REFERENCE_N, REFERENCE_SHARD_SIZE, REFERENCE_SHARDS, all_output, make_runner

from datagen.cli import main as datagen_main
from datagen.format.shards import sample_key, shard_name
from datagen.format.shardset import resolve_shard_set
from datagen.format.storage import LocationError, location
from datagen.verify import verify_dir
from trainer.cli import main as trainer_main
from trainer.config import TrainConfig
from trainer.data import make_loader

pytest_plugins = ["s3_helpers"]  # the fixtures s3 and s3_endpoint (moto's S3 server)

SERVED: dict[str, int] = {}
"""Bytes the test server sent, by request path."""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Python's file server (no range requests), counting the bytes it sends."""

    def log_message(self, *args):  # the test output stays readable
        pass

    def copyfile(self, source, outputfile):
        data = source.read()
        SERVED[self.path] = SERVED.get(self.path, 0) + len(data)
        outputfile.write(data)


@pytest.fixture()
def served(reference, tmp_path):
    """(folder on disk, its URL): a copy of the reference set under ``set/`` of a loopback HTTP server."""
    root = tmp_path / "www"
    shutil.copytree(reference, root / "set", ignore=shutil.ignore_patterns("bank", ".build.lock"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root / "set", f"http://127.0.0.1:{server.server_port}/set"
    server.shutdown()
    server.server_close()


def names(found) -> list[str]:
    return [tar.name for tar in found.tars]


@pytest.mark.parametrize("form", ["folder", "folder/", "manifest", "pattern", "tar"])
def test_every_form_of_a_url_names_the_shards_with_their_entries(served, reference, form):
    _, url = served
    spec = {"folder": url, "folder/": url + "/", "manifest": f"{url}/manifest.json",
            "pattern": f"{url}/shard-{{000001..000002}}.tar", "tar": f"{url}/{shard_name(3)}"}[form]
    found = resolve_shard_set(spec)
    local = resolve_shard_set(reference)
    expected = {"folder": names(local), "folder/": names(local), "manifest": names(local),
                "pattern": [shard_name(1), shard_name(2)], "tar": [shard_name(3)]}[form]
    assert names(found) == expected
    assert all(str(tar).startswith("http://") for tar in found.tars)
    assert [found.entry(tar)["sha256"] for tar in found.tars] == \
        [local.entry(reference / name)["sha256"] for name in expected]
    assert found.whole == form.startswith(("folder", "manifest"))
    if found.whole:
        assert found.fingerprint == local.fingerprint


def test_verify_by_url_checks_the_bytes_and_names_a_damaged_sample(served):
    folder, url = served
    report = verify_dir(url, progress=False)
    assert report.problems == [] and report.samples == REFERENCE_N
    assert report.fingerprint == json.loads((folder / "manifest.json").read_text())["fingerprint"]

    key = sample_key(2, 1)
    tar = folder / shard_name(2)
    with tarfile.open(tar) as archive:
        offset = archive.getmember(f"{key}.src.jpg").offset_data
    data = bytearray(tar.read_bytes())
    data[offset + 9] ^= 0x01
    tar.write_bytes(bytes(data))
    report = verify_dir(url, progress=False)
    assert any(shard_name(2) in p and "sha256" in p for p in report.problems), report.problems
    assert any(f"sample {key}" in p and "checksum recorded" in p for p in report.problems), report.problems
    assert report.fingerprint is None


def test_verify_quick_checks_sizes_and_the_manifest_only(served):
    folder, url = served
    tar = folder / shard_name(1)
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the full check sees it
    tar.write_bytes(bytes(data))
    result = make_runner().invoke(datagen_main, ["verify", url, "--quick", "--quiet"])
    assert result.exit_code == 0, all_output(result)
    assert "sizes" in result.output and "not read" in all_output(result)
    (folder / shard_name(3)).write_bytes(b"\0" * 1024)
    result = make_runner().invoke(datagen_main, ["verify", url, "--quick", "--quiet"])
    assert result.exit_code == 1 and f"BAD {shard_name(3)}: 1024 bytes" in result.output, all_output(result)
    result = make_runner().invoke(datagen_main, ["verify", url, "--quiet"])
    assert result.exit_code == 1 and shard_name(1) in result.output


def test_trainer_inspects_and_streams_a_set_by_url(served):
    _, url = served
    result = make_runner().invoke(trainer_main, ["inspect", url])
    assert result.exit_code == 0, all_output(result)
    assert f"samples: {REFERENCE_N}" in result.output
    config = TrainConfig(positives=2, image_size=64, shuffle_buffer=4)
    batches = iter(make_loader(url, config, workers=0))
    keys = {key for _ in range(6) for key in next(batches)["keys"]}
    assert len(keys) >= 6 and all(key[:6].isdigit() for key in keys)


def test_the_trainer_skips_a_remote_shard_whose_bytes_changed(served, capsys):
    folder, url = served
    tar = folder / shard_name(0)
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0x01
    tar.write_bytes(bytes(data))
    config = TrainConfig(positives=2, image_size=64, shuffle_buffer=4)
    batches = iter(make_loader(url, config, workers=0))
    keys = {key for _ in range(8) for key in next(batches)["keys"]}
    assert not any(key.startswith("000000_") for key in keys)
    assert shard_name(0) in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "http://127.0.0.1:1/x.tar",
                                  "pipe:cat /etc/passwd", "sub/shard-000000.tar"])
def test_a_hostile_manifest_by_url_is_refused(served, name):
    folder, url = served
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["name"] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="plain file name"):
        resolve_shard_set(url)
    result = make_runner().invoke(datagen_main, ["verify", url, "--quiet"])
    assert result.exit_code == 1 and "plain file name" in all_output(result)
    assert "Traceback" not in all_output(result)


@pytest.mark.parametrize("spec", ["pipe:cat /etc/passwd", "ftp://example.org/set", "pipe:curl x | sh"])
def test_executing_and_unknown_schemes_are_refused(spec):
    with pytest.raises(LocationError):
        location(spec)
    result = make_runner().invoke(trainer_main, ["inspect", spec])
    assert result.exit_code == 2 and "Traceback" not in all_output(result), all_output(result)


def test_a_missing_url_is_named(served):
    _, url = served
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        resolve_shard_set(url + "/../nothing-here")
    result = make_runner().invoke(datagen_main, ["verify", f"{url}/{shard_name(7)}", "--quiet"])
    assert result.exit_code == 1 and shard_name(7) in result.output, all_output(result)


def test_a_checked_remote_shard_is_fetched_once_from_a_server_without_ranges(served, reference):
    """One sequential GET per shard, hashed on the way in: no range requests (Python's server has
    none), no second download for the checksum."""
    from datagen.format.shards import iter_tar_samples

    _, url = served
    entry = resolve_shard_set(reference).entry(reference / shard_name(1))
    SERVED.clear()
    samples = list(iter_tar_samples(f"{url}/{shard_name(1)}", sha256=entry["sha256"]))
    assert len(samples) == REFERENCE_SHARD_SIZE
    assert SERVED == {f"/set/{shard_name(1)}": entry["bytes"]}


def test_the_set_reads_the_same_over_http_as_on_disk(served, reference):
    _, url = served
    assert REFERENCE_SHARDS * REFERENCE_SHARD_SIZE == REFERENCE_N
    from datagen.format.shards import iter_tar_samples

    for k in range(REFERENCE_SHARDS):
        assert list(iter_tar_samples(f"{url}/{shard_name(k)}")) == list(iter_tar_samples(reference / shard_name(k)))


# -- S3 (moto's server on loopback) ------------------------------------------------------------------

def test_publish_verify_pull_and_train_through_s3(reference, s3, tmp_path):
    url = f"{s3}/sets/reference"
    result = make_runner().invoke(datagen_main, ["publish", str(reference), url, "--catalog", str(tmp_path / "cat"),
                                                 "--no-progress"])
    assert result.exit_code == 0, all_output(result)
    manifest = json.loads((reference / "manifest.json").read_text())
    catalog = list((tmp_path / "cat").iterdir())
    assert len(catalog) == 1 and manifest["fingerprint"][:12] in catalog[0].name
    assert json.loads(catalog[0].read_text())["url"] == url
    assert json.loads(catalog[0].read_text())["fingerprint"] == manifest["fingerprint"]

    result = make_runner().invoke(datagen_main, ["verify", url, "--quiet"])
    assert result.exit_code == 0, all_output(result)
    assert f"fingerprint {manifest['fingerprint']}" in result.output

    pulled = tmp_path / "pulled"
    result = make_runner().invoke(datagen_main, ["pull", url, str(pulled), "--no-progress"])
    assert result.exit_code == 0, all_output(result)
    for entry in manifest["shards"]:
        for name in (entry["name"], entry["samples_file"], entry["stats_file"]):
            assert (pulled / name).read_bytes() == (reference / name).read_bytes()
    assert (pulled / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    assert not list(pulled.glob("*.tmp"))

    config = TrainConfig(positives=2, image_size=64, shuffle_buffer=4)
    batches = iter(make_loader(url, config, workers=0))
    assert len({key for _ in range(4) for key in next(batches)["keys"]}) >= 4


def test_pull_names_a_damaged_shard_and_writes_no_manifest(reference, s3, tmp_path):
    import s3fs

    url = f"{s3}/damaged"
    make_runner().invoke(datagen_main, ["publish", str(reference), url, "--catalog", str(tmp_path / "cat"),
                                        "--no-progress"])
    fs = s3fs.S3FileSystem()
    data = bytearray(fs.cat(f"{url}/{shard_name(2)}"))
    data[len(data) // 2] ^= 0x01
    fs.pipe(f"{url}/{shard_name(2)}", bytes(data))
    result = make_runner().invoke(datagen_main, ["pull", url, str(tmp_path / "pulled"), "--no-progress"])
    assert result.exit_code == 1 and f"BAD {url}/{shard_name(2)}: sha256" in result.output, all_output(result)
    assert not (tmp_path / "pulled" / "manifest.json").exists()
    result = make_runner().invoke(datagen_main, ["verify", url, "--quiet"])
    assert result.exit_code == 1 and shard_name(2) in result.output


def test_publish_refuses_a_set_whose_bytes_changed_and_uploads_nothing(reference_copy, s3, tmp_path):
    import s3fs

    tar = reference_copy / shard_name(1)
    data = bytearray(tar.read_bytes())
    data[100] ^= 0x01
    tar.write_bytes(bytes(data))
    url = f"{s3}/refused"
    result = make_runner().invoke(datagen_main, ["publish", str(reference_copy), url, "--no-progress",
                                                 "--catalog", str(tmp_path / "cat")])
    assert result.exit_code == 1 and shard_name(1) in all_output(result)
    assert not s3fs.S3FileSystem().exists(f"{url}/manifest.json")
    assert not (tmp_path / "cat").exists()


def test_publishing_to_http_is_refused(reference, tmp_path):
    result = make_runner().invoke(datagen_main, ["publish", str(reference), "http://127.0.0.1:1/x", "--no-progress",
                                                 "--catalog", str(tmp_path / "cat")])
    assert result.exit_code == 1 and "http:// scheme is not supported" in all_output(result)


def test_preview_draws_a_set_by_url(served, tmp_path):
    _, url = served
    page = tmp_path / "page.html"
    result = make_runner().invoke(datagen_main, ["preview", url, "--out", str(page), "-n", "3"])
    assert result.exit_code == 0, all_output(result)
    assert page.read_text().count("<img") >= 3


@pytest.mark.slow
def test_trainer_fit_streams_a_published_set_from_s3(reference, s3, tmp_path):
    from test_trainer_cli import TINY

    url = f"{s3}/fit"
    make_runner().invoke(datagen_main, ["publish", str(reference), url, "--catalog", str(tmp_path / "cat"),
                                        "--no-progress"])
    run = tmp_path / "run"
    result = make_runner().invoke(trainer_main, ["fit", "--shards", url, "--out", str(run), "--steps", "2", *TINY])
    assert result.exit_code == 0, all_output(result)
    record = json.loads((run / "run.json").read_text())
    manifest = json.loads((reference / "manifest.json").read_text())
    assert record["dataset_fingerprint"] == manifest["fingerprint"] and record["shards"] == url
    assert (run / "checkpoint.pt").is_file()


def test_a_second_pull_into_a_folder_being_pulled_stops_naming_the_first(reference, s3, tmp_path):
    """Two pulls into one folder would write the same temporary files: the folder is locked."""
    from datagen.runner.lock import OutputLock

    url = f"{s3}/twice"
    make_runner().invoke(datagen_main, ["publish", str(reference), url, "--catalog", str(tmp_path / "cat"),
                                        "--no-progress"])
    pulled = tmp_path / "pulled"
    with OutputLock(pulled, "datagen pull", option="FOLDER"):
        result = make_runner().invoke(datagen_main, ["pull", url, str(pulled), "--no-progress"])
    assert result.exit_code == 1 and "is being written by" in all_output(result) and "datagen pull" in \
        all_output(result), all_output(result)
    assert not list(pulled.glob("shard-*"))
    result = make_runner().invoke(datagen_main, ["pull", url, str(pulled), "--no-progress"])
    assert result.exit_code == 0, all_output(result)
