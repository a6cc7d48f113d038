"""Candidates: anything that answers a task's inputs, behind one protocol (see base.py)."""
