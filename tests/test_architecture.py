"""The rooms of megatron_soda import one way: each module only from rooms below its own.

The order is the data's way through the project (docs/ARCHITECTURE.md): config and its options,
processes and devices (which everything that starts a process uses), the tokenizer and shard
format, the training data, the kernels, the model, training, then the tools that drive training
(checkpoint conversion, launchers, generation, evaluation, benchmarks, the IsoFLOP study) and the
CLI. A package's `__main__.py` is a launch shim for `python -m PACKAGE`, which may only call the
CLI. import-linter cannot check it: the user's top-level folders (kernels/, tokenization/, launch/,
checkpoints_tools/) import as megatron_soda.<name> through a package-dir mapping, which its module
graph does not follow; so the imports are read here with `ast`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"kernels", "tokenization", "launch", "checkpoints_tools"}  # megatron_soda.<name> lives at ROOT/<name>

# lowest first; a module may import from its own room and the rooms before it
LAYERS = [
    ["megatron_soda.config", "megatron_soda.options"],
    ["megatron_soda.parallel"],
    ["megatron_soda.tokenization"],
    ["megatron_soda.data"],
    ["megatron_soda.kernels"],
    ["megatron_soda.model"],
    ["megatron_soda.training"],
    ["megatron_soda.checkpoints_tools", "megatron_soda.launch"],
    ["megatron_soda.generate"],
    ["megatron_soda.evals"],
    ["megatron_soda.tools"],
    ["megatron_soda.cli"],
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts[0] in FOLDERS:
        parts = ["megatron_soda", *parts]
    return ".".join(parts)


def layer_of(name: str) -> int | None:
    for i, rooms in enumerate(LAYERS):
        if any(name == r or name.startswith(r + ".") for r in rooms):
            return i
    return None


def project_files() -> list[Path]:
    files = list((ROOT / "megatron_soda").rglob("*.py"))
    for folder in FOLDERS:
        files += list((ROOT / folder).rglob("*.py"))
    return sorted(files)


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name.startswith("megatron_soda")]


def test_every_module_has_a_room():
    homeless = [module_name(p) for p in project_files() if layer_of(module_name(p)) is None]
    assert homeless == ["megatron_soda"], homeless  # only the package root itself sits outside the rooms


def test_imports_point_down_the_rooms():
    wrong = []
    for path in project_files():
        me = module_name(path)
        mine = layer_of(me)
        if path.name == "__main__.py":
            extra = [t for _, t in imports(path) if not t.startswith("megatron_soda.cli")]
            assert not extra, f"{path}: a __main__ shim imports {extra}; it may only call the CLI"
            continue
        for line, target in imports(path):
            theirs = layer_of(target)
            if theirs is not None and mine is not None and theirs > mine:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({me}) imports {target}, a room above it")
    assert not wrong, "\n".join(wrong)


def test_the_top_level_folders_install_inside_the_package():
    """pip install must not put `kernels` or `tokenization` at the top of site-packages, where they
    would shadow the PyPI packages of those names."""
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "megatron_soda" or p.startswith("megatron_soda.") for p in conf["packages"])
    assert conf["package-dir"] == {f"megatron_soda.{f}": f for f in sorted(FOLDERS)} | {}
    for folder in FOLDERS:
        assert f"megatron_soda.{folder}" in conf["packages"]
