"""Capture: get a team's LLM traffic into the store (logging proxy, SDK wrapper)."""
