"""The training room: the Trainer (one rank's model, optimizer and step), the loop around it, the
checkpointer, metrics, fine-tuning, and `spawn` (how a job starts `soda train` ranks)."""
