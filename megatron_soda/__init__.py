"""megatron-soda: 3D-parallel training of SODA audio foundation models on megatron-core."""

__version__ = "0.1.0"
