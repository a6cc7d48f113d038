"""Bench: every candidate on the same frozen test rows; quality with CIs, latency, cost."""
