"""Shard sets on object storage, against a real S3 API: moto's server on localhost, started and
stopped here, reached by s3fs and boto3 through the standard environment (AWS_ENDPOINT_URL_S3 and
a key pair), as a user's run reaches a bucket.

What must hold: a run from the bucket is the run from local disk, bitwise on CPU, through a resume
under another DP degree and a few seconds with the server down; every fault (a tampered, rewritten,
truncated or missing object, a store that stays down, a missing client library) is one line naming
the object; the cache stays within its budget and keeps what the next steps need; `soda prepare
--output s3://` uploads the index last and a re-run uploads only what is missing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_soda.cli import main
from megatron_soda.config import ConfigError, DataConfig
from megatron_soda.data.shard_set import ShardReadError, ShardSet
from megatron_soda.tokenization import object_store
from megatron_soda.tokenization.object_store import ObjectStoreError, ObjectUnreachable
from tests.conftest import prepare_config
from tests.launch import SMALL, metrics, run_train, train_cmd
from tests.launch import env as train_env

BUCKET = "soda-test-shards"
KEY_ID, SECRET = "AKIASODATESTKEY00001", "soda-test-secret-never-in-a-run-dir"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server, reached through a TCP proxy that `stop` kills and `start` brings back.

    A killed server process resets its connections and refuses new ones; stopping moto's threaded
    server in this process would not (its threads go on answering on open keep-alive connections),
    and restarting a killed moto process would lose its objects. So the server runs throughout,
    its objects kept, and the outage is the proxy's: every connection reset, the port refusing."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        self.moto_port, self.port = _free_port(), _free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port, verbose=False)
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)  # shutdown first: a close alone leaves the blocked accept() listening
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            _close(c)

    @property
    def stopped(self) -> bool:
        return self._listener is None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: the outage began
                return
            upstream = socket.create_connection(("127.0.0.1", self.moto_port))
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns -= {a, b}
            _close(a)
            _close(b)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture(scope="module")
def s3():
    """The server, the environment every client here and in the runs reads, and the bucket.
    AWS_MAX_ATTEMPTS=1: botocore's own retries off, so every retry the tests see is ours."""
    import boto3
    import fsspec

    server = S3Server()
    server.moto.start()
    server.start()
    names = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL_S3",
        "AWS_MAX_ATTEMPTS",
    )
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(
        AWS_ACCESS_KEY_ID=KEY_ID,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{server.port}",
        AWS_MAX_ATTEMPTS="1",
    )
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield server, client
    finally:
        server.stop()
        server.moto.stop()
        fsspec.filesystem("s3").clear_instance_cache()  # an instance bound to the stopped server
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _upload(local: Path, prefix: str) -> str:
    fs, _ = object_store.filesystem(f"s3://{BUCKET}")
    fs.put(str(local) + "/", f"{BUCKET}/{prefix}/", recursive=True)
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def remote_small(s3, small_shards) -> str:
    return _upload(small_shards, "small")


# --- reading --------------------------------------------------------------------------------------


def test_the_bucket_reads_as_the_disk_with_workers_and_the_same_data_identity(remote_small, small_shards, tmp_path):
    from megatron_soda.data.mixture import MixtureDataset

    local, remote = ShardSet(small_shards), ShardSet(remote_small, cache_dir=str(tmp_path))
    assert len(local) == len(remote) == 64
    for k in range(len(local)):
        assert np.array_equal(local.read(k)[0], remote.read(k)[0])
    # the mixture: one identity for the same contents wherever they are (a local run resumes from S3)
    dl = MixtureDataset(DataConfig(paths=[str(small_shards)], num_workers=0))
    dr = MixtureDataset(DataConfig(paths=[remote_small], num_workers=1, cache_dir=str(tmp_path / "c")))
    assert dl.fingerprint() == dr.fingerprint()
    on_disk, from_bucket = _steps(dl, 0, 3), _steps(dr, 1, 3)
    want = [
        b["index"].tolist() + b["tokens"].flatten().tolist() + b["labels"].flatten().tolist()
        for step in on_disk[0]
        for b in step
    ]
    got = [
        b["index"].tolist() + b["tokens"].flatten().tolist() + b["labels"].flatten().tolist()
        for step in from_bucket[0]
        for b in step
    ]
    assert got == want  # through a DataLoader worker process (its own store connection, the shared cache)
    # the loader's own prefetcher read ahead from the bucket, without changing what it yields or
    # its position; local sets never start one
    assert from_bucket[1].prefetched > 0 and on_disk[1].prefetched == 0
    assert from_bucket[1].consumed_samples == on_disk[1].consumed_samples == 24


def _steps(ds, workers: int, n: int) -> tuple[list, object]:
    """The first `n` steps of a loader (its iteration closed after them), and the loader."""
    from megatron_soda.data.loader import SodaDataLoader

    loader = SodaDataLoader(ds, 2, 8, num_workers=workers)
    it = iter(loader)
    try:
        return [next(it) for _ in range(n)], loader
    finally:
        it.close()


def test_a_changed_tampered_truncated_or_missing_object_names_shard_and_sample(s3, small_shards, tmp_path):
    _, client = s3
    url = _upload(small_shards, "tamper")
    key = "tamper/shard-000001.tar"
    opened = ShardSet(url, cache_gb=0)  # every read from the store
    rec = opened.shards[1]
    original = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    flipped = bytearray(original)
    flipped[rec["data_offset"] + 5 * rec["stride"] + 3] ^= 0x01  # sample 5 of shard 1: a byte of its ids
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(flipped))
    base = int(opened.cumulative[0])
    # a set opened before the rewrite: its reads are pinned to the object it listed (If-Match)
    with pytest.raises(ShardReadError, match=rf"^{url}/shard-000001.tar: sample 2: object changed since"):
        opened.read(base + 2)
    # opened after it: the sidecar's checksum catches the flipped byte, and only in sample 5
    fresh = ShardSet(url, cache_gb=0)
    assert np.array_equal(fresh.read(base + 2)[0], ShardSet(small_shards).read(base + 2)[0])
    with pytest.raises(ShardReadError, match=rf"^{url}/shard-000001.tar: sample 5: checksum mismatch"):
        fresh.read(base + 5)
    assert "bad sample: " + f"{url}/shard-000001.tar: sample 5: checksum mismatch" in _verify(url, expect_rc=2)
    client.put_object(Bucket=BUCKET, Key=key, Body=original[:-512])
    with pytest.raises(ShardReadError, match=rf"^{url}/shard-000001.tar: {len(original) - 512} bytes, index says"):
        ShardSet(url)
    client.delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(ShardReadError, match=rf"^{url}/shard-000001.tar: shard missing"):
        ShardSet(url)
    skipped = ShardSet(url, skip_corrupt=True)  # or left out, counted, as on disk
    assert skipped.skipped_shards == [f"{url}/shard-000001.tar: shard missing"] and len(skipped) == 48


def _verify(url: str, expect_rc: int) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", url, "--verify"]) == expect_rc
    return out.getvalue()


@pytest.fixture(scope="module")
def text_set(corpus, tokenizer_dir, tmp_path_factory) -> Path:
    """The tiny corpus's text documents prepared on disk, one shard per document (no codec: fast)."""
    from megatron_soda.tokenization.prepare import prepare

    out = tmp_path_factory.mktemp("text") / "set"
    prepare(prepare_config([corpus / "text"], out, tokenizer_dir, files_per_shard=1), progress=False)
    return out


def test_inspect_verifies_and_decodes_from_the_bucket(remote_small, s3, text_set, capsys):
    assert "all 64 samples of 4 shards read back intact (with checksums)" in _verify(remote_small, 0)
    url = _upload(text_set, "text")  # with its tokenizer: decoded as from disk
    assert main(["inspect", url, "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert main(["inspect", str(text_set), "--samples", "1"]) == 0
    assert out.replace(url, str(text_set)) == capsys.readouterr().out  # the same report as from disk


def test_a_bad_cached_copy_is_read_again_from_the_store(remote_small, small_shards, tmp_path):
    s = ShardSet(remote_small, cache_dir=str(tmp_path))
    want = s.read(3)[0]
    shard, j = s.locate(3)
    cached = s.remote.path(shard, j)
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))  # the local disk went bad, not the object
    again = ShardSet(remote_small, cache_dir=str(tmp_path))
    assert np.array_equal(again.read(3)[0], want) and again.last_problem == ""


def test_missing_library_bad_urls_and_credentials_in_urls_are_one_line():
    with pytest.raises(
        ObjectStoreError, match=r"^gs://b/set/index.json: gs:// needs gcsfs.*pip install 'megatron-soda\[gcs\]'"
    ):
        object_store.read_bytes("gs://b/set/index.json")
    with pytest.raises(ObjectStoreError, match="unsupported URL scheme ftp://"):
        ShardSet("ftp://host/set")
    with pytest.raises(ObjectStoreError, match="a URL carrying credentials is refused") as e:
        ShardSet(f"s3://{KEY_ID}:{SECRET}@bucket/set")
    assert SECRET not in str(e.value)


# --- faults ---------------------------------------------------------------------------------------


def test_an_outage_is_retried_and_one_that_lasts_is_one_line(s3, remote_small, monkeypatch, caplog):
    server, _ = s3
    s = ShardSet(remote_small, cache_gb=0)
    s.read(0)
    server.stop()
    got: dict = {}
    reader = threading.Thread(target=lambda: got.update(sample=s.read(17)[0]))
    with caplog.at_level(logging.WARNING, logger="soda"):
        reader.start()
        time.sleep(2.0)
        server.start()
        reader.join(timeout=60)
    assert np.array_equal(got["sample"], ShardSet(remote_small, cache_gb=0).read(17)[0])
    (warning,) = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]  # said once, not per try
    assert warning.startswith(f"{remote_small}/shard-000001.tar: ") and "retrying for up to 120 s" in warning
    monkeypatch.setattr(object_store, "RETRY_SECONDS", 1.5)
    server.stop()
    try:
        with pytest.raises(ShardReadError, match=rf"^{remote_small}/shard-\d+.tar: sample \d+: still failing after"):
            s.read(40)
        with pytest.raises(ObjectUnreachable, match=rf"^{remote_small}/index.json: still failing after"):
            ShardSet(remote_small)
    finally:
        server.start()


@pytest.mark.slow  # four training runs, two of them on two ranks
def test_training_from_the_bucket_is_bitwise_the_local_run_through_dp_change_resume_and_an_outage(
    s3, remote_small, small_shards, tmp_path
):
    """DP=2 for 2 steps, then DP=1 resumed to 6, from local disk and from the bucket (through a
    loader worker process and the loader's prefetcher, with the server down for 3 s in the second
    half): the same losses, gradient and weight norms and consumed samples, bitwise."""
    server, _ = s3
    common = (*SMALL, "--train.steps", "6")
    local = tmp_path / "local"
    run_train(local, small_shards, 2, *common, "--train.exit_interval", "2")
    run_train(local, small_shards, 1, *common)
    run = tmp_path / "s3"
    cache = ("--data.cache_dir", str(tmp_path / "cache"))
    first = run_train(run, remote_small, 2, *common, *cache, "--train.exit_interval", "2", "--data.num_workers", "1")
    # resumed at DP=1 with a cold cache (as on another node: the first half's prefetchers cached
    # the whole set); the server stops once step 3 is logged and comes back 3 s later. Each step
    # sleeps 0.5 s, and the prefetcher reads one step beyond the worker's: it asks for step 7's
    # samples as step 5's arrive, in the outage (a longer read-ahead would have fetched all it
    # needs before the outage, and no read would meet it)
    resumed = ("--data.cache_dir", str(tmp_path / "cache-resumed"), "--data.prefetch_steps", "1")
    proc = subprocess.Popen(
        train_cmd(run, remote_small, 1, *common, *resumed, "--train.debug_slow_rank", "[0, 0.5]"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=train_env(),
        cwd=Path(__file__).resolve().parents[1],
    )
    logged = run / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(logged.read_text().splitlines()) < 3:
            time.sleep(0.02)
        server.stop()
        time.sleep(3.0)
        server.start()
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
        if server.stopped:
            server.start()
    assert proc.returncode == 0, err[-3000:]
    assert "retrying for up to" in err  # the outage was met, and survived
    # the training loader's prefetcher ran in both halves, ahead of the steps they read
    for text in (first.stderr, err):
        fetched = re.search(r"data prefetcher: fetched (\d+) samples from object storage ahead of the loader", text)
        assert fetched and int(fetched.group(1)) > 0, text[-3000:]
    a, b = metrics(local), metrics(run)
    for key in ("loss", "grad_norm", "param_norm", "consumed_samples"):
        assert [r[key] for r in b] == [r[key] for r in a], key
    assert [r["step"] for r in b] == list(range(1, 7))
    # the credentials stay in the environment: nothing the run wrote or logged holds them
    written = [p.read_bytes() for p in run.rglob("*") if p.is_file()]
    for text in [first.stdout, first.stderr, out, err, *map(lambda b: b.decode(errors="replace"), written)]:
        assert SECRET not in text and KEY_ID not in text
    assert f"- {remote_small}" in (run / "config.yaml").read_text()


# --- the cache and the prefetcher -----------------------------------------------------------------


def test_prefetch_follows_the_order_within_the_budget_and_keeps_what_the_next_steps_need(
    s3, remote_small, small_shards, monkeypatch, tmp_path
):
    """The prefetcher, as a rank's loader starts it, fetches the next 2 steps into a cache of 3
    windows; while the set is read twice over (and once more from a resumed position) the cache
    stays within its budget and always holds the whole window: with the store down, the next two
    steps still read, from the cache alone. What is read is the local set's, in the loader's order."""
    import dataclasses

    from megatron_soda.data.mixture import MixtureDataset
    from megatron_soda.data.remote import start_prefetch

    server, _ = s3
    sample = ShardSet(remote_small, cache_gb=0).remote.sample_bytes
    window = 2 * 8  # prefetch_steps x this rank's samples per step
    cfg = DataConfig(
        paths=[remote_small], cache_dir=str(tmp_path), cache_gb=3 * window * sample / 1e9, prefetch_steps=2
    )
    ds, local = MixtureDataset(cfg), MixtureDataset(DataConfig(paths=[str(small_shards)]))
    with pytest.raises(ConfigError, match=r"data.cache_gb .* holds less than twice"):
        start_prefetch(MixtureDataset(dataclasses.replace(cfg, cache_gb=cfg.cache_gb / 2)), _sampler(0))
    cache = ds.sets[0].remote.cache

    def cached(g: int) -> bool:
        d, k = ds.locate(g)
        return ds.sets[d].remote.path(*ds.sets[d].locate(k)).is_file()

    def window_cached(pos: int) -> None:
        """The prefetcher has gone over the window at `pos` (a sample cached before it did may
        still be evicted: nothing marked it as wanted yet), and all of it is in the cache."""
        deadline = time.time() + 30
        while prefetch.covered < pos - start + window or not all(cached(g) for g in range(pos, pos + window)):
            assert time.time() < deadline, f"the window at {pos} never filled"
            time.sleep(0.01)
        assert cache.size()[0] <= 1.1 * cache.budget + sample, (cache.size()[0], cache.budget)

    def read_step(pos: int) -> None:
        for m in range(pos, pos + 8, 2):  # this rank's micro-batches, as the loader asks for them
            got, want = ds.__getitems__(list(range(m, m + 2))), local.__getitems__(list(range(m, m + 2)))
            assert (got["sample"] == want["sample"]).all() and got["index"].tolist() == [m, m + 1]

    for start in (0, 24):  # from the start, and as a loader resumed at consumed_samples 24
        prefetch = start_prefetch(ds, _sampler(start))
        try:
            for pos in range(start, start + 80, 8):  # 80 samples: past the set's 64, so eviction has to work
                window_cached(pos)
                read_step(pos)
                prefetch.advance(8)
            if start == 0:
                window_cached(80)
                server.stop()
                monkeypatch.setattr(object_store, "RETRY_SECONDS", 0.5)  # a miss now would fail fast
                read_step(80)
                read_step(88)
                server.start()
                monkeypatch.setattr(object_store, "RETRY_SECONDS", 120.0)
        finally:
            prefetch.close()
            if server.stopped:
                server.start()


def _sampler(consumed: int):
    from megatron_soda.data.loader import GlobalBatchSampler

    return GlobalBatchSampler(consumed, 2, 8, 0, 1)


# --- writing and measuring --------------------------------------------------------------------------


def test_prepare_to_the_bucket_uploads_the_index_last_and_a_rerun_only_what_is_missing(
    s3, corpus, tokenizer_dir, text_set, tmp_path, capsys
):
    from megatron_soda.tokenization.prepare import prepare

    _, client = s3
    client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    url = f"s3://{BUCKET}/prepared-text"
    kw = dict(files_per_shard=1)
    local = text_set  # the same inputs and settings, prepared on disk
    prepare(prepare_config([corpus / "text"], url, tokenizer_dir, **kw), progress=False)

    def versions() -> dict[str, int]:
        found: dict[str, int] = {}
        for v in client.list_object_versions(Bucket=BUCKET, Prefix="prepared-text/").get("Versions", []):
            found[v["Key"].split("/", 1)[1]] = found.get(v["Key"].split("/", 1)[1], 0) + 1
        return found

    names = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert set(versions()) == names  # the whole set, tokenizer included; no staging leftovers
    shards = sorted(n for n in names if n.endswith(".tar"))
    assert len(shards) >= 3
    for n in shards:
        assert client.get_object(Bucket=BUCKET, Key=f"prepared-text/{n}")["Body"].read() == (local / n).read_bytes()
    index = json.loads(client.get_object(Bucket=BUCKET, Key="prepared-text/index.json")["Body"].read())
    assert index["shards"] == json.loads((local / "index.json").read_text())["shards"]
    lost = shards[1].removesuffix(".tar")
    for suffix in (".tar", ".tar.crc32", ".json"):
        client.delete_object(Bucket=BUCKET, Key=f"prepared-text/{lost}{suffix}")
    capsys.readouterr()
    staging = tmp_path / "staging"
    prepare(prepare_config([corpus / "text"], url, tokenizer_dir, staging=str(staging), **kw), progress=False)
    assert f"resuming: {len(shards) - 1} of this rank's shards already finished" in capsys.readouterr().out
    again = versions()
    redone = {n for n, count in again.items() if count > 1}
    assert redone == {f"{lost}.tar", f"{lost}.tar.crc32", f"{lost}.json", "index.json", "skipped.jsonl"}
    assert not list(staging.glob("shard-*"))  # uploaded shards leave the staging directory
    with pytest.raises(ObjectStoreError, match=r"^hf://datasets/x/y: hf:// cannot be written here"):
        prepare(prepare_config([corpus / "text"], "hf://datasets/x/y", tokenizer_dir, **kw), progress=False)


def test_bench_loader_from_the_bucket_prints_and_writes_cold_and_warm_rows(remote_small, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert (
        main(["bench", "loader", "--shards", remote_small, "--workers", "0", "--seconds", "0.4", "--json", str(out)])
        == 0
    )
    rows = json.loads(out.read_text())
    assert [(r["source"], r["cache"], r["prefetch_steps"]) for r in rows] == [
        ("local disk", None, 0),
        ("s3", "cold", 0),
        ("s3", "cold", 4),
        ("s3", "warm", 4),
    ]
    assert all(r["tokens_per_s"] > 0 and r["seq_len"] == 128 for r in rows)
    assert "goal >= 1,000,000 tokens/s per rank from a cold cache, prefetching:" in capsys.readouterr().out
