"""The `RUN/checkpoint/` folder that `protege train --resume RUN_ID` goes on from.

    protege train TASK --resume RUN_ID

At every evaluation (and every `save_every` steps) `loop.run_loop` calls `save_checkpoint`,
which writes the folder atomically: trainable weights, optimiser and scheduler state, the
step, the epoch and the position inside it, the data-order RNG as it was at the start of that
epoch, every process's torch RNG, the history and the best state so far. On resume
`load_checkpoint` puts all of it back, the loop rebuilds the epoch's batch order from that
RNG, skips what was done and goes on; the result is the same weights as a run that was never
interrupted. The folder is removed when the run finishes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import ProtegeError
from .distributed import Dist, Weights


def checkpoint_folder(run_folder: Path) -> Path:
    return run_folder / "checkpoint"


def _rng_state() -> dict:
    import torch

    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def save_checkpoint(ckpt: Path, weights: Weights, opt, sched, state: dict, best_state: dict, dist: Dist) -> None:
    """Every rank calls it (the RNGs are gathered, and sharded state is a collective); rank 0 writes."""
    import torch

    rngs = dist.gather(_rng_state())
    if not (dist.main or weights.collective):
        return
    current, optim = weights.state(), weights.optim_state(opt)  # collectives under FSDP: every rank
    if not dist.main:
        return
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"model": current, "optimizer": optim, "scheduler": sched.state_dict(),
                "state": state, "rng": rngs, "world": dist.world}, tmp / "state.pt")
    torch.save(best_state, tmp / "best.pt")
    old = ckpt.with_name(ckpt.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt.exists():
        ckpt.rename(old)
    tmp.rename(ckpt)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: Path, weights: Weights, opt, sched, state: dict, dist: Dist) -> dict:
    """Restore the weights, optimiser, scheduler, loop `state` and this rank's RNG; returns the
    best state so far."""
    import torch

    if not (ckpt / "state.pt").exists():
        old = ckpt.with_name(ckpt.name + ".old")  # killed between the two renames
        if (old / "state.pt").exists():
            ckpt = old
        else:
            raise ProtegeError(f"no checkpoint to resume from in {ckpt.parent}: the run stopped before its first "
                               "evaluation/save, or it finished (start it again instead)")
    saved = torch.load(ckpt / "state.pt", weights_only=False)
    if saved["world"] != dist.world:
        raise ProtegeError(f"the checkpoint was written by {saved['world']} process(es); resume it with "
                           f"--nproc {saved['world']}")
    missing = {n for n, p in weights.model.named_parameters() if p.requires_grad} - set(saved["model"])
    if missing:
        raise ProtegeError(f"checkpoint {ckpt} does not match the model: {len(missing)} weights missing "
                           f"(e.g. {sorted(missing)[0]})")
    weights.load(saved["model"])
    weights.load_optim(opt, saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    state.update(saved["state"])
    rng = saved["rng"][dist.rank]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return torch.load(ckpt / "best.pt", weights_only=False)


def remove_checkpoint(ckpt: Path) -> None:
    """A finished run needs no checkpoint (and `--resume` then says it finished)."""
    shutil.rmtree(ckpt, ignore_errors=True)
