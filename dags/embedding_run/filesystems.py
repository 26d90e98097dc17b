"""Whether this machine can open a URI's protocol: its fsspec filesystem package is installed.

A protocol fsspec knows (``gs``, ``az``, ``hf``, ...) but whose implementing package is absent
fails on first use with an ``ImportError`` deep inside a read. ``check_inputs`` asks first and
names the package to install, before any cluster starts: the Airflow workers and the Ray image
both open these URIs, so both need it.
"""

from __future__ import annotations

from embedding_run.uri_policy import scheme_of

#: protocols ``ray_jobs.storage`` opens under another name
_ALIASES = {"s3a": "s3"}


class MissingFilesystem(ValueError):
    """A URI's protocol needs a package that is not installed here."""


def missing_package(uri: str) -> str | None:
    """The package *uri*'s protocol needs and this machine lacks (None: none is missing, or
    the protocol is not one fsspec knows: opening it says so)."""
    import fsspec
    from fsspec.registry import known_implementations

    scheme = scheme_of(uri)
    if scheme in (None, "file"):
        return None
    protocol = _ALIASES.get(scheme, scheme)
    implementation = known_implementations.get(protocol)
    if implementation is None:
        return None
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        return implementation["class"].split(".", 1)[0]
    return None


def check_filesystems(uris: dict[str, str]) -> None:
    """Raise :class:`MissingFilesystem` for the first of *uris* (what names it, e.g.
    ``param manifest_uri`` -> URI) whose protocol's package is not installed, naming it, the
    protocol and the package."""
    for label, uri in uris.items():
        package = missing_package(uri) if uri else None
        if package:
            scheme = scheme_of(uri)
            raise MissingFilesystem(
                f"{label}: {scheme}:// needs the {package} package on the Airflow workers and the Ray image "
                f"(pip install {package}); it is not installed here"
            )


def image_uri_sample(manifest_file: str, limit: int = 10_000) -> dict[str, str]:
    """One ``image_uri`` per protocol among the first *limit* distinct ones of the file's first
    row group (one column chunk read): the protocols the run's image fetches will need."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ray_jobs import storage

    fs, path = storage.filesystem_for(manifest_file)
    with fs.open(path, "rb") as fh:
        parquet = pq.ParquetFile(fh)
        if parquet.metadata.num_row_groups == 0:
            return {}
        column = parquet.read_row_group(0, columns=["image_uri"]).column(0)
    examples: dict[str, str] = {}
    for uri in pc.unique(column).to_pylist()[:limit]:
        if isinstance(uri, str) and uri:
            examples.setdefault(scheme_of(uri) or "", uri)
    return examples
