import re

from megatron_soda.cli import main


def test_bench_loader_prints_tokens_per_second(capsys, tmp_path):
    assert main(["bench", "loader", "--seconds", "0.3", "--workers", "0,1", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\s*(\d+)(?: \(main\))?\s+([\d,]+)\s+([\d,]+)$", out, flags=re.M)
    assert [r[0] for r in rows] == ["0", "1"]
    assert all(int(r[1].replace(",", "")) > 0 for r in rows)
    assert "goal >= 20,000,000 tokens/s per core" in out


def test_inspect_decodes_samples(prepared, capsys):
    assert main(["inspect", str(prepared), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "<BOS><|text_start|>" in out and "[audio: " in out and "144644" not in out
    assert "--- sample 1" in out


def test_tokenizer_command(tmp_path, corpus, capsys):
    assert (
        main(
            [
                "tokenizer",
                "--train-tiny",
                str(corpus / "sentences.txt"),
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    assert "total" in capsys.readouterr().out
    assert main(["tokenizer", "--out", str(tmp_path / "x")]) == 2  # neither --base nor --train-tiny
