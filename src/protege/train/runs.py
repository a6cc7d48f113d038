"""What a training run records about itself: its config and the machine and software it ran on.

The record itself is written and read through the runs registry (protege.runs.registry).
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

from ..datasets.registry import Dataset
from ..ids import uuid7
from ..runs.registry import create_run
from ..traces.store import Store

PACKAGES = ("protege", "torch", "transformers", "peft", "trl", "accelerate", "safetensors", "tokenizers")


def environment() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    hw: dict[str, Any] = {"cpu_cores": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform()}
    try:
        import torch

        hw["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return {"python": sys.version.split()[0], "packages": versions, "hardware": hw}


def start_training_run(store: Store, home, *, task: str, dataset: Dataset, base: str, method: str, recipe,
                       time_budget_min: float | None, train_fraction: float | None, extra: dict | None = None):
    """Record a running training run with its full resolved config; returns (run id, its folder)."""
    from pathlib import Path

    config = {"method": method, "recipe": recipe.model_dump(), "base": base, "dataset": dataset.id,
              "dataset_hash": dataset.content_hash, "time_budget_min": time_budget_min,
              "train_fraction": train_fraction, "environment": environment(), **(extra or {})}
    run_id = uuid7()
    folder = Path(home) / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    create_run(store, kind="train", task=task, config=config, run_id=run_id, base_model=base,
               dataset_id=dataset.id, metrics={}, checkpoint_path=str((folder / "model").resolve()))
    return run_id, folder
