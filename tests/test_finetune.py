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
from megatron_soda.tokenization.tiny_corpus import make_s2st_corpus
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
def s2st_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2st")
    make_s2st_corpus(root, num_pairs=8, seed=3)
    return root


@pytest.fixture(scope="module")
def s2st_shards(s2st_corpus, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2st_shards") / "set"
    cfg = prepare_config(
        [s2st_corpus / "s2st.jsonl"], out, tokenizer_dir, formats=["s2st", "s2st_direct"], files_per_shard=8
    )
    summary = prepare(cfg, progress=False)
    assert summary["counts"]["docs_s2st"] == 8 and summary["counts"]["docs_s2st_direct"] == 8
    return out


def test_prepared_task_shards_carry_the_mask_to_the_loss(s2st_shards):
    s = ShardSet(s2st_shards)
    assert s.rows == 2 and s.index.meta["loss_mask"] is True
    ds = MixtureDataset(DataConfig(paths=[str(s2st_shards)]), seq_len=256)
    batch = next(iter(SodaDataLoader(ds, 4, 4, 0, 1, num_workers=0)))
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
batch = next(iter(SodaDataLoader(ds, 8, 8, 0, 1, num_workers=0)))
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
    run_train(root / "pre", prepared, 1, "--train.steps", "20")
    common = [
        "--init-from",
        str(root / "pre"),
        "--config",
        str(ROOT / "configs" / "finetune-tiny.yaml"),
        "--device",
        "cpu",
    ]
    common += ["--data.paths", f"[{s2st_shards}]", "--data.val_paths", f"[{s2st_shards}]", "--train.eval_batches", "4"]
    # target loss of the pretrained weights: one step at learning rate 0
    soda(
        "finetune",
        *common,
        "--run-dir",
        str(root / "lr0"),
        "--train.steps",
        "1",
        "--optim.lr",
        "0",
        "--optim.min_lr",
        "0",
        "--train.eval_interval",
        "1",
    )
    soda("finetune", *common, "--run-dir", str(root / "ft"), "--train.steps", "40", "--train.eval_interval", "40")
    return root


def _val(run):
    return [json.loads(x)["val_loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]


def test_finetune_lowers_the_target_loss(finetuned):
    before, after = _val(finetuned / "lr0")[-1], _val(finetuned / "ft")[-1]
    assert after < before - 0.5, (before, after)
    cfg = (finetuned / "ft" / "finetune.yaml").read_text()
    assert "init_from" in cfg and str(finetuned / "pre") in cfg


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
    assert len(rows) == 4
    with_audio = [r for r in rows if r["frames"] > 0]
    assert with_audio, rows
    for r in with_audio:
        info = sf.info(r["wav"])
        assert info.samplerate == 24_000 and info.frames == r["frames"] * 1920


# --- soda eval on a model trained to prefer the right answers -----------------------------------


@pytest.fixture(scope="module")
def forced(s2st_corpus, tokenizer_dir, codec, tmp_path_factory):
    """A transformers Qwen3 of the tiny shape, trained in-process until it has memorised the
    right candidate of every fixture (and the ASR / S2ST targets), saved as an HF folder."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from megatron_soda.generate import audio_prompt_ids
    from megatron_soda.tokenization.text_tokenizer import layout_of

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lay = layout_of(tok)
    root = tmp_path_factory.mktemp("evalfix")
    audio = {n: str(s2st_corpus / "audio" / n) for n in ("en_0000.wav", "en_0001.wav", "fr_0000.wav", "fr_0001.wav")}
    ids = dict(zip(audio, audio_prompt_ids(list(audio.values()), codec, lay), strict=True))
    pairs = json.loads("[" + ",".join((s2st_corpus / "s2st.jsonl").read_text().splitlines()[:2]) + "]")

    def txt(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    def aud(n):
        return [lay.audio_start, *map(int, ids[n]), lay.audio_end]

    B, E = lay.bos_id, lay.eos_id
    train = []
    tasks = {}
    # audio minimal pairs / SALMon: the English clips are right, the French ones wrong
    mp = [
        {"positive": {"audio": f"audio/en_000{i}.wav"}, "negative": {"audio": f"audio/fr_000{i}.wav"}, "task": "lang"}
        for i in range(2)
    ]
    train += [[B, *aud(f"en_000{i}.wav"), E] for i in range(2)]
    # text minimal pairs and multiple choice
    good = ["The cat found the red box.", "My father opened the big door."]
    mp += [{"positive": g, "negative": " ".join(reversed(g[:-1].split())) + "."} for g in good]
    train += [[B, *txt(g)] for g in good]  # for the endings of the choice tasks
    train += [[B, lay.text_start, *txt(g), lay.text_end] for g in good]  # minimal pairs sit in their delimiters
    mc = [{"context": "The cat found", "endings": [" the red box.", " yesterday door big.", " a the of."], "label": 0}]
    story = [
        {
            "prompt": {"text": "My father opened"},
            "endings": [{"text": " door the big."}, {"text": " the big door."}],
            "label": 1,
        }
    ]
    asr = [{"audio": f"audio/en_000{i}.wav", "text": pairs[i]["target_text"]} for i in range(2)]
    train += [
        [B, *aud(f"en_000{i}.wav"), lay.text_start, *txt(pairs[i]["target_text"]), lay.text_end, E] for i in range(2)
    ]
    s2st = [{"source_audio": f"audio/fr_000{i}.wav", "target_text": pairs[i]["target_text"]} for i in range(2)]
    train += [[B, *aud(f"fr_000{i}.wav"), *aud(f"en_000{i}.wav"), E] for i in range(2)]
    # voice-conditioned TTS: one English clip (and its transcript) is the voice, the other the target
    tts = [
        {
            "text": pairs[i]["target_text"],
            "prompt_audio": f"audio/en_000{1 - i}.wav",
            "prompt_text": pairs[1 - i]["target_text"],
        }
        for i in range(2)
    ]
    for i, it in enumerate(tts):
        voice = [lay.text_start, *txt(it["prompt_text"]), lay.text_end, *aud(f"en_000{1 - i}.wav")]
        train.append([B, *voice, lay.text_start, *txt(it["text"]), lay.text_end, *aud(f"en_000{i}.wav"), E])
    for name, items in (("mp", mp), ("mc", mc), ("story", story), ("asr", asr), ("s2st", s2st), ("tts", tts)):
        path = s2st_corpus / f"{name}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in items))
        tasks[name] = path

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=lay.vocab_size + 44,  # padded past the tokenizer, as megatron-style exports are
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    groups = _length_groups(train, E)
    n_tokens = sum(len(s) - 1 for s in train)
    for _ in range(200):
        opt.zero_grad()
        loss = 0.0
        for x, lab, n in groups:  # one step over all sequences: the token-weighted mean loss
            part = model(input_ids=x, labels=lab).loss * n / n_tokens
            part.backward()
            loss += part.item()
        opt.step()
        if loss < 0.015:  # the floor is ~0.01: sequences share prefixes (e.g. <bos> <|audio_start|>)
            break
    assert loss < 0.03, loss
    folder = root / "hf"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    (folder / "soda.json").write_text(json.dumps({"codec": "random:0"}))  # as `soda export-hf` records it
    tasks["speaker"] = _tiny_speaker_encoder(root / "speaker")
    return folder, tasks


def _length_groups(seqs: list[list[int]], pad: int, size: int = 4) -> list[tuple]:
    """Sequences in batches of similar length (padding is most of the work otherwise), with labels
    -100 on the padding and each batch's count of predicted tokens."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = []
    for g in range(0, len(order), size):
        batch = [seqs[i] for i in order[g : g + size]]
        width = max(len(s) for s in batch)
        x = torch.full((len(batch), width), pad)
        lab = torch.full((len(batch), width), -100)
        for i, s in enumerate(batch):
            x[i, : len(s)] = torch.tensor(s)
            lab[i, : len(s)] = torch.tensor(s)
        out.append((x, lab, sum(len(s) - 1 for s in batch)))
    return out


def _tiny_speaker_encoder(folder):
    """A random-weight WavLM x-vector model saved as a transformers folder (the real loading path of
    `--speaker hf:<name>`; the released verification models cannot be downloaded here)."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    torch.manual_seed(0)
    cfg = WavLMConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32, 32, 32),
        conv_stride=(5, 4, 4),
        conv_kernel=(10, 8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        tdnn_dim=(32, 32),
        tdnn_kernel=(3, 1),
        tdnn_dilation=(1, 1),
        xvector_output_dim=16,
        num_buckets=32,
        max_bucket_distance=100,
    )
    WavLMForXVector(cfg).save_pretrained(str(folder))
    Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(str(folder))
    return folder


def test_eval_scorers_pick_the_forced_answers(forced, tmp_path):
    folder, tasks = forced
    # no --codec: the folder's soda.json says which codec its training data used
    args = ["eval", str(folder), "--out", str(tmp_path), "--asr", "self", "--max-seconds", "4"]
    args += ["--speaker", f"hf:{tasks['speaker']}"]
    for kind, name in (
        ("minimal_pairs", "mp"),
        ("salmon", "mp"),
        ("multiple_choice", "mc"),
        ("storycloze", "story"),
        ("asr", "asr"),
        ("tts", "tts"),
        ("s2st", "s2st"),
    ):
        args += ["--task", f"{kind}:{tasks[name]}"]
    soda(*args)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["codec"] == "random:0" and report["sampling"]["temperature"] == 0.9
    rep = report["tasks"]
    assert rep["minimal_pairs:mp.jsonl"]["accuracy"] == 1.0 and rep["minimal_pairs:mp.jsonl"]["items"] == 4
    assert rep["salmon:mp.jsonl"]["by_task"]["lang"] == 1.0
    assert (
        rep["multiple_choice:mc.jsonl"]["accuracy"] == 1.0 and rep["multiple_choice:mc.jsonl"]["accuracy_norm"] == 1.0
    )
    assert rep["storycloze:story.jsonl"]["accuracy"] == 1.0
    assert rep["asr:asr.jsonl"]["wer"] == 0.0
    s2 = rep["s2st:s2st.jsonl"]
    assert s2["whole_frames"] and s2["asr_bleu"] > 99.0, s2
    tts = rep["tts:tts.jsonl"]  # sampled at 0.9 / top-p 0.8: a memorised model still says its text
    assert tts["wer"] == 0.0 and tts["terminated"] == 1.0, tts
    for r in (tts, s2):
        assert -1.0 <= r["speaker_sim"] <= 1.0 and r["speaker_sim"] != 0.0, r
    assert "| asr:asr.jsonl | 2 | wer | 0.0% |" in (tmp_path / "report.md").read_text()


def test_eval_bad_task_file_is_one_line(forced, tmp_path):
    folder, tasks = forced
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"positive": "a"}\n')
    p = soda("eval", str(folder), "--task", f"minimal_pairs:{bad}", "--codec", "random:0", check=False)
    assert p.returncode == 2 and "missing field 'negative'" in p.stderr and "Traceback" not in p.stderr


def test_pair_candidates_sit_in_their_delimiters_and_tblimp_is_lower_cased(tokenizer_dir):
    from transformers import AutoTokenizer

    from megatron_soda.evals import Scorer, speaker_similarity
    from megatron_soda.tokenization.text_tokenizer import layout_of

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lay = layout_of(tok)
    sc = Scorer(None, tok, lay, None, tokenizer_dir)
    ids, kind = sc.segment("The Cat sat.", "x", wrap_text=True, lower=True)
    assert kind == "text" and ids == [lay.text_start, *sc.text_ids("the cat sat."), lay.text_end]
    assert sc.segment("The Cat sat.", "x")[0] == sc.text_ids("The Cat sat.")  # choice endings: bare text
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=8000), rng.normal(size=8000)
    embed = lambda x, rate: np.array([x[:4000].std(), x[4000:].std(), x.mean()])  # noqa: E731
    assert abs(speaker_similarity(embed, a, a, 16000) - 1.0) < 1e-9
    assert speaker_similarity(embed, a, -b, 16000) < 1.0
