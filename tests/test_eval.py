"""`soda eval` on a tiny transformers Qwen3 trained in-process to memorise the right answer of every
task fixture: each scorer must then pick it (likelihood tasks), reproduce it (ASR, TTS, S2ST), and
report what the authors' scripts report."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.launch import soda as _soda


def soda(*args, check=True):
    return _soda(*args, check=check, timeout=600)  # generation runs take longer


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
    (root / "audio").mkdir()
    audio = {}
    for n in ("en_0000.wav", "en_0001.wav", "fr_0000.wav", "fr_0001.wav"):
        # the clips' first 0.8 s: the model memorises every sequence, and a third of the tokens is a
        # third of the training (what this fixture costs)
        x, rate = sf.read(str(s2st_corpus / "audio" / n))
        sf.write(str(root / "audio" / n), x[: int(0.8 * rate)], rate)
        audio[n] = str(root / "audio" / n)
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
        path = root / f"{name}.jsonl"
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
        if loss < 0.035:  # memorised (~90 steps); the floor is ~0.027: sequences share prefixes
            break
    assert loss < 0.035, loss
    folder = root / "hf"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    (folder / "soda.json").write_text(json.dumps({"codec": "random:0"}))  # as `soda export-hf` records it
    tasks["speaker"] = _tiny_speaker_encoder(root / "speaker")
    tasks["codes"] = {n: lay.ids_to_codes(np.asarray(ids[n])) for n in audio}  # what a memorised generation decodes
    tasks["audio"] = audio
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


@pytest.mark.slow
def test_eval_scorers_pick_the_forced_answers(forced, tmp_path):
    folder, tasks = forced
    # no --codec: the folder's soda.json says which codec its training data used
    args = ["eval", str(folder), "--out", str(tmp_path), "--asr", "self", "--max-seconds", "4"]
    args += ["--speaker", "tests.speaker_probe:embed"]
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
    # the memorised generations decode to the target clips' codes: their similarity to each reference
    # (TTS: the voice prompt, the other English clip; S2ST: the French source) is known here
    from megatron_soda.tokenization.audio_io import load_audio
    from megatron_soda.tokenization.codec import MimiCodec, random_mimi
    from tests.speaker_probe import cosine

    codec = MimiCodec(random_mimi(0), name="random:0")

    def clip(n):
        return load_audio(tasks["audio"][n], codec.sample_rate).samples

    def spoken(n):
        return codec.decode(tasks["codes"][n])

    want_tts = np.mean([cosine(spoken(f"en_000{i}.wav"), clip(f"en_000{1 - i}.wav")) for i in range(2)])
    want_s2st = np.mean([cosine(spoken(f"en_000{i}.wav"), clip(f"fr_000{i}.wav")) for i in range(2)])
    assert abs(tts["speaker_sim"] - want_tts) < 1e-6 and abs(s2["speaker_sim"] - want_s2st) < 1e-6, (tts, s2)
    assert "| asr:asr.jsonl | 2 | wer | 0.0% |" in (tmp_path / "report.md").read_text()


@pytest.mark.slow  # its fixture trains (or runs the codec)
def test_hf_speaker_encoders_load_through_transformers(forced):
    """`--speaker hf:<x-vector model>`: a transformers WavLM x-vector folder gives one embedding per clip."""
    from megatron_soda.evals import load_speaker, speaker_similarity

    _, tasks = forced
    embed = load_speaker(f"hf:{tasks['speaker']}", None)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=24000) * 0.1, rng.normal(size=24000) * 0.1
    assert embed(a, 24000).shape == (16,) and abs(speaker_similarity(embed, a, a, 24000) - 1.0) < 1e-4  # fp32
    assert speaker_similarity(embed, a, b, 24000) < 1.0


@pytest.mark.slow  # its fixture trains
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
