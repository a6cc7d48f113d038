"""Post-training: turn a frozen dataset into a specialist (a run the bench can score)."""
