"""``ega-ray cache-teacher``: the frozen teacher's embeddings of K random views of every training image,
computed once by a Ray Data actor pool and written as Parquet (index, view, embedding) with a manifest.

The format and its checks are in ``ega_ray.data.cache_format``; the ``cached`` teacher mode reads it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import ray.data

from ega_ray.config import Config
from ega_ray.data.cache_format import expected_manifest, file_digests
from ega_ray.data.images import decode_images
from ega_ray.data.teacher_stage import embed_with_actor_pool
from ega_ray.disk import disk_full, write_atomic
from ega_ray.errors import ConfigError
from ega_ray.run_folder import rebuild
from ega_ray.train.launch import connect_ray
from ega_ray.train.preflight import PreparedData, check_teacher, prepare_data, resolve


def build_cache(cfg: Config, views: int, output: str | Path) -> dict[str, Any]:
    """Embed ``views`` random teacher views of every image of ``data.train`` (its carved validation rows
    too, so one cache serves any validation split); write ``output`` atomically."""
    if views < 1:
        raise ConfigError(f"--views must be >= 1, got {views}")
    cfg = resolve(cfg)
    data = prepare_data(cfg)
    spec = check_teacher(cfg).spec
    output = Path(output).expanduser().resolve()
    manifest = expected_manifest(cfg, spec) | {
        "views": views,
        "embed_dim": spec.embed_dim,
        "seed": cfg.run.seed,
        "train": cfg.data.train,
    }
    t0 = time.time()
    try:
        manifest = _build(cfg, views, output, data, manifest, t0)
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
        connect_ray(cfg)
        decode = {"image_size": cfg.data.image_size, "split": "data.train"}
        images = (
            ray.data.read_parquet(cfg.data.train)
            .select_columns(["image", "index"])
            .map_batches(decode_images, fn_kwargs=decode, batch_format="numpy")
        )
        embedded = embed_with_actor_pool(images, cfg, views=views, attach=False)
        embedded.write_parquet(str(tmp / "embeddings"))
        rows = pads.dataset(str(tmp / "embeddings"), format="parquet").count_rows()
        manifest |= {
            "rows": rows,
            "images": len(data.indices),
            "files": file_digests(tmp / "embeddings"),
            "wall_time_s": round(time.time() - t0, 1),
        }
        # every row of data.train, the validation rows carved from it included: the cache does not depend on
        # the validation split (a cached run never looks those rows up: they are not in its training split)
        if rows != len(data.indices) * views:
            raise RuntimeError(f"cache-teacher: wrote {rows} rows, expected {len(data.indices)} images × {views} views")
        write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
