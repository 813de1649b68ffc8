"""megatron-soda: 3D-parallel training of SODA audio foundation models on megatron-core.

The repository keeps the user's top-level folders `kernels/`, `tokenization/`, `launch/` and
`checkpoints_tools/`, but they import as `megatron_soda.kernels` etc.: installed (pyproject.toml maps
each folder into this package), nothing is put at the top level of site-packages, where `kernels`
(Hugging Face's, which transformers imports when present) or `tokenization` would be shadowed. In a
source checkout the same names resolve because this package's search path includes the checkout's
root, for those four folders only.
"""

import os as _os
from pathlib import Path as _Path

_SUBPACKAGE_FOLDERS = ("kernels", "tokenization", "launch", "checkpoints_tools")
_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "kernels").is_dir() and all(
    (_root / name / "__init__.py").is_file() for name in _SUBPACKAGE_FOLDERS
):
    __path__.append(str(_root))  # noqa: F821  (a package's __path__, set by the import system)

__version__ = "0.1.0"


def _gpu_visible() -> bool:
    """Whether this process could see an NVIDIA GPU, without importing torch (2 s: `soda --help` must
    not pay it). No device node, or CUDA_VISIBLE_DEVICES empty / -1, means torch would see none."""
    if _os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return _os.path.exists("/dev/nvidiactl") or _os.path.isdir("/proc/driver/nvidia/gpus")


# Without a GPU, Triton kernels only run in Triton's interpreter, and `@triton.jit` picks interpreted
# or compiled at decoration time, including Triton's own helpers (tl.zeros, tl.sum ...) decorated when
# megatron-core first imports Triton. So the switch must be set before anything imports Triton.
# (megatron_soda.kernels repeats the check with torch for a node whose GPU torch cannot use.)
if not _gpu_visible():
    _os.environ.setdefault("TRITON_INTERPRET", "1")
