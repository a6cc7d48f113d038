"""The same LoRA SFT through protege and through TRL's SFTTrainer, in the same run.

Run: make bench-deps && .venv/bin/python benchmarks/train_vs_trl.py [--rows 1600] [--test-rows 300]

Same model (SmolLM2-135M-Instruct), same data (the first --rows rows of BANKING77's train
split in one fixed shuffled order, as the specialist's chat: the task's system prompt, the
query, the intent as the reply), same LoRA (r 16, alpha 32, dropout 0.05, every linear
layer of the blocks), same optimiser settings (AdamW, lr 2e-4, weight decay 0, 5% warm-up
then cosine, gradient clipping at 1.0), same batch (16), one epoch, same seed, loss on the
completion only, no evaluation during training. TRL gets a conversational prompt-completion
dataset, the format its documentation recommends for this (it applies the chat template and
masks the prompt itself), with its other settings at their defaults except two that only
make it faster here: gradient checkpointing off (its default trades speed for memory that
is not short here) and no checkpoint saving.

Both trained models are then scored the same way: merged, answering a fixed random sample
of --test-rows test rows with protege's constrained decoding. Target (issue 4): protege's
wall time >= 1.5x faster at the same accuracy. Writes benchmarks/results/train_vs_trl.json.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

from _common import machine_info, prepare, table, write_result
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "banking77"
LORA = dict(r=16, alpha=32, dropout=0.05,
            modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1600, help="training rows (rows / 16 steps)")
    parser.add_argument("--test-rows", type=int, default=300)
    parser.add_argument("--home", default=None)
    args = parser.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is not installed: run `make bench-deps` first") from None
    info = machine_info(["protege", "torch", "transformers", "peft", "trl"])
    console = Console()

    import torch

    from protege.bases import resolve
    from protege.bench.run import sample_rows
    from protege.models.base import Context
    from protege.models.causal import CausalLM
    from protege.tasks.metrics import get_metric
    from protege.tasks.prompting import specialist_messages
    from protege.train.common import nested_subset
    from protege.train.loop import run_loop
    from protege.train.recipe import load_recipe
    from protege.train.sft import sft_job

    store, task, ds, home = prepare(EX, "banking77", args.home, "protege-trl-")
    all_train = ds.split("train")
    fraction = min(1.0, args.rows / len(all_train))
    train_rows = nested_subset(all_train, fraction)
    test = sample_rows(ds.split("test"), args.test_rows)
    base = resolve("smollm2-135m", home)
    steps = -(-len(train_rows) // 16)
    warmup = int(steps * 0.05)

    def score(model, tokenizer) -> tuple[float, float]:
        model.eval()
        lm = CausalLM("(bench)", {"instructed": "0"}, Context(task=task, dataset=ds, home=home), model=model,
                      tokenizer=tokenizer)
        t0 = time.monotonic()
        preds = [p.output for p in lm.predict(test)]
        return get_metric("accuracy").score(preds, [r["reference"] for r in test]), time.monotonic() - t0

    # --- protege: the same job `protege train --method lora` builds, without mid-run evaluation
    recipe = load_recipe("lora", overrides=["epochs=1", "batch_size=16", "lr=2e-4", "warmup_fraction=0.05",
                                            f"lora_r={LORA['r']}", f"lora_alpha={LORA['alpha']}",
                                            f"lora_dropout={LORA['dropout']}", "keep=last", "seed=0",
                                            "precision=fp32"])  # as TRL's bf16=False below
    folder = home / "runs" / "protege"
    folder.mkdir(parents=True)
    t0 = time.monotonic()
    job = sft_job(task, ds, home, "smollm2-135m", recipe, folder, "protege", method="lora", train_fraction=fraction)
    job.validates = False  # time the training alone, as the TRL run is timed
    load_s = time.monotonic() - t0
    t1 = time.monotonic()
    metrics = run_loop(store, "protege", folder, job, recipe, console=console)
    protege_train_s = time.monotonic() - t1
    protege_wall = time.monotonic() - t0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    protege_acc, eval_s = score(merged, AutoTokenizer.from_pretrained(folder / "model"))
    console.print(f"protege: {protege_wall:.0f} s wall ({protege_train_s:.0f} s in the loop), accuracy "
                  f"{protege_acc:.4f} (scored in {eval_s:.0f} s)")
    del merged, job

    # --- TRL SFTTrainer, same settings
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    data = Dataset.from_list([{"prompt": specialist_messages(task, r["input"]),
                               "completion": [{"role": "assistant", "content": r["reference"]}]} for r in train_rows])
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = SFTConfig(output_dir=str(home / "trl"), num_train_epochs=1, per_device_train_batch_size=16,
                           gradient_accumulation_steps=1, learning_rate=2e-4, weight_decay=0.0,
                           lr_scheduler_type="cosine", warmup_steps=warmup, max_grad_norm=1.0, max_length=256,
                           seed=0, bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
                           report_to=[], logging_steps=10, disable_tqdm=False)
        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["modules"], task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             peft_config=peft_config)
        t1 = time.monotonic()
        out = trainer.train()
    trl_train_s = time.monotonic() - t1
    trl_wall = time.monotonic() - t0
    trl_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    trl_merged = copy.deepcopy(trainer.model).merge_and_unload()
    trl_acc, _ = score(trl_merged, tokenizer)
    console.print(f"TRL: {trl_wall:.0f} s wall ({trl_train_s:.0f} s in train()), accuracy {trl_acc:.4f}")

    protege_tokens = metrics["train_tokens_per_s"] * protege_train_s
    speedup = trl_wall / protege_wall
    rows = [["protege", protege_wall, protege_train_s, metrics["train_tokens_per_s"], metrics["steps"], protege_acc],
            ["TRL SFTTrainer", trl_wall, trl_train_s, trl_tokens / trl_train_s, out.global_step, trl_acc]]
    console.print(table(f"LoRA SFT of SmolLM2-135M, {len(train_rows):,} BANKING77 rows, 1 epoch, batch 16 "
                        f"({len(test)} test rows)",
                        ["trainer", "wall s", "train-loop s", "real tokens/s", "steps", "test accuracy"], rows))
    same_accuracy = protege_acc >= trl_acc - 0.03
    checks = {"protege_1.5x_faster_wall_time": speedup >= 1.5, "same_accuracy_within_3_points": same_accuracy}
    console.print(f"wall-time speed-up: {speedup:.2f}x (train loops alone: {trl_train_s / protege_train_s:.2f}x)")
    for name, ok in checks.items():
        console.print(f"{'met ' if ok else 'MISSED'}  {name}")
    data_out = {"benchmark": "train_vs_trl", "machine": info, "train_rows": len(train_rows), "test_rows": len(test),
                "steps": {"protege": metrics["steps"], "trl": out.global_step},
                "protege": {"wall_s": protege_wall, "load_s": load_s, "train_loop_s": protege_train_s,
                            "tokens_per_s": metrics["train_tokens_per_s"], "tokens": protege_tokens,
                            "precision": metrics["precision"],
                            "test_accuracy": protege_acc},
                "trl": {"wall_s": trl_wall, "train_s": trl_train_s, "tokens_per_s": trl_tokens / trl_train_s,
                        "tokens": trl_tokens, "test_accuracy": trl_acc, "train_loss": out.training_loss,
                        "config": {"gradient_checkpointing": False, "padding_free": False, "packing": False}},
                "speedup_wall": speedup, "speedup_train_loop": trl_train_s / protege_train_s, "checks": checks}
    console.print(f"wrote {write_result('train_vs_trl', data_out)}")


if __name__ == "__main__":
    main()
