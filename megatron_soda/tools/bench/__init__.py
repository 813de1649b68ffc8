"""`soda bench`: benchmarks that print numbers (train, kernels, loader, tokenize)."""


def write_json(rows, path: str | None) -> None:
    """The rows of a benchmark as JSON, when asked (`--json PATH`)."""
    if path:
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(rows, indent=1))
