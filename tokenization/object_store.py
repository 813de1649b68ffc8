"""Object storage (s3://, gs://, hf://) through fsspec: the one place that tells a URL from a path.

fsspec gives every store one API (s3fs, gcsfs and huggingface_hub's filesystem behind it); what it
does not give is one policy for failure, which a training run needs. Here a timeout, a dropped
connection or a 5xx is retried with backoff for up to RETRY_SECONDS and then is one line naming the
object (`ObjectUnreachable`); a missing object, a refused credential or an object rewritten since
the set was opened is never retried (waiting cannot fix it) and is one line as well. An error that
is neither (not an OSError, not a known transport error) is a bug and keeps its traceback.

Reads of a shard are pinned to the object as it was listed when its set was opened (its size and
ETag / generation / blob id): s3fs sends that ETag as If-Match with every range request, so a
rewritten object fails the request instead of mixing old and new bytes (`ObjectChanged`). gcsfs and
huggingface_hub's filesystem send no such precondition: there the size and tag are compared when
each process opens the object (`RemoteFile`), and later requests read the current generation, or
the revision the hf:// URL names (nothing is resolved to a commit here: name one, `@SHA`, to pin).
A rewrite after the open is then the sample checks' to catch (the shards' CRC-32 sidecars).

Credentials are each client's own (environment variables, config files, instance roles: boto's,
google-auth's, huggingface_hub's): nothing here reads, passes or prints one, and a URL that carries
one is refused, because URLs are saved in a run's config.yaml.

Heavy libraries (fsspec and the store's client) are imported on first use, never at import time.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from megatron_soda.config import UserError

log = logging.getLogger("soda")
T = TypeVar("T")
A = TypeVar("A")

# scheme -> (the library fsspec needs for it, the extra of this package that installs it)
STORES = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "hf": ("huggingface_hub", None)}
WRITABLE = ("s3", "gs", "gcs")  # hf:// writes are commits to a repository: not what `soda prepare` does
RETRY_SECONDS = 120.0  # how long a transient failure is retried before it is an error
_TRANSIENT_ERRNOS = {
    errno.EIO,  # s3fs: an unmapped error response
    getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs: 500 InternalError
    errno.EBUSY,  # s3fs: 503 ServiceUnavailable / SlowDown
    errno.EAGAIN,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
}
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


class ObjectStoreError(UserError, RuntimeError):
    """An object that cannot be read or written as asked (one line naming it)."""


class ObjectMissing(ObjectStoreError):
    """No such object (or bucket)."""


class ObjectDenied(ObjectStoreError):
    """The store refused the credentials it was given."""


class ObjectChanged(ObjectStoreError):
    """The object was rewritten since its set was opened: its bytes are not the ones indexed."""


class ObjectUnreachable(ObjectStoreError):
    """Transient failures (timeouts, lost connections, 5xx) outlasted RETRY_SECONDS of retries."""


class Cancelled(Exception):
    """A retry given up because its caller stopped waiting (a prefetch no longer wanted)."""


# --- URLs ---------------------------------------------------------------------------------------


def is_url(path: str | os.PathLike) -> bool:
    """A `scheme://...` string (every URL is one; no local path of ours contains `://`)."""
    return isinstance(path, str) and "://" in path


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


def check_url(url: str, write: bool = False) -> str:
    """The scheme of a URL this project reads (or writes); a one-line error for any other."""
    scheme, _, rest = url.partition("://")
    if scheme not in STORES:
        raise ObjectStoreError(f"{url}: unsupported URL scheme {scheme}:// (expected s3://, gs://, hf:// or a path)")
    if write and scheme not in WRITABLE:
        raise ObjectStoreError(
            f"{url}: {scheme}:// cannot be written here (s3:// and gs:// can): write locally, then upload "
            "(for the Hub: huggingface-cli upload --repo-type dataset)"
        )
    if "@" in rest.split("/", 1)[0] or ":" in rest.split("/", 1)[0]:
        raise ObjectStoreError(
            f"{scheme}://...: a URL carrying credentials is refused (URLs are saved in config.yaml); "
            "give them the way the store's client reads them (environment, config file, instance role)"
        )
    return scheme


def filesystem(url: str):
    """(fsspec filesystem, path within it) for a URL; fsspec keeps one instance per process and
    options, and makes a new one in a forked process (a DataLoader worker)."""
    scheme = check_url(url)
    _quiet_clients()
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError:
        lib, extra = STORES[scheme]
        how = f"pip install 'megatron-soda[{extra}]'" if extra else f"pip install {lib}"
        raise ObjectStoreError(f"{url}: {scheme}:// needs {lib}, which is not installed: {how}") from None


def _quiet_clients() -> None:
    """The clients' own INFO lines ("Found credentials in environment variables") stay out of the
    run's log: where credentials come from is the user's business, and nothing of theirs is logged."""
    for name in ("botocore", "aiobotocore", "s3fs", "gcsfs", "fsspec", "google.auth"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def mirror_dir(url: str, index_bytes: bytes, cache_dir: str = "") -> Path:
    """Where a remote set's small files (index, checksum sidecars, tokenizer) and cached samples
    live on this machine: named by the URL and the index's bytes, so a set prepared again under
    the same URL never reads another version's cache."""
    key = hashlib.sha256(url.encode() + b"\n" + index_bytes).hexdigest()[:16]
    return cache_root(cache_dir) / f"{url.rstrip('/').rsplit('/', 1)[-1]}-{key}"


def cache_root(cache_dir: str = "") -> Path:
    """`data.cache_dir`, or a folder of this user's in the temp dir."""
    return Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / f"soda-cache-{os.getuid()}"


# --- failure policy -----------------------------------------------------------------------------


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The connection and timeout errors of the client libraries already imported (an error of a
    library not imported cannot have been raised)."""
    names = {
        "botocore.exceptions": (
            "EndpointConnectionError",
            "ConnectionClosedError",
            "ReadTimeoutError",
            "ConnectTimeoutError",
            "HTTPClientError",
            "ResponseStreamingError",
        ),
        "aiohttp": ("ClientConnectionError", "ClientPayloadError", "ServerTimeoutError"),
        "httpx": ("TransportError",),
        "requests.exceptions": ("ConnectionError", "Timeout", "ChunkedEncodingError"),
    }
    found = []
    for module, classes in names.items():
        mod = sys.modules.get(module)
        found += [getattr(mod, c) for c in classes if mod is not None and hasattr(mod, c)]
    return tuple(found)


def classify(error: BaseException) -> str | None:
    """ "missing", "denied", "changed", "transient", "refused" (another OSError: one line, not
    retried) or None (not a store error: a bug)."""
    if type(error).__name__ == "FileExpired":  # s3fs / gcsfs: the If-Match precondition failed
        return "changed"
    if isinstance(error, FileNotFoundError):
        return "missing"
    if isinstance(error, PermissionError):
        return "denied"
    if isinstance(error, TimeoutError | ConnectionError):  # socket / asyncio / fsspec timeouts, resets
        return "transient"
    if isinstance(error, _transport_errors()):
        return "transient"
    status = getattr(getattr(error, "response", None), "status_code", None)  # huggingface_hub's HTTP errors
    if status in _TRANSIENT_STATUS:
        return "transient"
    if isinstance(error, OSError):
        return "transient" if error.errno in _TRANSIENT_ERRNOS else "refused"
    return None


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:200]}"


def retrying(url: str, op: Callable[[], T], stop: threading.Event | None = None) -> T:
    """`op()`, retried with exponential backoff (0.5 s doubling to 10 s) while it fails
    transiently, for up to RETRY_SECONDS; every other failure of the store at once, as one line
    naming `url`. `stop` set: a retry is abandoned (`Cancelled`)."""
    deadline = time.monotonic() + RETRY_SECONDS
    delay, attempt = 0.5, 0
    while True:
        try:
            return op()
        except Exception as e:
            kind = classify(e)
            if kind is None:
                raise
            if kind == "missing":
                raise ObjectMissing(f"{url}: no such object (or bucket)") from e
            if kind == "denied":
                raise ObjectDenied(
                    f"{url}: access denied ({_short(e)}); check the credentials the store's client reads"
                ) from e
            if kind == "changed":
                raise ObjectChanged(f"{url}: the object changed since its set was opened (its ETag differs)") from e
            if kind == "refused":
                raise ObjectStoreError(f"{url}: {_short(e)}") from e
            attempt += 1
            if time.monotonic() + delay > deadline:
                raise ObjectUnreachable(
                    f"{url}: still failing after {attempt} attempts over {RETRY_SECONDS:g} s ({_short(e)})"
                ) from e
            if attempt == 1:
                log.warning("%s: %s; retrying for up to %.0f s", url, _short(e), RETRY_SECONDS)
            if stop is not None:
                if stop.wait(delay):
                    raise Cancelled(url) from e
            else:
                time.sleep(delay)
            delay = min(2 * delay, 10.0)


# --- objects ------------------------------------------------------------------------------------

_TAG_KEYS = ("ETag", "generation", "etag", "blob_id")  # s3; gcs; gcs; hf: what a rewrite changes


def _tag(details: dict) -> str | None:
    for key in _TAG_KEYS:
        if details.get(key):
            return str(details[key])
    return None


@dataclass(frozen=True)
class ObjectInfo:
    """An object as listed: what its reads are pinned to."""

    url: str
    size: int
    tag: str | None


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return retrying(url, lambda: fs.cat_file(path))


def list_dir(url: str) -> dict[str, ObjectInfo]:
    """The objects directly under `url`, by name, as the store lists them now (one request per
    1,000 objects on S3: sizes and ETags of a whole set at once)."""
    fs, path = filesystem(url)

    def ls():
        fs.invalidate_cache(path)  # fresh: a listing cached by an earlier open would hide a rewrite
        try:
            return fs.ls(path, detail=True)
        except FileNotFoundError:
            return []

    entries = retrying(url, ls)
    out = {}
    for e in entries:
        if e.get("type", "file") == "file":
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            out[name] = ObjectInfo(join(url, name), int(e["size"]), _tag(e))
    return out


class RemoteFile:
    """One object opened in this process, its reads pinned to the `ObjectInfo` it was listed with."""

    def __init__(self, info: ObjectInfo) -> None:
        self.info = info
        fs, path = filesystem(info.url)
        # cache_type none: every read is exactly one range request, nothing kept in memory
        self._f = retrying(info.url, lambda: fs.open(path, "rb", cache_type="none"))
        size, tag = self._f.size, _tag(self._f.details)
        if size != info.size or (info.tag and tag and tag != info.tag):
            raise ObjectChanged(
                f"{info.url}: changed since its set was opened ({info.size} bytes, tag {info.tag} then; "
                f"{size} bytes, tag {tag} now)"
            )

    def read(self, start: int, end: int, stop: threading.Event | None = None) -> bytes:
        """Bytes [start, end), one range request (retried as `retrying` says)."""
        return retrying(self.info.url, lambda: self._f._fetch_range(start, end), stop)


def upload_file(local: Path, url: str) -> None:
    """One file to one object: the object appears whole or not at all (S3 and GCS PUTs are atomic)."""
    fs, path = filesystem(url)
    retrying(url, lambda: fs.put_file(str(local), path))


def download_dir(url: str, local: Path) -> None:
    """A folder of objects (a tokenizer) into `local`, made whole before it appears there."""
    fs, path = filesystem(url)
    tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    retrying(url, lambda: fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True))
    try:
        os.replace(tmp, local)
    except OSError:  # another process placed it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


# --- concurrency --------------------------------------------------------------------------------


class DaemonPool:
    """A few daemon threads running range requests: unlike concurrent.futures' pool, a request
    stuck in its retries never holds up its process's exit (a DataLoader worker's, a rank's)."""

    def __init__(self, threads: int) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = threads
        for i in range(threads):
            threading.Thread(target=self._work, name=f"soda-store-{i}", daemon=True).start()

    def close(self) -> None:
        """The threads end once the jobs already submitted are done."""
        for _ in range(self._threads):
            self._jobs.put(None)

    def submit(self, fn: Callable[..., T], *args) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits on the future
                fut.set_exception(e)


def map_concurrently(fn: Callable[[A], T], items: list[A], threads: int = 16) -> list[T]:
    """fn over items, `threads` at a time (small objects: checksum sidecars), in order."""
    if len(items) <= 1:
        return [fn(i) for i in items]
    pool = DaemonPool(min(threads, len(items)))
    try:
        return [f.result() for f in [pool.submit(fn, i) for i in items]]
    finally:
        pool.close()
