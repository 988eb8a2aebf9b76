"""Where the precompute job's files go: a local directory or any fsspec URL (s3://, gs://, ...).

One code path for both, through ``fsspec.core.url_to_fs``. A file appears whole or not at all,
because readers (a resuming job, a trainer streaming shards) must never see half of one:

- locally it is written to a temporary name next to its final name and renamed (the rename is
  atomic on POSIX);
- in an object store a single PUT (or a completed multipart upload) is atomic, so the bytes are
  staged in a local temporary file and uploaded only once finished. The upload is retried with
  exponential backoff and its stored size checked (recent botocore also checksums the body);
  a refusal (permission denied, no such bucket) is not retried, since asking again changes nothing.

Whatever still fails raises :class:`StorageError`, which names the URL and the last error, so the
job can record the shard as failed (and a rerun can redo it) instead of losing it silently.

Credentials and endpoints come from where each fsspec backend looks for them: for s3:// the
``AWS_*`` environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` for MinIO or any S3-compatible store, ...), ``~/.aws``, instance roles, and
fsspec's own configuration (``FSSPEC_S3_*`` variables, ``~/.config/fsspec/``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 3
UPLOAD_BACKOFF_S = 1.0  # waits 1 s, then 2 s, ... between attempts
# Refusals: the store answered, and asking again would get the same answer.
_PERMANENT_ERRORS = (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
# What fsspec backends read their credentials and endpoints from; Ray workers get the driver's.
STORAGE_ENV_PREFIXES = ("AWS_", "FSSPEC_", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_")
TEMPORARY_MARKER = ".tmp-"

T = TypeVar("T")


class StorageError(OSError):
    """A file could not be stored (even after retries) or read; the message names its URL and why."""


class OutputStore:
    """A directory of output files, local or remote, whose files each appear whole or not at all."""

    def __init__(self, url: str | os.PathLike) -> None:
        self.url = str(url).rstrip("/") or "/"
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)

    def __str__(self) -> str:
        return self.url

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def makedirs(self, *names: str) -> None:
        """Create the root and sub-directories ``names`` where directories exist (local paths).

        Object stores have no directories, and s3fs's ``makedirs`` would create a missing bucket:
        a typo in a bucket name must fail on the first write, not create a bucket.
        """
        if self.local:
            for path in [self.root, *(self._path(name) for name in names)]:
                self.fs.makedirs(path, exist_ok=True)

    @contextlib.contextmanager
    def create(self, name: str) -> Iterator[BinaryIO]:
        """A stream for a new file ``name`` (replacing any older one): it appears when the block
        ends without an error, else not at all. Raises :class:`StorageError` if storing fails."""
        final = self._path(name)
        staging = posixpath.dirname(final) if self.local else tempfile.gettempdir()
        temporary = os.path.join(staging, f".{posixpath.basename(final)}{TEMPORARY_MARKER}{os.getpid()}-"
                                          f"{secrets.token_hex(4)}")
        try:
            with open(temporary, "wb") as stream:
                yield stream
            with_retries(lambda: self._publish(temporary, final), self.url_of(name))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.create(name) as stream:
            stream.write(data)

    def read_bytes(self, name: str) -> bytes:
        """The bytes of ``name``; FileNotFoundError if it is absent, StorageError if it cannot be read."""
        try:
            return self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            raise
        except Exception as exc:  # backends raise their own types (botocore's are no OSError)
            raise StorageError(f"cannot read {self.url_of(name)}: {type(exc).__name__}: {exc}") from exc

    def listing(self) -> dict[str, int]:
        """Every file under the root, by name relative to it, with its size in bytes.

        One listing of the whole tree (an object store answers it in pages of 1000 names), so that
        a caller checking many files asks once instead of once per file. Fresh, not from fsspec's
        listing cache: other processes (the workers) write here. Raises :class:`StorageError` if the
        root cannot be listed; an absent root lists as empty.
        """
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as exc:  # backends raise their own types (botocore's are no OSError)
            raise StorageError(f"cannot list {self.url}: {type(exc).__name__}: {exc}") from exc
        prefix = f"{self.root.rstrip('/')}/"
        return {path[len(prefix):]: info["size"] for path, info in found.items() if path.startswith(prefix)}

    def read_many(self, names: list[str]) -> dict[str, bytes | None]:
        """The bytes of each of ``names``, or None for one that cannot be read (absent, or an error).

        In one call to the backend, which an object store's (s3fs) serves with concurrent requests:
        reading a thousand small files costs about as long as a few, not a thousand round trips.
        """
        if not names:
            return {}
        paths = {self._path(name): name for name in names}
        found = self.fs.cat(list(paths), on_error="return")
        return {paths[path]: data if isinstance(data, bytes) else None for path, data in found.items()}

    def remove_temporaries(self, *names: str) -> None:
        """Remove temporaries left in the root or sub-directories ``names`` by a killed run.

        Only local directories can hold any: remote files are staged on the writer's disk.
        """
        if self.local:
            for directory in ["", *names]:
                for stale in Path(self.root, directory).glob(f".*{TEMPORARY_MARKER}*"):
                    stale.unlink(missing_ok=True)

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _publish(self, temporary: str, final: str) -> None:
        if self.local:
            os.replace(temporary, final)
            return
        self.fs.put_file(temporary, final)
        expected, stored = os.path.getsize(temporary), self.fs.size(final)
        if stored != expected:
            raise OSError(f"the store holds {stored} bytes after uploading {expected}")


def with_retries(action: Callable[[], T], url: str, attempts: int = UPLOAD_ATTEMPTS,
                 backoff_s: float = UPLOAD_BACKOFF_S) -> T:
    """Run ``action`` (which stores ``url``) until it succeeds, at most ``attempts`` times.

    Any exception counts as a failed attempt, as storage backends raise their own types (botocore's
    connection errors are no ``OSError``), except refusals, which fail at once.
    """
    attempt = 1
    while True:
        try:
            return action()
        except Exception as exc:  # retried or reported, with its type
            if isinstance(exc, _PERMANENT_ERRORS) or attempt >= attempts:
                raise StorageError(f"cannot store {url} (attempt {attempt} of {attempts}): "
                                   f"{type(exc).__name__}: {exc}") from exc
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("storing %s failed (attempt %d of %d), retrying in %.1f s: %s: %s", url, attempt, attempts,
                        delay, type(exc).__name__, exc)
            time.sleep(delay)
            attempt += 1


def storage_env() -> dict[str, str]:
    """The storage settings of this process's environment (credentials, endpoints, fsspec config).

    Ray workers on a running cluster do not inherit the driver's environment: the precompute job
    hands them these, so that they write where, and as whom, the driver checked it could.
    """
    return {key: value for key, value in os.environ.items() if key.startswith(STORAGE_ENV_PREFIXES)}
