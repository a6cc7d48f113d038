"""GRPO on top of SFT for CANARD query rewriting: reward and benchmark metric, before and after.

Run: .venv/bin/python benchmarks/grpo_canard.py [--sft-rows 480] [--grpo-prompts 96] [--test-rows 150]

1. LoRA SFT of SmolLM2-135M on --sft-rows rows of the CANARD train split (recipes/lora.yaml,
   one epoch), the starting point.
2. GRPO (recipes/grpo.yaml) from that run with chrF as the reward: --grpo-prompts prompts,
   4 completions each, KL to the SFT model.
3. Both runs benched on the same fixed random sample of --test-rows test rows with the
   task's metrics (exact match, chrF, ROUGE-L), 95% CIs and the paired test.
The reward "before" is the SFT model's mean chrF on the test sample (greedy decoding, as
the bench decodes), "after" the GRPO model's; the mean sampled reward logged during GRPO is
reported too. Writes benchmarks/results/grpo_canard.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import machine_info, prepare, table, write_result
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "canard"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-rows", type=int, default=480)
    parser.add_argument("--grpo-prompts", type=int, default=96)
    parser.add_argument("--test-rows", type=int, default=150)
    parser.add_argument("--home", default=None)
    args = parser.parse_args()
    info = machine_info(["protege", "torch", "transformers", "peft"])
    console = Console()

    from protege.bench.run import run_bench
    from protege.runs.registry import get_run
    from protege.train.api import train
    from protege.train.recipe import load_recipe

    store, task, ds, home = prepare(EX, "canard", args.home, "protege-grpo-")
    n_train = len(ds.split("train"))

    t0 = time.monotonic()
    sft_recipe = load_recipe("lora", ROOT / "recipes" / "lora.yaml", ["epochs=1", "eval_every=1000", "eval_rows=20",
                                                                       "keep=last"])
    sft = train(store, task, ds, home, "smollm2-135m", "lora", sft_recipe, console=console,
                train_fraction=min(1.0, args.sft_rows / n_train))
    sft_s = time.monotonic() - t0
    t0 = time.monotonic()
    grpo_recipe = load_recipe("grpo", ROOT / "recipes" / "grpo.yaml", ["reward=chrf", "lr=1e-4", "eval_every=8",
                                                                        "eval_rows=20", "max_new_tokens=40"])
    grpo = train(store, task, ds, home, f"run:{sft}", "grpo", grpo_recipe, console=console,
                 train_fraction=min(1.0, args.grpo_prompts / n_train))
    grpo_s = time.monotonic() - t0
    report = run_bench(store, task, ds, home, [f"run:{sft}", f"run:{grpo}"], limit=args.test_rows, latency_samples=5)
    before, after = report.results
    history = [h for h in get_run(store, grpo)["metrics"]["history"] if h.get("train_reward") is not None]
    rows = []
    for name in task.metric_names:
        b, a = before.metrics[name], after.metrics[name]
        rows.append([name, b["value"], f"[{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}]", a["value"],
                     f"[{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]", a["value"] - b["value"],
                     after.paired.get(name, {}).get("p_value")])
    console.print(table(f"CANARD, {report.rows} test rows: SFT ({sft_s / 60:.1f} min) then GRPO ({grpo_s / 60:.1f} min)",
                        ["metric", "SFT", "95% CI", "SFT+GRPO", "95% CI", "change", "paired p"], rows))
    if history:
        console.print(f"sampled chrF reward during GRPO: {history[0]['train_reward']:.4f} (first steps) -> "
                      f"{history[-1]['train_reward']:.4f} (last steps), KL {history[-1]['train_kl']:.4f}")
    data = {"benchmark": "grpo_canard", "machine": info, "test_rows": report.rows, "sft_run": sft, "grpo_run": grpo,
            "sft_seconds": sft_s, "grpo_seconds": grpo_s, "reward": "chrf",
            "reward_before": before.metrics["chrf"]["value"], "reward_after": after.metrics["chrf"]["value"],
            "sampled_reward_history": history,
            "metrics": {name: {"sft": before.metrics[name], "grpo": after.metrics[name],
                                "paired_grpo_minus_sft": after.paired.get(name)} for name in task.metric_names},
            "recipes": {"sft": sft_recipe.model_dump(), "grpo": grpo_recipe.model_dump()}}
    console.print(f"wrote {write_result('grpo_canard', data)}")


if __name__ == "__main__":
    main()
