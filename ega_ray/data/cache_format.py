"""The on-disk format of a teacher cache (``ega-ray cache-teacher``): ``embeddings/`` (Parquet rows index,
view, embedding) and ``manifest.json``, which records what the embeddings depend on (teacher, weights,
augmentation, data, K), the row and view counts and the SHA-256 of every embeddings file. A ``cached`` run
refuses a cache whose manifest does not match its config, whose files changed after it was built, or that
lacks the embedding of any (image, view). A cache is a local folder or a URI (``s3://…``, with the query of an
S3-compatible server kept: ``ega_ray.uris``), read through pyarrow's filesystems. No torch, no Ray.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ega_ray import uris
from ega_ray.constants import TEACHER_EMB
from ega_ray.data.parquet import read_columns
from ega_ray.errors import ConfigError
from ega_ray.models.weights import is_weights_file, sha256_of

if TYPE_CHECKING:
    from ega_ray.config import Config

CACHE_FORMAT = "ega-ray-teacher-cache/2"  # /2: per-file SHA-256 and row/view counts


def split_fingerprint(path: str) -> str:
    """A fingerprint of a Parquet split: its files' names and sizes and its row count."""
    ds = pads.dataset(path, format="parquet")
    infos = ds.filesystem.get_file_info(sorted(ds.files))
    parts = [(Path(i.path).name, i.size) for i in infos] + [ds.count_rows()]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def weights_id(weights: str | None) -> str:
    if weights is None:
        return "random-init"
    return f"sha256:{sha256_of(weights)}" if is_weights_file(weights) else f"tag:{weights}"


def expected_manifest(cfg: Config, spec) -> dict[str, Any]:
    """What a cache for ``cfg`` must have been built with (``spec``: the teacher's TeacherSpec)."""
    a = cfg.augment
    return {
        "format": CACHE_FORMAT,
        "teacher": cfg.teacher.name,
        "weights": weights_id(cfg.teacher.weights),
        "augmentation": {
            "pad": a.pad,
            "flip": a.flip,
            "input_size": spec.input_size,
            "interpolation": spec.interpolation,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "image_size": cfg.data.image_size,
        }
        | ({"resize_size": spec.resize_size} if spec.resize_size is not None else {}),
        "data_fingerprint": split_fingerprint(cfg.data.train),
    }


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``location`` (a local path or a URI, its query configuring the filesystem) and the
    path within it."""
    if uris.is_uri(str(location)):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), str(Path(location).absolute())


def read_text(location: str | Path) -> str:
    """The text of file ``location`` (local or URI); FileNotFoundError when there is none."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(str(location))
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def sha256_at(location: str | Path) -> str:
    """SHA-256 of file ``location`` (local or URI), read in blocks."""
    fs, path = filesystem(location)
    return _sha256(fs, path)


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: str | Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (local or URI), by path relative to it; empty when it is absent."""
    fs, base = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    return {p[len(base) :].lstrip("/"): _sha256(fs, p) for p in files}


def check_manifest(cfg: Config, spec) -> dict[str, Any]:
    """The cache's manifest, after checking that it matches ``cfg`` and that its embeddings files are the
    ones it was built with; a ConfigError naming the difference if not."""
    cache = str(cfg.teacher.cache)
    try:
        found = json.loads(read_text(uris.join(cache, "manifest.json")))
    except FileNotFoundError:
        raise ConfigError(f"teacher.cache: {cache!r} holds no manifest.json (run ega-ray cache-teacher)") from None
    except ValueError as err:
        raise ConfigError(f"teacher.cache: {cache!r}: manifest.json is not valid JSON ({err})") from None
    if found.get("format") != CACHE_FORMAT:
        raise ConfigError(
            f"teacher.cache: {cache!r} has format {found.get('format')!r}, not {CACHE_FORMAT!r} "
            "(no file digests); rebuild it with `ega-ray cache-teacher`"
        )
    expected = expected_manifest(cfg, spec)
    diffs = [
        f"{k} (cache: {json.dumps(found.get(k))}, config: {json.dumps(v)})"
        for k, v in expected.items()
        if found.get(k) != v
    ]
    if diffs:
        raise ConfigError(
            f"teacher.cache: {cache!r} was built for another setting: {'; '.join(diffs)}; "
            "rebuild it with `ega-ray cache-teacher`"
        )
    recorded, actual = found.get("files") or {}, file_digests(uris.join(cache, "embeddings"))
    changed = sorted(n for n in set(recorded) | set(actual) if recorded.get(n) != actual.get(n))
    if changed:
        status = {
            n: "missing" if n not in actual else "not in the manifest" if n not in recorded else "changed"
            for n in changed
        }
        what = ", ".join(f"embeddings/{n} ({status[n]})" for n in changed[:3])
        raise ConfigError(
            f"teacher.cache: {cache!r} differs from what its manifest recorded: {what}; "
            "rebuild it with `ega-ray cache-teacher`"
        )
    return found


def load_cached_embeddings(cache: str, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense (rows, views, D) float16 embeddings and, for every training ``index``, its row in them. Every
    training image must have each of the manifest's views exactly once (a ConfigError otherwise)."""
    views = int(json.loads(read_text(uris.join(cache, "manifest.json")))["views"])
    table = read_columns(uris.join(cache, "embeddings"), ["index", "view", "embedding"])
    index, view = table["index"].to_numpy(), table["view"].to_numpy()
    emb = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float16)
    if len(view) and (view.min() < 0 or view.max() >= views):
        raise ConfigError(f"teacher.cache: {cache!r} has view {view.max()}, but its manifest says {views} views")
    uniq, inverse = np.unique(index, return_inverse=True)
    pairs = np.unique(inverse * views + view)
    if len(pairs) != len(index):
        raise ConfigError(f"teacher.cache: {cache!r} holds some (index, view) twice; rebuild it")
    missing = np.setdiff1d(indices, uniq)
    if len(missing):
        raise ConfigError(f"teacher.cache: {cache!r} lacks {len(missing)} training images (e.g. index {missing[0]})")
    if len(pairs) != len(uniq) * views:
        counts = np.bincount(inverse, minlength=len(uniq))
        short = uniq[counts < views]
        raise ConfigError(
            f"teacher.cache: {cache!r} lacks {len(uniq) * views - len(pairs)} of its {len(uniq) * views} views "
            f"(e.g. of index {short[0]}); rebuild it"
        )
    dense = np.zeros((len(uniq), views, emb.shape[1]), dtype=np.float16)
    dense[inverse, view] = emb
    position = np.full(int(max(indices.max(), uniq.max())) + 1, -1, dtype=np.int64)
    position[uniq] = np.arange(len(uniq))
    return dense, position


def attach_cached(batch: dict[str, np.ndarray], table: np.ndarray, position: np.ndarray) -> dict[str, Any]:
    """Ray Data batch transform: the cached (views, D) embeddings of each row, looked up by ``index`` in
    :func:`load_cached_embeddings`'s table (here, not beside the teacher stage: its tasks import no torch)."""
    batch[TEACHER_EMB] = table[position[batch["index"]]]
    return batch
