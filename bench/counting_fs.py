"""A local filesystem that counts every byte ``read()`` hands out, registered as ``counting://``.

The witness for "planning reads only footers": point planning at ``counting:///path`` and
compare :attr:`CountingFileSystem.bytes_read` with the bytes stored. Used by the planning
tests and ``bench/plan_scale.py``.
"""

from __future__ import annotations

import fsspec
from fsspec.implementations.local import LocalFileSystem


class CountingFileSystem(LocalFileSystem):
    protocol = "counting"
    bytes_read = 0
    opens = 0

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(self._strip_protocol(path), mode, **kwargs)
        CountingFileSystem.opens += 1
        real_read = f.read

        def read(*args):
            data = real_read(*args)
            CountingFileSystem.bytes_read += len(data)
            return data

        f.read = read
        return f

    @classmethod
    def _strip_protocol(cls, path):
        path = path[len("counting://") :] if str(path).startswith("counting://") else path
        return LocalFileSystem._strip_protocol(path)

    @classmethod
    def reset(cls) -> None:
        cls.bytes_read = 0
        cls.opens = 0


def register() -> None:
    """Make ``counting://`` URIs resolve to :class:`CountingFileSystem` (fresh instances)."""
    from ray_jobs import storage

    fsspec.register_implementation("counting", CountingFileSystem, clobber=True)
    storage._remote_fs.cache_clear()
