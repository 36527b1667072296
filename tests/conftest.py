"""Shared fixtures. ``s3``: a real S3 API server (moto, over HTTP on 127.0.0.1) and a fresh bucket."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass
class S3:
    """A bucket on the test server: ``url(name)`` is ``s3://bucket/name``."""

    endpoint: str
    bucket: str

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    @property
    def storage_options(self) -> dict:
        """The endpoint and credentials as fsspec options, for code that must not rely on the environment."""
        return {"key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                "client_kwargs": {"endpoint_url": self.endpoint}}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> str:
    """Start ``python -m tests.s3_server`` (moto) on a free port; yield its endpoint URL; kill it at the end.

    A separate process, so that writer processes killed by the tests, and dask workers, all talk
    to one server that outlives them, and so that the server does not share this process's GIL.
    """
    log = tmp_path_factory.mktemp("s3") / "server.log"
    env = {**os.environ, **CREDENTIALS}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tests.s3_server"], cwd=ROOT, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the moto S3 server did not start:\n{log.read_text()[-3000:]}")
        yield f"http://127.0.0.1:{json.loads(line)['port']}"
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3:
    """Point boto/s3fs at the test server through the environment and create an empty bucket.

    Sets AWS_ENDPOINT_URL and test credentials with monkeypatch (child processes started in the
    test inherit them); s3fs' cached filesystem instances are dropped before and after, so no
    client configured for another endpoint leaks in or out.
    """
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = S3(s3_server, f"test-{uuid.uuid4().hex[:12]}")
    bucket.fs().mkdir(bucket.bucket)
    yield bucket
    s3fs.S3FileSystem.clear_instance_cache()
