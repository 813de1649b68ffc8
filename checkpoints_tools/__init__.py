"""Checkpoint tools: Hugging Face export and import, inspection (resharding is done on load)."""
