"""The parallel room: processes, devices and megatron-core's TP x PP x DP groups (setup.py), and the
CPU backend that runs megatron-core's real parallel code on gloo (cpu_backend.py)."""
