"""``ega-ray cache-teacher``: the frozen teacher's embeddings of K random views of every training image,
computed once by a Ray Data actor pool and written as Parquet (index, view, embedding) with a manifest.

The format and its checks are in ``ega_ray.data.cache_format``; the ``cached`` teacher mode reads it.
The output is a local folder (built beside it and swapped in) or a URI (``s3://…``): on a cluster of separate
hosts the Ray Data writers run on the worker hosts, so only storage that every host reaches holds their files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray.data

from ega_ray import uris
from ega_ray.config import Config
from ega_ray.data.cache_format import expected_manifest, file_digests, filesystem
from ega_ray.data.images import decode_images
from ega_ray.data.teacher_stage import embed_with_actor_pool
from ega_ray.disk import disk_full, write_atomic
from ega_ray.driver.launch import connect_ray
from ega_ray.driver.nodes import Written
from ega_ray.driver.preflight import PreparedData, check_teacher, prepare_data, resolve
from ega_ray.errors import ConfigError
from ega_ray.run_folder import rebuild


def build_cache(cfg: Config, views: int, output: str | Path) -> dict[str, Any]:
    """Embed ``views`` random teacher views of every image of ``data.train`` (its carved validation rows
    too, so one cache serves any validation split); write ``output`` atomically."""
    if views < 1:
        raise ConfigError(f"--views must be >= 1, got {views}")
    cfg = resolve(cfg)
    data = prepare_data(cfg)
    spec = check_teacher(cfg).spec
    remote = uris.is_uri(str(output))
    output = str(output) if remote else Path(output).expanduser().resolve()
    if remote:
        check_remote_output(str(output))
    manifest = expected_manifest(cfg, spec) | {
        "views": views,
        "embed_dim": spec.embed_dim,
        "seed": cfg.run.seed,
        "train": cfg.data.train,
    }
    t0 = time.time()
    try:
        build = _build_remote if remote else _build
        manifest = build(cfg, views, output, data, manifest, t0)
    except Exception as err:
        full = disk_full(err, fallback=output)  # raised inside Ray Data's writers: the folder and free space
        if full:
            raise full from None
        raise
    return {
        "output": str(output),
        "views": views,
        "rows": manifest["rows"],
        "embed_dim": spec.embed_dim,
        "wall_time_s": manifest["wall_time_s"],
    }


def _build(
    cfg: Config, views: int, output: Path, data: PreparedData, manifest: dict[str, Any], t0: float
) -> dict[str, Any]:
    """Embed and write the cache into a temporary sibling of ``output`` swapped in at the end; the manifest."""
    with rebuild(output, "cache-teacher") as tmp:
        _embed_and_write(cfg, views, str(tmp / "embeddings"), data, manifest, t0)
        write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_remote_output(output: str) -> None:
    """Refuse a remote ``--output`` that holds anything but an earlier cache (``manifest.json``,
    ``embeddings/``): a rebuild deletes what is there."""
    fs, base = filesystem(output)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
    names = {uris.basename(i.path) for i in infos}
    others = sorted(names - {"manifest.json", "embeddings"})
    if others:
        raise ConfigError(
            f"--output: {output} holds {', '.join(others[:3])}, not a teacher cache: name an empty prefix or an "
            "earlier cache (which is rebuilt)"
        )


def _build_remote(
    cfg: Config, views: int, output: str, data: PreparedData, manifest: dict[str, Any], t0: float
) -> dict[str, Any]:
    """Object stores have no rename to swap a folder in: the earlier manifest goes first (a half-built cache
    has none, so a cached run refuses it), then its embeddings; the new manifest is written last."""
    fs, base = filesystem(output)
    if fs.get_file_info(f"{base}/manifest.json").type == pafs.FileType.File:
        fs.delete_file(f"{base}/manifest.json")
    if fs.get_file_info(f"{base}/embeddings").type == pafs.FileType.Directory:
        fs.delete_dir(f"{base}/embeddings")
    _embed_and_write(cfg, views, uris.join(output, "embeddings"), data, manifest, t0)
    with fs.open_output_stream(f"{base}/manifest.json") as f:
        f.write((json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def cache_written(embeddings: str) -> Written:
    """Where the Ray Data writers of a cache build write, for the node checks: the bucket prefix, or the
    output's parent folder (its temporary sibling is built there)."""
    fix = "the Ray Data writers on every node write the cache there: use s3://…, gs://… or a path every node mounts"
    if uris.is_uri(embeddings):
        return Written("--output", embeddings, fix)
    return Written("--output (its parent folder)", str(Path(embeddings).parent.parent), fix)


def _embed_and_write(
    cfg: Config, views: int, embeddings: str, data: PreparedData, manifest: dict[str, Any], t0: float
) -> None:
    """Embed every image of ``data.train`` ``views`` times into Parquet at ``embeddings`` (a folder or URI);
    add the counts and file digests to ``manifest``."""
    connect_ray(cfg, cache_written(embeddings))
    decode = {"image_size": cfg.data.image_size, "split": "data.train"}
    images = (
        ray.data.read_parquet(cfg.data.train)
        .select_columns(["image", "index"])
        .map_batches(decode_images, fn_kwargs=decode, batch_format="numpy")
    )
    embedded = embed_with_actor_pool(images, cfg, views=views, attach=False)
    fs, path = filesystem(embeddings)  # the URI's query (an S3-compatible server) configures the filesystem
    embedded.write_parquet(path, filesystem=fs)
    rows = pads.dataset(path, filesystem=fs, format="parquet").count_rows()
    manifest |= {
        "rows": rows,
        "images": len(data.indices),
        "files": file_digests(embeddings),
        "wall_time_s": round(time.time() - t0, 1),
    }
    # every row of data.train, the validation rows carved from it included: the cache does not depend on
    # the validation split (a cached run never looks those rows up: they are not in its training split)
    if rows != len(data.indices) * views:
        raise RuntimeError(f"cache-teacher: wrote {rows} rows, expected {len(data.indices)} images × {views} views")
