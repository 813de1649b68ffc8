"""Shard sets on object storage: their samples' bytes, a disk cache all processes of a node share,
and a prefetcher that follows the loader's order.

Where each part lives, and why:
- `SampleCache`: one file per sample on local disk, under the set's mirror in data.cache_dir,
  written atomically (a temporary name, then a rename). Every process of a node reads what any of
  them fetched: each rank's main process and its DataLoader workers, which are separate processes
  holding their own copies of the dataset; a file system is what they share without locks, memory
  segments or a server. It is bounded by data.cache_gb: the files touched longest ago go first, and
  the prefetcher touches the samples the next steps need, so they are the last to go (a touch
  while an eviction is under way counts too: a sample is moved aside, then deleted only if it was
  not touched since the eviction looked); with the cache at least twice the job's prefetch window
  (checked when the loader is made), eviction never reaches them.
- `RemoteShards` (one per shard set and process): a sample comes from that cache, else from a
  byte-range request pinned to the object as it was listed when the set was opened. The samples
  wanted together (a micro-batch, a prefetch window) go out as parallel requests, grouped per shard,
  neighbours coalesced into one request.
- `Prefetcher` (one per rank: a thread in the rank's main process, started and stopped by each
  iteration of SodaDataLoader over a mixture with a set on object storage; never for local sets).
  Only there is the order known: the loader's position (consumed_samples) and batch shape, and
  from them every sample of the steps to come (GlobalBatchSampler, then MixtureDataset.locate). It
  fetches data.prefetch_steps steps beyond what the DataLoader's workers already asked for into the
  cache. A worker that asks for a sample first fetches it itself, so correctness never depends on
  the prefetcher, only speed; and it walks its own copy of the order, so the order,
  consumed_samples, resume and DP changes are exactly what they are without it.

Bytes from the cache get exactly the checks bytes from the store get (ShardSet's); a cached copy
that fails them is dropped and read again from the store, so a bad local disk is never blamed on
the object, nor hidden.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
import weakref
from collections import defaultdict
from concurrent.futures import Future, wait
from pathlib import Path

from megatron_soda.config import ConfigError
from megatron_soda.tokenization.object_store import Cancelled, DaemonPool, ObjectInfo, RemoteFile
from megatron_soda.tokenization.shard_format import sample_span

log = logging.getLogger("soda")

GB = 10**9
MAX_GAP = 1 << 20  # neighbours closer than this share a request: 1 MB read costs about one request's latency
MAX_RANGE = 8 << 20  # at most this much per request, so a long run of one shard still goes out in parallel
REQUESTS = 16  # range requests in flight per process
EVICT_EVERY = 0.05  # share of the budget one process writes between two looks at the cache's size


# --- the disk cache -----------------------------------------------------------------------------


class SampleCache:
    """Sample files under `root` (data.cache_dir), `budget` bytes at most (give or take what each
    process writes between two evictions: EVICT_EVERY of it)."""

    def __init__(self, root: Path, budget: int) -> None:
        self.root, self.budget = root, budget
        self._written = 0
        self._pid, self._lock = os.getpid(), threading.Lock()
        self._warned = False

    def _count(self, n: int) -> bool:
        """Count bytes written; True when it is time to look at the cache's size."""
        if self._pid != os.getpid():  # forked: the parent's lock may have been held at the fork
            self._pid, self._lock, self._written = os.getpid(), threading.Lock(), 0
        with self._lock:
            self._written += n
            if self._written < self.budget * EVICT_EVERY:
                return False
            self._written = 0
            return True

    def get(self, path: Path) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def touch(self, path: Path) -> bool:
        """Mark a sample as wanted soon (evicted last); False when it is not cached."""
        now = time.time_ns()  # the fine clock: a touch is newer than the scan of an eviction under way
        try:
            os.utime(path, ns=(now, now))
            return True
        except FileNotFoundError:
            return False
        except OSError as e:  # a cache shared with another user, a read-only disk: only speed is lost
            self._warn(e)
            return False

    def _warn(self, e: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("data cache %s: %s; reading on without caching there", self.root, e)

    def put(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:  # a full or read-only disk: the cache only speeds reads up; reading goes on
            tmp.unlink(missing_ok=True)
            self._warn(e)
            return
        if self._count(len(data)):
            try:
                self.evict()
            except OSError as e:  # likewise: the sample read is good whatever eviction met
                self._warn(e)

    def drop(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def size(self) -> tuple[int, list[tuple[int, int, str]]]:
        """(bytes held, [(mtime_ns, bytes, path)] of every cached sample)."""
        files, total = [], 0
        for folder in self.root.glob("*/samples/*"):
            for e in os.scandir(folder):
                if e.name.startswith("."):  # being written
                    continue
                try:
                    st = e.stat()
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
                files.append((st.st_mtime_ns, st.st_size, e.path))
                total += st.st_size
        return total, files

    def evict(self) -> None:
        """Down to 90% of the budget, least recently touched first; one process at a time (the
        others carry on: their next look comes soon enough)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".evict.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            total, files = self.size()
            if total <= self.budget:
                return
            files.sort()
            for seen, size, path in files:
                if total <= 0.9 * self.budget:
                    break
                if self._remove(path, seen):
                    total -= size

    @staticmethod
    def _remove(path: str, seen: int) -> bool:
        """Delete a sample unless it was touched after the scan saw it (mtime `seen`): the
        prefetcher may touch it at any moment, so it is moved aside first (a touch after that finds
        it gone and fetches it again) and put back when its time says it was touched meanwhile.
        False: kept."""
        aside = os.path.join(os.path.dirname(path), f".evict-{os.getpid()}-{os.path.basename(path)}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:  # evicted by another process meanwhile
            return True
        try:
            if os.stat(aside).st_mtime_ns <= seen:
                return True
            try:
                os.link(aside, path)  # back in place, unless fetched again meanwhile
            except FileExistsError:
                pass
            return False
        finally:
            os.unlink(aside)


# --- this process's requests --------------------------------------------------------------------

_POOL: dict[int, DaemonPool] = {}  # by pid: a forked DataLoader worker starts its own
_POOL_LOCK = threading.Lock()


def _reset_after_fork() -> None:
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()  # a thread of the parent may have held it at the fork


os.register_at_fork(after_in_child=_reset_after_fork)


def _pool() -> DaemonPool:
    pid = os.getpid()
    with _POOL_LOCK:
        if pid not in _POOL:
            _POOL.clear()
            _POOL[pid] = DaemonPool(REQUESTS)
        return _POOL[pid]


class _Process:
    """What one process holds for a remote set: its open objects, its requests in flight, the
    samples fetched for the micro-batch being read."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[int, RemoteFile] = {}
        self.inflight: dict[tuple[int, int], Future] = {}
        self.fresh: dict[tuple[int, int], Future] = {}
        self.stats = {"requests": 0, "bytes": 0, "samples": 0, "cache_hits": 0}  # this process's


def _done(value) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


class RemoteShards:
    """The sample bytes of one shard set on object storage (shard, sample -> bytes of its span)."""

    def __init__(
        self,
        shards: list[dict],
        objects: dict[str, ObjectInfo],
        header_bytes: int,
        data_bytes: int,
        mirror: Path,
        cache: SampleCache | None,
    ) -> None:
        self.shards = shards
        self.infos = [objects[r["file"]] for r in shards]
        self.header_bytes, self.data_bytes = header_bytes, data_bytes
        self.cache = cache
        # a folder per shard and object version: a rewritten object never reads the old one's samples
        self._dirs = [
            mirror / "samples" / f"{Path(r['file']).stem}.{hashlib.sha1(str(i.tag).encode()).hexdigest()[:8]}"
            for r, i in zip(shards, self.infos, strict=True)
        ]
        self._pid, self._state = os.getpid(), _Process()

    def stats(self) -> dict[str, int]:
        """This process's range requests, bytes and samples they read, and cache hits."""
        return dict(self._proc().stats)

    @property
    def sample_bytes(self) -> int:
        return sample_span(self.shards[0], 0, self.header_bytes, self.data_bytes).length

    def _proc(self) -> _Process:
        if self._pid != os.getpid():  # forked into a DataLoader worker: nothing of the parent's is usable
            self._pid, self._state = os.getpid(), _Process()
        return self._state

    def path(self, shard: int, j: int) -> Path:
        return self._dirs[shard] / str(j)

    def _file(self, st: _Process, shard: int) -> RemoteFile:
        f = st.files.get(shard)
        if f is None:
            f = st.files[shard] = RemoteFile(self.infos[shard])  # a race opens it twice: harmless
        return f

    def fetch(
        self,
        wants: list[tuple[int, int]],
        prefetch: bool = False,
        stop: threading.Event | None = None,
        jobs: list[Future] | None = None,
    ) -> dict[tuple[int, int], Future]:
        """Futures of (bytes, from the cache?) for these samples: from the cache, from a request
        already in flight in this process, or from new requests (parallel, grouped per shard,
        neighbours coalesced). `prefetch`: only fill the cache (what is there is touched instead);
        `stop` set: requests not yet sent are not sent; `jobs` collects the requests' futures."""
        st = self._proc()
        out: dict[tuple[int, int], Future] = {}
        todo: dict[int, list[int]] = defaultdict(list)
        with st.lock:
            for w in dict.fromkeys(wants):
                fut = st.inflight.get(w)
                if fut is not None:
                    out[w] = fut
                    continue
                if self.cache is not None:
                    if prefetch:
                        if self.cache.touch(self.path(*w)):
                            continue
                    elif (data := self.cache.get(self.path(*w))) is not None:
                        out[w] = _done((data, True))
                        st.stats["cache_hits"] += 1
                        continue
                out[w] = st.inflight[w] = Future()
                todo[w[0]].append(w[1])
        for shard, js in todo.items():
            for start, end, members in self._coalesce(shard, sorted(js)):
                job = _pool().submit(self._fetch_range, st, shard, start, end, members, stop)
                if jobs is not None:
                    jobs.append(job)
        return out

    def _coalesce(self, shard: int, js: list[int]) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
        """Runs of samples of one shard read as one request: (start, end, [(j, offset, length)])."""
        rec, runs = self.shards[shard], []
        for j in js:
            span = sample_span(rec, j, self.header_bytes, self.data_bytes)
            end = span.start + span.length
            if runs and span.start - runs[-1][1] <= MAX_GAP and end - runs[-1][0] <= MAX_RANGE:
                runs[-1][1] = end
                runs[-1][2].append((j, span.start, span.length))
            else:
                runs.append([span.start, end, [(j, span.start, span.length)]])
        return [(s, e, [(j, a - s, n) for j, a, n in m]) for s, e, m in runs]

    def _fetch_range(self, st: _Process, shard: int, start: int, end: int, members: list, stop) -> None:
        futures = [st.inflight[(shard, j)] for j, _, _ in members]
        try:
            if stop is not None and stop.is_set():
                raise Cancelled(self.infos[shard].url)
            data = self._file(st, shard).read(start, end, stop)
            pieces = [data[off : off + n] for _, off, n in members]
            with st.lock:
                st.stats["requests"] += 1
                st.stats["bytes"] += len(data)
                st.stats["samples"] += len(members)
            if self.cache is not None:
                for (j, _, n), piece in zip(members, pieces, strict=True):
                    if len(piece) == n:  # a short read is the reader's to report, not the cache's to keep
                        self.cache.put(self.path(shard, j), piece)
        except BaseException as e:  # whoever waits for these samples gets the error (never a hang)
            results = None
            error = e
        else:
            results = pieces
        with st.lock:  # out of flight only once cached: a request meanwhile finds it in one or the other
            for j, _, _ in members:
                st.inflight.pop((shard, j), None)
        for i, fut in enumerate(futures):
            if results is None:
                fut.set_exception(error)
            else:
                fut.set_result((results[i], False))

    # what ShardSet calls, one micro-batch at a time

    def want(self, wants: list[tuple[int, int]]) -> None:
        """The samples about to be read: requested together (read them with `take`)."""
        st = self._proc()
        st.fresh = self.fetch(wants)

    def take(self, shard: int, j: int) -> tuple[bytes, bool]:
        """A sample's bytes and whether they came from the cache."""
        fut = self._proc().fresh.pop((shard, j), None) or self.fetch([(shard, j)])[(shard, j)]
        try:
            return fut.result()
        except Cancelled:  # a prefetch's request, given up as the prefetcher closed
            return self.read_now(shard, j), False

    def read_now(self, shard: int, j: int) -> bytes:
        """From the store, past the cache (a cached copy failed its checks)."""
        span = sample_span(self.shards[shard], j, self.header_bytes, self.data_bytes)
        return self._file(self._proc(), shard).read(span.start, span.start + span.length)

    def drop(self, shard: int, j: int) -> None:
        if self.cache is not None:
            self.cache.drop(self.path(shard, j))


# --- the prefetcher -----------------------------------------------------------------------------


class Prefetcher:
    """Reads this rank's samples ahead of the consumer into the cache, in the loader's order.

    `sampler`: the rank's GlobalBatchSampler (micro-batches of global indices from consumed_samples
    on); a fresh iteration of it is walked here, the loader's own is not touched. `lead`: samples
    the DataLoader's workers already request ahead (num_workers x prefetch_factor x micro batch):
    they fetch those themselves, and the `steps` steps after them are prefetched, so the two never
    ask for the same sample while the prefetcher keeps ahead. The consumer reports its progress
    (`advance`); a prefetcher that fell behind it (a slow store, a busy CPU) skips what the
    consumer and the workers have already passed instead of fetching or touching it, which would
    only age the samples still to come in the cache's eyes."""

    def __init__(self, dataset, sampler, steps: int, lead: int = 0) -> None:
        self.dataset = dataset
        self.ahead = lead + steps * (sampler.gbs // sampler.dp)
        self._round = max(1, (self.ahead - lead) // 2)  # half the steps' window at a time
        self._lead = lead
        self._order = iter(sampler)
        self._consumed = self._queued = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._jobs: list[Future] = []  # its requests not known to be done
        self.error: BaseException | None = None
        self.fetched = 0  # samples it asked the store for (what the loader's `prefetched` counts)
        self.found = 0  # samples of its window already in the cache (touched, not fetched)
        self.covered = 0  # samples of the order from the start that it has handled: fetched, touched or skipped
        self._thread = threading.Thread(target=self._run, name="soda-prefetch", daemon=True)
        self._thread.start()

    def advance(self, samples: int) -> None:
        """The consumer has read `samples` more samples of the order."""
        if self.error is not None:  # a bug of the prefetcher's surfaces in the loop, with its traceback
            raise self.error
        with self._cond:
            self._consumed += samples
            self._cond.notify()

    def close(self) -> None:
        """Stop; returns once no request of its is running (those not sent yet are dropped), so
        nothing writes into the cache after it."""
        self._stop.set()
        with self._cond:
            self._cond.notify()
        self._thread.join(timeout=30)
        wait(self._jobs, timeout=30)

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        sets = self.dataset.sets
        try:
            while True:
                with self._cond:  # refilled half a window at a time: a round's samples coalesce better
                    while not self._stop.is_set() and self._consumed + self.ahead - self._queued < self._round:
                        self._cond.wait()
                    consumed = self._consumed
                if self._stop.is_set():
                    return
                while self._queued < consumed + self._lead:  # read, or asked for by the workers already
                    self._queued += len(next(self._order))
                room = consumed + self.ahead - self._queued
                batch: list[int] = []
                while len(batch) < room:
                    batch += next(self._order)
                self._queued += len(batch)
                wants: dict[int, list[tuple[int, int]]] = defaultdict(list)
                for g in batch:
                    d, k = self.dataset.locate(g)
                    if sets[d].remote is not None:
                        wants[d].append(sets[d].locate(k))
                self._jobs = [j for j in self._jobs if not j.done()]
                for d, w in wants.items():  # the requests go out; not awaited
                    asked = sets[d].remote.fetch(w, prefetch=True, stop=self._stop, jobs=self._jobs)
                    self.fetched += len(asked)
                    self.found += len(dict.fromkeys(w)) - len(asked)
                self.covered = self._queued
        except BaseException as e:
            self.error = e
            log.warning("data prefetcher stopped: %r", e)


_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # dataset -> its running prefetcher


def prefetch_wanted(dataset, sampler, lead: int = 0) -> bool:
    """Whether a prefetcher would run for `sampler`'s order: a set on object storage with a cache
    (data.cache_gb > 0) and data.prefetch_steps > 0. Raises the one-line ConfigError when the cache
    holds less than twice what the whole job prefetches (its eviction would reach the next steps'
    samples): what the loader checks when it is made, before a step is run."""
    remotes = [s.remote for s in dataset.sets if s.remote is not None and s.remote.cache is not None]
    steps = dataset.cfg.prefetch_steps
    if not remotes or steps <= 0:
        return False
    window = (lead + steps * (sampler.gbs // sampler.dp)) * sampler.dp  # samples, all ranks of the job
    need = 2 * window * max(r.sample_bytes for r in remotes)
    budget = remotes[0].cache.budget
    if need > budget:
        raise ConfigError(
            f"data.cache_gb {budget / GB:g} holds less than twice the samples data.prefetch_steps {steps} "
            f"fetches ahead for the whole job ({need / GB:.3g} GB): raise data.cache_gb or lower data.prefetch_steps"
        )
    return True


def start_prefetch(dataset, sampler, lead: int = 0) -> Prefetcher | None:
    """The rank's prefetcher for `sampler`'s order (data.prefetch_steps steps beyond `lead`
    samples), or None: no set on object storage, prefetch_steps 0, no cache (data.cache_gb 0), or
    a prefetcher of this dataset already running (the loader's own: one per rank is enough)."""
    running = _ACTIVE.get(dataset)
    if not prefetch_wanted(dataset, sampler, lead) or (running is not None and not running.closed):
        return None
    _ACTIVE[dataset] = prefetcher = Prefetcher(dataset, sampler, dataset.cfg.prefetch_steps, lead)
    return prefetcher
