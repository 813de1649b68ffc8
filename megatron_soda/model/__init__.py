"""The model room: the Qwen3-style decoder on megatron-core (gpt.py), its losses (loss.py), FLOPs
and parameter counts (flops.py), and which implementation each speed switch gets (fast_paths.py)."""
