"""Run records: training, bench and learning-curve runs, read and written in one place (registry.py)."""
