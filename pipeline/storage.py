"""Where the precompute job's files go: a local directory or any fsspec URL (s3://, gs://, ...).

One code path for both, through :func:`filesystem` (``fsspec.core.url_to_fs`` with svp's timeouts).
A file appears whole or not at all, because readers (a resuming job, a trainer streaming shards)
must never see half of one:

- locally it is written to a temporary name next to its final name and renamed (the rename is
  atomic on POSIX);
- in an object store a single PUT (or a completed multipart upload) is atomic, so the bytes are
  staged in a local temporary file and uploaded only once finished. The upload is retried with
  exponential backoff and its stored size checked (recent botocore also checksums the body);
  a refusal (permission denied, no such bucket) is not retried, since asking again changes nothing.

Every remote call has a deadline (:class:`StorageSettings`): a store that accepts a connection and
then never answers (stalled, half-open, black-holed) must become a failed attempt, not a job that
hangs forever. So does a shard streamed to a reader (:func:`open_url`): the time its reads wait for
the store is bounded as a whole. Whatever still fails raises :class:`StorageError`, which names the URL and the last
error, so the job can record the shard as failed (and a rerun can redo it) instead of losing it silently.

Credentials and endpoints come from where each fsspec backend looks for them: for s3:// the
``AWS_*`` environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` for MinIO or any S3-compatible store, ...), ``~/.aws``, instance roles, and
fsspec's own configuration (``FSSPEC_S3_*`` variables, ``~/.config/fsspec/``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import posixpath
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.exceptions import FSTimeoutError
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem
from fsspec.utils import get_protocol

from pipeline.errors import SvpError

log = logging.getLogger(__name__)

UPLOAD_BACKOFF_S = 1.0  # waits 1 s, then 2 s, ... between attempts
# Inside one attempt, botocore retries what it knows to be transient (throttling, a reset
# connection), with backoff; s3fs's own retry loop (5 tries by default) multiplies those.
# The attempt's deadline bounds both; these keep a fast-failing store from being asked 25 times.
BOTOCORE_RETRIES = {"max_attempts": 3, "mode": "standard"}
S3FS_TRIES = 2
_S3_PROTOCOLS = ("s3", "s3a")
_GCS_PROTOCOLS = ("gs", "gcs")
_AZURE_PROTOCOLS = ("az", "abfs", "abfss")
# How much of a streamed file one read asks the store for: large enough that a shard is a few
# requests, small enough that a reader that stops early has not fetched much more than it read.
STREAM_CHUNK_BYTES = 8 * 2**20
# Refusals: the store answered, and asking again would get the same answer.
_PERMANENT_ERRORS = (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
# What fsspec backends read their credentials and endpoints from, and svp's own storage settings;
# Ray workers get the driver's.
STORAGE_ENV_PREFIXES = ("AWS_", "FSSPEC_", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_", "SVP_STORAGE_")
TEMPORARY_MARKER = ".tmp-"

T = TypeVar("T")


class StorageError(SvpError, OSError):
    """A file could not be stored (even after retries) or read; the message names its URL and why.

    ``timed_out``: the last attempt got no answer in time, which is how a store that has stopped
    answering altogether looks, as opposed to one that answered with a refusal or an error."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class StoreNotAnswering(StorageError):
    """A store that several calls in a row got no answer from in time: a job stops sending it work."""

    def __init__(self, message: str) -> None:
        super().__init__(message, timed_out=True)


class StorageSettingsError(SvpError, ValueError):
    """An ``SVP_STORAGE_*`` variable that is not a positive number."""


@dataclass(frozen=True)
class StorageSettings:
    """How long a remote storage call may take; each can be set by the environment variable named
    in its field's metadata (read by :meth:`from_env`, handed to Ray workers with the other
    storage variables).

    Why each: the connect and read timeouts end a single request to a store that does not accept
    or stops answering (each backend's own: botocore's for s3, aiohttp's for gs, the Azure SDK's for
    az); the attempt deadline ends a whole call whatever the backend retries inside it, and grows
    with the bytes moved so that a large shard on a slow link is not cut short. The defaults bound a
    black-holed store to about a minute per call. ``stalled_shards``: after that many shards in a
    row whose upload got no answer in time, a job takes the store for not answering and stops,
    rather than spend its deadlines on every remaining shard.
    """

    connect_timeout_s: float = field(default=10.0, metadata={"env": "SVP_STORAGE_CONNECT_TIMEOUT"})
    read_timeout_s: float = field(default=30.0, metadata={"env": "SVP_STORAGE_READ_TIMEOUT"})
    attempt_timeout_s: float = field(default=60.0, metadata={"env": "SVP_STORAGE_ATTEMPT_TIMEOUT"})
    min_throughput_mb_s: float = field(default=1.0, metadata={"env": "SVP_STORAGE_MIN_THROUGHPUT"})
    attempts: int = field(default=3, metadata={"env": "SVP_STORAGE_ATTEMPTS"})
    stalled_shards: int = field(default=3, metadata={"env": "SVP_STORAGE_STALLED_SHARDS"})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StorageSettings:
        """The defaults, overridden by those of the ``SVP_STORAGE_*`` variables that are set.

        Raises :class:`StorageSettingsError` naming the variable if one is not a positive number.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for setting in fields(cls):
            name = setting.metadata["env"]
            if name in env:
                kind = type(setting.default)
                try:
                    values[setting.name] = kind(env[name])
                    if not values[setting.name] > 0:
                        raise ValueError
                except ValueError:
                    raise StorageSettingsError(f"{name} must be a positive {kind.__name__}, "
                                               f"got {env[name]!r}") from None
        return cls(**values)

    def deadline_s(self, nbytes: int = 0) -> float:
        """Seconds one attempt at a call moving ``nbytes`` may take."""
        return self.attempt_timeout_s + nbytes / (self.min_throughput_mb_s * 1e6)

    def backend_options(self, protocol: str) -> dict[str, Any]:
        """fsspec options giving a ``protocol`` filesystem the connect and read timeouts, in each
        backend's own terms (none known for other backends):

        - s3 (s3fs): botocore's ``connect_timeout`` and ``read_timeout``, and its bounded retries;
        - gs (gcsfs): ``requests_timeout``, which it hands to aiohttp with every request, as an
          ``aiohttp.ClientTimeout`` of the two (no total: a large upload may take longer than one read);
        - az (adlfs): the Azure SDK's ``connection_timeout`` and ``read_timeout``, whole seconds.
        """
        if protocol in _S3_PROTOCOLS:
            return {"config_kwargs": {"connect_timeout": self.connect_timeout_s, "read_timeout": self.read_timeout_s,
                                      "retries": BOTOCORE_RETRIES}}
        if protocol in _GCS_PROTOCOLS:
            import aiohttp  # gcsfs's HTTP client, installed wherever gcsfs is

            return {"requests_timeout": aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s,
                                                              sock_read=self.read_timeout_s)}
        if protocol in _AZURE_PROTOCOLS:
            return {"connection_timeout": math.ceil(self.connect_timeout_s),
                    "read_timeout": math.ceil(self.read_timeout_s)}
        return {}


def filesystem(url: str | os.PathLike, settings: StorageSettings | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem holding ``url`` and the path of ``url`` in it, with svp's timeouts.

    The one place svp makes a filesystem for a URL, so that every remote file it writes, reads or
    lists gets the same timeouts. fsspec caches the instance per options, so this is cheap to repeat.
    """
    settings = settings or StorageSettings.from_env()
    protocol = get_protocol(str(url))
    fs, path = fsspec.core.url_to_fs(str(url), **settings.backend_options(protocol))
    if protocol in _S3_PROTOCOLS:
        fs.retries = S3FS_TRIES  # a class attribute of s3fs, no constructor option
    return fs, path


def read_url(url: str | os.PathLike) -> bytes:
    """The bytes of the file at ``url`` (a local path or an fsspec URL), read within one deadline.

    FileNotFoundError if it is absent, :class:`StorageError` if it cannot be read in time.
    """
    settings = StorageSettings.from_env()
    fs, path = filesystem(url, settings)
    return _read(fs, path, str(url), settings)


def open_url(url: str | os.PathLike) -> IO[bytes]:
    """A binary stream of the file at ``url`` (a local path or an fsspec URL), read as it is consumed.

    The time its reads wait for the store is bounded as a whole, by one deadline for the file's size
    (:meth:`StorageSettings.deadline_s`): a store that stalls mid-file ends the read with a
    :class:`StorageError` naming the URL, not a reader that waits forever. Only the waiting counts,
    not the time between reads, which is the reader's (a training step between two samples).
    FileNotFoundError if it is absent.
    """
    settings = StorageSettings.from_env()
    fs, path = filesystem(url, settings)
    if not isinstance(fs, AsyncFileSystem):  # a local or in-memory file: no store to wait for
        return fs.open(path, "rb")
    return io.BufferedReader(_DeadlineReader(fs, path, str(url), settings), buffer_size=STREAM_CHUNK_BYTES)


def glob_urls(url: str) -> list[str]:
    """The URLs matching the glob ``url`` (an fsspec URL), sorted, listed within one deadline.

    Raises :class:`StorageError` if the store cannot be listed in time.
    """
    settings = StorageSettings.from_env()
    fs, pattern = filesystem(url, settings)
    try:
        paths = _within(fs, settings.deadline_s(), fs.glob, pattern)
    except Exception as exc:  # backends raise their own types (botocore's are no OSError)
        raise StorageError(f"cannot list {url}: {type(exc).__name__}: {exc}") from exc
    return [fs.unstrip_protocol(path) for path in sorted(paths)]


class OutputStore:
    """A directory of output files, local or remote, whose files each appear whole or not at all."""

    def __init__(self, url: str | os.PathLike, settings: StorageSettings | None = None) -> None:
        self.url = str(url).rstrip("/") or "/"
        self.settings = settings or StorageSettings.from_env()
        self.fs, self.root = filesystem(self.url, self.settings)
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
            with_retries(lambda: self._publish(temporary, final), self.url_of(name), self.settings.attempts)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.create(name) as stream:
            stream.write(data)

    def read_bytes(self, name: str) -> bytes:
        """The bytes of ``name``; FileNotFoundError if it is absent, StorageError if it cannot be read in time."""
        return _read(self.fs, self._path(name), self.url_of(name), self.settings)

    def listing(self) -> dict[str, int]:
        """Every file under the root, by name relative to it, with its size in bytes.

        One listing of the whole tree (an object store answers it in pages of 1000 names), so that
        a caller checking many files asks once instead of once per file. Fresh, not from fsspec's
        listing cache: other processes (the workers) write here. Raises :class:`StorageError` if the
        root cannot be listed in time; an absent root lists as empty.
        """
        self.fs.invalidate_cache(self.root)
        try:
            found = _within(self.fs, self.settings.deadline_s(), self.fs.find, self.root, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as exc:  # backends raise their own types (botocore's are no OSError)
            raise StorageError(f"cannot list {self.url}: {type(exc).__name__}: {exc}") from exc
        prefix = f"{self.root.rstrip('/')}/"
        return {path[len(prefix):]: info["size"] for path, info in found.items() if path.startswith(prefix)}

    def read_many(self, names: list[str], nbytes: int = 0) -> dict[str, bytes | None]:
        """The bytes of each of ``names``, or None for one that cannot be read (absent, or an error).

        In one call to the backend, which an object store's (s3fs) serves with concurrent requests:
        reading a thousand small files costs about as long as a few, not a thousand round trips.
        ``nbytes``, their total size if known (from :meth:`listing`), lengthens that call's deadline.
        Raises :class:`StorageError` if the call as a whole does not end in time.
        """
        if not names:
            return {}
        paths = {self._path(name): name for name in names}
        try:
            found = _within(self.fs, self.settings.deadline_s(nbytes), self.fs.cat, list(paths), on_error="return")
        except TimeoutError as exc:
            raise StorageError(f"cannot read {len(names)} files under {self.url}: {type(exc).__name__}: {exc}") \
                from exc
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
        expected = os.path.getsize(temporary)
        _within(self.fs, self.settings.deadline_s(expected), self.fs.put_file, temporary, final)
        stored = _within(self.fs, self.settings.deadline_s(), self.fs.size, final)
        if stored != expected:
            raise OSError(f"the store holds {stored} bytes after uploading {expected}")


class _DeadlineReader(io.RawIOBase):
    """A remote file read in ranges, whose waits for the store share one deadline.

    Each range is one ``cat_file`` call, cancelled by fsspec when it outlives what is left of the
    deadline (see :func:`_within`); the deadline is set from the file's size once that is known.
    """

    def __init__(self, fs: AbstractFileSystem, path: str, url: str, settings: StorageSettings) -> None:
        super().__init__()
        self.fs, self.path, self.url = fs, path, url
        self.waited, self.position, self.size = 0.0, 0, 0
        self.deadline = settings.deadline_s()
        self.size = self._waiting(fs.size, path)
        self.deadline = settings.deadline_s(self.size)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        end = min(self.position + len(buffer), self.size)
        if end <= self.position:
            return 0
        data = self._waiting(self.fs.cat_file, self.path, start=self.position, end=end)
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)

    def _waiting(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call`` on the store within what is left of the deadline; the time it took counts against it."""
        started = time.monotonic()
        try:  # never a timeout of 0, which fsspec reads as none
            return _within(self.fs, max(self.deadline - self.waited, 1e-3), call, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:  # backends raise their own types (botocore's are no OSError)
            raise StorageError(f"cannot read {self.url} (at byte {self.position} of {self.size}, "
                               f"{self.waited + time.monotonic() - started:.1f} s of {self.deadline:.1f} s waited): "
                               f"{type(exc).__name__}: {exc}", timed_out=_is_timeout(exc)) from exc
        finally:
            self.waited += time.monotonic() - started


def _read(fs: AbstractFileSystem, path: str, url: str, settings: StorageSettings) -> bytes:
    try:
        return _within(fs, settings.deadline_s(), fs.cat_file, path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # backends raise their own types (botocore's are no OSError)
        raise StorageError(f"cannot read {url}: {type(exc).__name__}: {exc}") from exc


def _within(fs: AbstractFileSystem, seconds: float, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, a method of ``fs``, ended with a TimeoutError after ``seconds``.

    fsspec runs an async backend's (s3fs, gcsfs, adlfs) calls on its event loop and cancels one that
    outlives its ``timeout``, whatever the backend was retrying inside it: a stalled store becomes
    a failed attempt. Other backends (local files, memory) take no such argument and run as they are.
    """
    if not isinstance(fs, AsyncFileSystem):
        return call(*args, **kwargs)
    try:
        return call(*args, timeout=seconds, **kwargs)
    except FSTimeoutError as exc:
        raise TimeoutError(f"no answer within {round(seconds, 1):g} s (see SVP_STORAGE_ATTEMPT_TIMEOUT)") from exc


def with_retries(action: Callable[[], T], url: str, attempts: int, backoff_s: float = UPLOAD_BACKOFF_S) -> T:
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
                                   f"{type(exc).__name__}: {exc}", timed_out=_is_timeout(exc)) from exc
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("storing %s failed (attempt %d of %d), retrying in %.1f s: %s: %s", url, attempt, attempts,
                        delay, type(exc).__name__, exc)
            time.sleep(delay)
            attempt += 1


def _is_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` says the store gave no answer in time: svp's own deadline (a TimeoutError, as
    aiohttp's are too), or a backend's request timeout, a type of each backend's own that is no
    TimeoutError (botocore's ``ReadTimeoutError``, ``ConnectTimeoutError``), hence the name."""
    return isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__


def storage_env() -> dict[str, str]:
    """The storage settings of this process's environment (credentials, endpoints, fsspec config, timeouts).

    Ray workers on a running cluster do not inherit the driver's environment: the precompute job
    hands them these, so that they write where, and as whom, the driver checked it could, and give
    up on a stalled store when it would.
    """
    return {key: value for key, value in os.environ.items() if key.startswith(STORAGE_ENV_PREFIXES)}
