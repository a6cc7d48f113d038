"""Datasets: frozen, versioned train/validation/test splits built from stored traces."""
