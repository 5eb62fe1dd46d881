"""A moto S3 server on loopback for the tests that read or write sets in a bucket
(test_remote, test_build_to_store). A test module that needs them declares
``pytest_plugins = ["s3_helpers"]``."""
from __future__ import annotations

import itertools

import pytest

_BUCKETS = itertools.count()


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on loopback for this module, with a bucket; its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3(s3_endpoint, monkeypatch):
    """A fresh bucket on the moto server, the AWS_* environment pointing at it (inherited by the
    processes a test starts); yields its s3:// URL."""
    import s3fs

    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", s3_endpoint)):
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"bucket-{next(_BUCKETS)}"
    s3fs.S3FileSystem().mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()
