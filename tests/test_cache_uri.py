"""A teacher cache in an S3-compatible bucket (moto's server on 127.0.0.1, reached through pyarrow as a run
reaches it: the server in the URI's query): the manifest check, its file digests, the dense embeddings of a
cached run and the refusal of a remote ``--output`` that holds something else. Real pyarrow, real HTTP;
no Ray (tests/test_multihost.py builds one with ``cache-teacher`` on separate hosts)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from ega_ray import uris
from ega_ray.config import load_config
from ega_ray.data.cache_format import check_manifest, expected_manifest, file_digests, load_cached_embeddings
from ega_ray.data.parquet import write_split
from ega_ray.driver.preflight import resolve
from ega_ray.driver.teacher_cache import check_remote_output
from ega_ray.errors import ConfigError
from ega_ray.models import build_teacher

REPO = Path(__file__).resolve().parents[1]
BUCKET = "cache-test"


@pytest.fixture(scope="module")
def bucket():
    """``s3://cache-test?endpoint_override=127.0.0.1:<port>&scheme=http`` on a moto server of this test."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    before = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)  # moto accepts any key; pyarrow needs one (no real secret here)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        uri = f"s3://{BUCKET}?endpoint_override=127.0.0.1:{port}&scheme=http"
        fs, _ = pafs.FileSystem.from_uri(f"{uri}&allow_bucket_creation=true")
        fs.create_dir(BUCKET)
        yield uri
    finally:
        server.stop()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(local: Path, uri: str) -> None:
    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def fake_cache(folder: Path, cfg, spec, views: int, n: int) -> None:
    """A cache as ``cache-teacher`` writes it: every (index, view) once, a manifest with the file digests."""
    index, view = np.repeat(np.arange(n), views), np.tile(np.arange(views), n)
    emb = np.random.default_rng(0).standard_normal((n * views, spec.embed_dim)).astype(np.float32)
    (folder / "embeddings").mkdir(parents=True)
    table = pa.table({"index": index, "view": view, "embedding": list(emb)})
    pq.write_table(table.slice(0, n), folder / "embeddings" / "a.parquet")
    pq.write_table(table.slice(n), folder / "embeddings" / "b.parquet")
    manifest = expected_manifest(cfg, spec) | {"views": views, "rows": n * views, "images": n}
    manifest["files"] = file_digests(folder / "embeddings")
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_cache_in_a_bucket_is_checked_and_read_like_a_local_one(tmp_path, bucket):
    rng = np.random.default_rng(1)
    write_split(tmp_path / "train", rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8), np.arange(30) % 10)
    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"data.train={tmp_path / 'train'}"])
    spec = build_teacher("zoo:resnet8").spec
    fake_cache(tmp_path / "cache", cfg, spec, views=2, n=30)
    remote = uris.join(bucket, "caches", "digits")
    upload(tmp_path / "cache", remote)

    cfg.teacher.cache = remote
    cfg.teacher.mode = "cached"
    assert resolve(cfg).teacher.cache == remote, "a URI is kept as it is (no local path resolution)"
    assert file_digests(uris.join(remote, "embeddings")) == file_digests(tmp_path / "cache" / "embeddings")
    assert check_manifest(cfg, spec)["views"] == 2
    dense, position = load_cached_embeddings(remote, np.arange(30))
    local, _ = load_cached_embeddings(str(tmp_path / "cache"), np.arange(30))
    assert dense.shape == (30, 2, spec.embed_dim) and np.array_equal(dense, local)
    assert position[7] == 7

    # an embeddings file replaced after the manifest was written, and a prefix without a cache: refused
    fs, path = pafs.FileSystem.from_uri(uris.join(remote, "embeddings", "b.parquet"))
    fs.copy_file(path.replace("b.parquet", "a.parquet"), path)
    with pytest.raises(ConfigError, match=r"differs from what its manifest recorded: embeddings/b.parquet \(changed\)"):
        check_manifest(cfg, spec)
    cfg.teacher.cache = uris.join(bucket, "nothing")
    with pytest.raises(ConfigError, match=r"holds no manifest.json \(run ega-ray cache-teacher\)"):
        check_manifest(cfg, spec)


def test_a_remote_output_must_be_empty_or_an_earlier_cache(tmp_path, bucket):
    check_remote_output(uris.join(bucket, "empty"))  # nothing there yet
    (tmp_path / "cache" / "embeddings").mkdir(parents=True)
    (tmp_path / "cache" / "embeddings" / "x.parquet").write_bytes(b"x")
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    upload(tmp_path / "cache", uris.join(bucket, "earlier"))
    check_remote_output(uris.join(bucket, "earlier"))  # an earlier cache: rebuilt
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("epoch\n")
    upload(tmp_path / "run", uris.join(bucket, "run"))
    with pytest.raises(ConfigError, match=r"^--output: s3://cache-test/run\?.* holds metrics.csv, not a teacher cache"):
        check_remote_output(uris.join(bucket, "run"))
