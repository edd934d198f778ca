"""Storage locations: a local path, or a URI (``s3://bucket/prefix``, ``gs://…``) with an optional query string
that configures its filesystem as pyarrow's ``FileSystem.from_uri`` reads it, e.g. an S3-compatible server
(MinIO, Ceph, moto): ``s3://bucket/prefix?endpoint_override=10.0.0.5:9000&scheme=http``. Paths are joined
before the query, so every location derived from a configured one reaches the same server.

Imports nothing (the config imports it).
"""

from __future__ import annotations

URI_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "az://", "hdfs://", "http://", "https://")


def is_uri(path: str) -> bool:
    """Whether ``path`` names remote storage (a URI of :data:`URI_SCHEMES`) rather than a local path.

    Args:
        path: a configured location.

    Returns:
        True for a URI.
    """
    return path.startswith(URI_SCHEMES)


def join(base: str, *parts: str) -> str:
    """``base/part/…``, with ``base``'s query string (if any) kept at the end.

    Args:
        base: a local folder or a URI, with or without a query.
        parts: path segments to append.

    Returns:
        The joined location.
    """
    path, sep, query = base.partition("?") if is_uri(base) else (base, "", "")  # a local path may hold "?"
    joined = "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)])
    return f"{joined}{sep}{query}"


def basename(location: str) -> str:
    """The last path segment of ``location``.

    Args:
        location: a local path, or a URI whose query is ignored.

    Returns:
        The segment, e.g. ``test`` for ``s3://b/digits/test?endpoint_override=…``.
    """
    path = location.partition("?")[0] if is_uri(location) else location
    return path.rstrip("/").rsplit("/", 1)[-1]
