"""Fine-tuning (task formats with loss masks, `soda finetune`), `soda generate` and `soda eval`."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from megatron_soda.config import DataConfig
from megatron_soda.data.loader import SodaDataLoader
from megatron_soda.data.mixture import MixtureDataset
from megatron_soda.data.shard_set import ShardSet
from megatron_soda.tokenization.documents import Utterance, build_task_documents
from megatron_soda.tokenization.prepare import prepare
from megatron_soda.tokenization.vocab import SodaLayout
from tests.conftest import prepare_config
from tests.launch import ROOT, env, run_train
from tests.launch import soda as _soda

L = SodaLayout()


def soda(*args, check=True):
    return _soda(*args, check=check, timeout=600)  # fine-tuning and generation runs take longer


def test_task_formats_mask_the_prompt():
    a, t = np.array([L.audio_offset + 5, L.audio_offset + 2048 + 7]), np.array([11, 12])
    ((asr_ids, asr_mask),) = build_task_documents([Utterance(t, a)], "asr", L)
    assert asr_ids.tolist() == [L.bos_id, L.audio_start, *a, L.audio_end, L.text_start, 11, 12, L.text_end, L.eos_id]
    assert asr_mask.tolist() == [0] * 6 + [1] * 4  # prompt ends with <|text_start|>
    ((tts_ids, tts_mask),) = build_task_documents([Utterance(t, a)], "tts", L)
    assert tts_ids[tts_mask == 1].tolist() == [*a, L.audio_end, L.eos_id]
    src, tgt = Utterance(np.array([21]), a), Utterance(np.array([31]), a + 1)
    full, tgt_text, direct = (
        build_task_documents([src, tgt], f, L)[0] for f in ("s2st", "s2st_tgt_text", "s2st_direct")
    )
    prompt = [L.bos_id, L.audio_start, *a, L.audio_end]
    for ids, mask in (full, tgt_text, direct):
        assert ids[: len(prompt)].tolist() == prompt and not mask[: len(prompt)].any() and mask[len(prompt) :].all()
    assert full[0][len(prompt) :].tolist()[:6] == [L.text_start, 21, L.text_end, L.text_start, 31, L.text_end]
    assert 21 not in tgt_text[0].tolist() and 31 in tgt_text[0].tolist()
    assert direct[0][len(prompt) :].tolist() == [L.audio_start, *(a + 1), L.audio_end, L.eos_id]
    assert build_task_documents([src], "s2st", L) == []  # needs the pair


@pytest.fixture(scope="module")
def s2st_shards(s2st_corpus, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2st_shards") / "set"
    cfg = prepare_config(
        [s2st_corpus / "s2st.jsonl"], out, tokenizer_dir, formats=["s2st", "s2st_direct"], files_per_shard=8
    )
    summary = prepare(cfg, progress=False)
    assert summary["counts"]["docs_s2st"] == 8 and summary["counts"]["docs_s2st_direct"] == 8
    return out


@pytest.mark.slow
def test_prepared_task_shards_carry_the_mask_to_the_loss(s2st_shards):
    s = ShardSet(s2st_shards)
    assert s.rows == 2 and s.index.meta["loss_mask"] is True
    ds = MixtureDataset(DataConfig(paths=[str(s2st_shards)]), seq_len=256)
    (batch,) = next(iter(SodaDataLoader(ds, 4, 4, 0, 1, num_workers=0)))
    tokens, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    assert tokens.min() >= 0 and labels.min() >= 0  # prompt ids travel encoded, come back intact
    for row, g in enumerate(batch["index"].tolist()):
        d, k = ds.locate(g)
        ids, stored_mask, _ = ds.sets[d].read_masked(k)
        real = ids != ds.sets[d].sentinel
        assert torch.equal(
            tokens[row][torch.from_numpy(real[:-1])], torch.from_numpy(ids[:-1][real[:-1]].astype(np.int64))
        )
        expect = (stored_mask[1:] == 1) & real[1:] & real[:-1]
        assert mask[row].bool().tolist() == expect.tolist()
    # the source speech is a prompt: no label right after <|audio_start|> of a document's first segment
    assert 0 < mask.mean() < 1


@pytest.mark.slow
def test_prompt_labels_get_no_gradient(s2st_shards):
    """The real model and loss (CPU backend, one process): changing labels where the mask is 0 leaves
    every parameter gradient unchanged; changing one target label does not."""
    script = f"""
import torch, numpy as np
from megatron_soda.config import load_config
from megatron_soda.config import DataConfig
from megatron_soda.data.mixture import MixtureDataset
from megatron_soda.data.loader import SodaDataLoader
from megatron_soda.training.trainer import make_forward_step
from megatron_soda.checkpoints_tools.session import single_process, build_full_model
cfg = load_config("{ROOT}/configs/tiny.yaml")
ds = MixtureDataset(DataConfig(paths=["{s2st_shards}"]), seq_len=256)
cfg.model.vocab_size = ds.layout.vocab_size
(batch,) = next(iter(SodaDataLoader(ds, 8, 8, 0, 1, num_workers=0)))
assert batch["loss_mask"].sum() > 100
def grads(b):
    model.zero_grad()
    out, loss_func = fwd(iter([b]), model)
    loss_func(out)[0].backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])
with single_process():
    model = build_full_model(cfg.model).train()
    fwd = make_forward_step(cfg, ds.layout, "cpu")
    base = grads(batch)
    prompt = batch["loss_mask"] == 0
    changed = dict(batch, labels=torch.where(prompt, (batch["labels"] + 7) % 100, batch["labels"]))
    assert prompt.sum() > 100 and torch.equal(grads(changed), base), "prompt labels moved the gradient"
    target = (batch["loss_mask"] == 1).nonzero()[0]
    one = batch["labels"].clone(); one[tuple(target)] = (one[tuple(target)] + 7) % 100
    assert not torch.allclose(grads(dict(batch, labels=one)), base), "a target label did not matter"
print("OK")
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]


@pytest.fixture(scope="module")
def finetuned(prepared, s2st_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    # the pretrained run validates on the task shards at its end: the fine-tune's loss before its
    # first step must be that number (the weights it starts from), not the loss of a fresh init
    val = ("--data.val_paths", f"[{s2st_shards}]", "--train.eval_interval", "5", "--train.eval_batches", "4")
    pre = run_train(root / "pre", prepared, 1, "--train.steps", "5", *val)
    (root / "pre_summary.json").write_text(pre.stdout.strip().splitlines()[-1])
    common = [
        "--init-from",
        str(root / "pre"),
        "--config",
        str(ROOT / "configs" / "finetune-tiny.yaml"),
        "--device",
        "cpu",
    ]
    common += ["--data.paths", f"[{s2st_shards}]", "--data.val_paths", f"[{s2st_shards}]", "--train.eval_batches", "4"]
    # the run reports the target loss of the pretrained weights (before its first step) and its last
    r = soda("finetune", *common, "--run-dir", str(root / "ft"), "--train.steps", "40", "--train.eval_interval", "40")
    (root / "summary.json").write_text(r.stdout.strip().splitlines()[-1])
    return root


@pytest.mark.slow
def test_finetune_lowers_the_target_loss(finetuned):
    summary = json.loads((finetuned / "summary.json").read_text())["summary"]
    before, after = summary["val_loss_start"], summary["val_loss_last"]
    pretrained = json.loads((finetuned / "pre_summary.json").read_text())["summary"]
    assert abs(before - pretrained["val_loss_last"]) < 1e-5, (before, pretrained)  # init_from loaded its weights
    assert abs(before - pretrained["val_loss_start"]) > 1e-3, (before, pretrained)
    last_row = json.loads((finetuned / "ft" / "metrics.jsonl").read_text().splitlines()[-1])
    assert after < before - 0.5 and after == last_row["val_loss"], (before, after)
    cfg = (finetuned / "ft" / "config.yaml").read_text()
    assert "init_from" in cfg and str(finetuned / "pre") in cfg


@pytest.mark.slow  # its fixture trains (or runs the codec)
def test_finetune_refuses_architecture_changes(finetuned, s2st_shards):
    p = soda(
        "finetune",
        "--init-from",
        str(finetuned / "pre"),
        "--run-dir",
        str(finetuned / "x"),
        "--model.num_layers",
        "2",
        check=False,
    )
    assert p.returncode == 2 and "--model.* cannot change" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_generate_s2st_whole_frames_to_wav(finetuned, s2st_corpus, tmp_path):
    """No --codec and no --tokenizer: both come from what the run's training shards recorded."""
    srcs = [str(s2st_corpus / "audio" / f"fr_{i:04d}.wav") for i in range(4)]
    soda(
        "generate",
        str(finetuned / "ft"),
        "--task",
        "s2st",
        "--audio",
        *srcs,
        "--max-seconds",
        "1",
        "--out",
        str(tmp_path),
        "--seed",
        "1",
    )
    rows = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [0, 1, 2, 3]
    assert any(r["frames"] > 0 for r in rows), rows
    for r in rows:  # every generation: whole frames (8 tokens each), and a WAV exactly when there is audio
        assert r["frames"] >= 0 and r["new_tokens"] >= max(1, 8 * r["frames"]), r  # at least its stop token
        if r["frames"]:
            info = sf.info(r["wav"])
            assert info.samplerate == 24_000 and info.frames == r["frames"] * 1920 and r["seconds"] == info.duration
        else:
            assert "wav" not in r and not (tmp_path / f"{r['prompt']:03d}.wav").exists(), r
