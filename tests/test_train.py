"""Training: a tiny random model of the real architecture through the real entry point,
one real MiniLM run on a slice, recipes and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_banking, run, run_id_in

from protege.errors import ProtegeError
from protege.runs.registry import get_run
from protege.train.recipe import RecipeError, load_recipe

ROOT = Path(__file__).parents[1]



def test_tiny_classifier_writes_model_card_metrics_and_tensorboard(sqlite_store, tmp_path, home, tiny_bert, capsys):

    task, ds = make_banking(sqlite_store, tmp_path, home)
    code, out, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--base", tiny_bert,
                         "--method", "classifier", "--set", "epochs=2", "--set", "eval_every=3",
                         "--set", "batch_size=16")
    assert code == 0, err
    run_id = run_id_in(out)
    r = get_run(sqlite_store, run_id)
    assert r["status"] == "done" and r["kind"] == "train" and r["dataset_id"] == ds.id
    assert r["config"]["recipe"]["epochs"] == 2 and r["config"]["dataset_hash"] == ds.content_hash
    assert r["config"]["environment"]["packages"]["torch"]
    m = r["metrics"]
    train_rows = m["train_rows"]
    assert m["history"][0]["step"] == 0 and m["steps"] == -(-train_rows // 16) * 2
    folder = Path(r["checkpoint_path"])
    assert {"config.json", "model.safetensors", "protege.json", "README.md", "tokenizer.json"} <= \
        {p.name for p in folder.iterdir()}
    meta = json.loads((folder / "protege.json").read_text())
    assert meta["labels"] == task.labels and meta["pooling"] == "mean" == m["pooling"]  # auto, on a BERT head
    assert "best validation accuracy" in (folder / "README.md").read_text()
    assert list((folder.parent / "tensorboard").glob("events.out.tfevents.*"))
    code, out, _ = run(capsys, "--db", sqlite_store.url, "runs", "list", "--kind", "train", "--json")
    assert [x["id"] for x in json.loads(out)] == [run_id]

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from protege.models.base import Context
    from protege.models.registry import build_candidate

    texts = ["where is my card", "my top up failed", "what is the exchange rate for euros"]
    ctx = Context(task=task, dataset=ds, home=home, train=[], store=sqlite_store)
    answers = build_candidate(f"run:{run_id}", ctx).predict([{"input": t} for t in texts])
    # mean pooling, computed by hand: the mean of the token states through the linear head
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.inference_mode():
        for text, answer in zip(texts, answers):
            enc = tok(text, return_tensors="pt")
            probs = torch.softmax(model.classifier(model.bert(**enc).last_hidden_state.mean(1)), -1)[0]
            assert answer.label_probs[answer.output] == pytest.approx(float(probs.max()), abs=1e-5)
    # pooling cls: the first-token pooler, which transformers' pipeline applies as it is
    code, out, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--base", tiny_bert,
                         "--method", "classifier", "--set", "epochs=1", "--set", "pooling=cls")
    assert code == 0, err
    cls_id = run_id_in(out)
    cls_folder = get_run(sqlite_store, cls_id)["checkpoint_path"]
    clf = pipeline("text-classification", model=cls_folder)
    ours = build_candidate(f"run:{cls_id}", ctx).predict([{"input": t} for t in texts])
    for text, answer in zip(texts, ours):
        got = clf(text)[0]
        assert got["label"] == answer.output and got["score"] == pytest.approx(answer.confidence, abs=1e-4)


def test_minilm_classifier_learns_on_a_slice(sqlite_store, tmp_path, home):
    from protege.bench.run import run_bench
    from protege.train.api import train

    task, ds = make_banking(sqlite_store, tmp_path, home)
    recipe = load_recipe("classifier", overrides=["epochs=4", "init_head=random", "eval_every=4", "head_lr=5e-3"])
    run_id = train(sqlite_store, task, ds, home, "minilm", "classifier", recipe)
    m = get_run(sqlite_store, run_id)["metrics"]
    assert m["best_val_score"] > m["history"][0]["val_score"] + 0.3  # random head: near chance at step 0
    report = run_bench(sqlite_store, task, ds, home, [f"run:{run_id}"], latency_samples=2)
    [result] = report.results
    assert result.metrics["accuracy"]["value"] >= 0.7  # chance is 1/6
    assert all(set(p.label_probs) == set(task.labels) for p in result.outputs)


def test_recipe_files_and_errors(tmp_path):
    r = load_recipe("classifier", ROOT / "recipes" / "classifier.yaml", ["lr=5e-5"])
    assert r.lr == 5e-5 and r.epochs == 5 and r.label_smoothing == 0.1
    for method in ("classifier", "lora", "full", "distill", "grpo"):  # every method ships a valid recipe
        path = ROOT / "recipes" / f"{method}.yaml"
        assert path.read_text().splitlines()[0].startswith("# protege train ")
        assert f"--method {method}" in path.read_text().splitlines()[0]
        load_recipe(method, path)
    bad = tmp_path / "r.yaml"
    bad.write_text("method: classifier\nepochs: -1\nlearning_rate: 3\n")
    with pytest.raises(RecipeError) as info:
        load_recipe("classifier", bad, ["batch_size=zero"])
    msg = str(info.value)
    assert msg.startswith("3 problem(s) in the classifier recipe")
    assert f"{bad}:2: epochs: Input should be greater than 0" in msg
    assert f"{bad}:3: learning_rate: unknown key" in msg
    assert "--set batch_size: Input should be a valid integer" in msg
    with pytest.raises(RecipeError, match="write KEY=VALUE"):
        load_recipe("classifier", overrides=["lr"])
    with pytest.raises(RecipeError, match="unknown method 'dpo'"):
        load_recipe("dpo")


def test_recipe_for_another_method_names_both(sqlite_store, tmp_path, home, capsys):

    lora = ROOT / "recipes" / "lora.yaml"
    with pytest.raises(RecipeError) as info:
        load_recipe("classifier", lora)
    assert str(info.value) == f"{lora}: this recipe is for method 'lora', not 'classifier'"
    task, _ = make_banking(sqlite_store, tmp_path, home)
    code, _, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--base", "minilm",
                       "--method", "classifier", "--config", str(lora))
    assert code == 1 and "this recipe is for method 'lora', not 'classifier'" in " ".join(err.split())


def test_resume_refuses_changed_flags_naming_each(sqlite_store, tmp_path, home, tiny_bert, capsys):

    task, _ = make_banking(sqlite_store, tmp_path, home)
    code, out, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--base", tiny_bert,
                         "--method", "classifier", "--set", "epochs=1", "--set", "batch_size=16")
    assert code == 0, err
    run_id = run_id_in(out)
    code, _, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--resume", run_id,
                       "--method", "lora")
    assert code == 1 and ("--method 'lora' differs from the run's 'classifier'; --resume continues the run as it "
                          "was started (leave --method out)") in " ".join(err.split())
    code, _, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--resume", run_id,
                       "--base", "minilm")
    assert code == 1 and "--base 'minilm' differs from the run's" in " ".join(err.split())
    assert "(leave --base out)" in " ".join(err.split())


def test_missing_base_model_names_the_path(sqlite_store, tmp_path, home, capsys):

    task, _ = make_banking(sqlite_store, tmp_path, home)
    code, _, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--base", str(tmp_path / "nope"),
                       "--method", "classifier")
    assert code == 1 and f"model path {tmp_path / 'nope'} does not exist" in " ".join(err.split())
    with pytest.raises(ProtegeError, match="not a Hugging Face model folder"):
        from protege.bases import resolve

        resolve(str(tmp_path), home)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_tiny_sft_writes_merged_model_adapter_and_benches(sqlite_store, tmp_path, home, tiny_llama, capsys, method):
    from transformers import AutoModelForCausalLM

    from protege.bench.run import run_bench

    task, ds = make_banking(sqlite_store, tmp_path, home)
    code, out, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--base", tiny_llama,
                         "--method", method, "--set", "epochs=1", "--set", "eval_every=4", "--set", "eval_rows=6",
                         "--set", "batch_size=16", "--set", "lr=1e-3")
    assert code == 0, err
    run_id = run_id_in(out)
    r = get_run(sqlite_store, run_id)
    m = r["metrics"]
    assert r["status"] == "done" and r["config"]["method"] == method and m["metric"] == "accuracy"
    assert m["history"][0]["step"] == 0 and m["steps"] == -(-m["train_rows"] // 16)
    folder = Path(r["checkpoint_path"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "protege.json", "README.md"} <= \
        {p.name for p in folder.iterdir()}
    assert (folder.parent / "adapter" / "adapter_config.json").exists() == (method == "lora")
    merged = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers loads it
    assert merged.config.num_hidden_layers == 1 and not any("lora" in n for n, _ in merged.named_parameters())
    report = run_bench(sqlite_store, task, ds, home, [f"run:{run_id}"], limit=4, latency_samples=1)
    assert all(p.output in task.labels for p in report.results[0].outputs)  # constrained to the labels


def test_sft_encode_masks_the_prompt(tmp_path, home):
    from transformers import AutoTokenizer

    from protege.bases import resolve
    from protege.tasks.spec import load_task
    from protege.train.sft import IGNORE, encode

    p = tmp_path / "t.yaml"
    p.write_text("name: t\nkind: classification\nlabels: [yes_label, no_label]\nprompt: {system: Decide.}\n")
    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m", home))
    ids, labels = encode(tok, load_task(p), "is it?", "yes_label", 256)
    reply = tok.decode([t for t, y in zip(ids, labels) if y != IGNORE])
    assert reply.startswith("yes_label<|im_end|>") and len(ids) == len(labels)
    short_ids, short_labels = encode(tok, load_task(p), "word " * 300, "yes_label", 64)
    assert len(short_ids) == 64 and tok.decode([t for t, y in zip(short_ids, short_labels) if y != IGNORE]) == reply


def test_smollm2_lora_learns_on_a_slice(sqlite_store, tmp_path, home):
    from protege.train.api import train

    task, ds = make_banking(sqlite_store, tmp_path, home)
    recipe = load_recipe("lora", ROOT / "recipes" / "lora.yaml", ["epochs=2", "eval_every=7", "eval_rows=24",
                                                                   "lr=1e-3"])
    run_id = train(sqlite_store, task, ds, home, "smollm2-135m", "lora", recipe)
    m = get_run(sqlite_store, run_id)["metrics"]
    # the untrained base, constrained to the six labels, already gets some right
    assert m["best_val_score"] >= m["history"][0]["val_score"] + 0.1


def test_learning_curve_trains_nested_subsets(sqlite_store, tmp_path, home, tiny_bert, capsys):

    from protege.train.common import nested_subset

    rows = list(range(100))
    assert set(nested_subset(rows, 0.25)) <= set(nested_subset(rows, 0.5)) and len(nested_subset(rows, 0.1)) == 10
    task, ds = make_banking(sqlite_store, tmp_path, home)
    code, out, err = run(capsys, "--db", sqlite_store.url, "curve", str(task.path), "--base", tiny_bert,
                         "--method", "classifier", "--fractions", "1.0,0.5", "--set", "epochs=1", "--json")
    assert code == 0, err
    curve = json.loads(out)
    pts = curve["points"]
    assert [p["fraction"] for p in pts] == [0.5, 1.0] and pts[0]["train_rows"] < pts[1]["train_rows"]
    assert all(p["metric"] == "accuracy" and p["ci95"][0] <= p["value"] <= p["ci95"][1] for p in pts)
    stored = get_run(sqlite_store, curve["id"], kind="curve")
    assert stored["metrics"]["points"] == pts
    assert get_run(sqlite_store, pts[0]["run_id"])["config"]["train_fraction"] == 0.5
    # again: the runs with the same base, recipe, dataset and share are reused, not retrained
    code, out, err = run(capsys, "--db", sqlite_store.url, "curve", str(task.path), "--base", tiny_bert,
                         "--method", "classifier", "--fractions", "1.0,0.5,0.25", "--set", "epochs=1", "--json")
    again = json.loads(out)["points"]
    assert [p["run_id"] for p in again[1:]] == [p["run_id"] for p in pts] and again[0]["run_id"] not in \
        {p["run_id"] for p in pts}
    code, _, err = run(capsys, "--db", sqlite_store.url, "curve", str(task.path), "--base", tiny_bert,
                       "--method", "classifier", "--fractions", "0,2")
    assert code == 1 and "each fraction must be in (0, 1]" in err


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= atol, f"weights differ by up to {worst}"


KILL_SCRIPT = """
import os, sys
from protege.datasets.registry import get_dataset
from protege.tasks.spec import load_task
from protege.train.api import train
from protege.train.recipe import load_recipe
from protege.traces.store import Store

url, task_path, base, home, kill_at = sys.argv[1:6]
store = Store(url)
task = load_task(task_path)
recipe = load_recipe("classifier", overrides=sys.argv[6:])

def on_step(step):
    if step == int(kill_at):
        os.kill(os.getpid(), 9)  # no cleanup, no finally: like an OOM kill or a lost machine

train(store, task, get_dataset(store, task.name), home, base, "classifier", recipe, on_step=on_step)
"""


def test_resume_after_kill_ends_with_the_same_weights(sqlite_store, tmp_path, home, tiny_bert, capsys):
    import subprocess
    import sys

    from protege.train.api import train

    task, ds = make_banking(sqlite_store, tmp_path, home)
    # dropout stays on (0.1): the resumed run must restore the RNG, not only the weights
    overrides = ["epochs=3", "eval_every=5", "batch_size=8", "init_head=random", "keep=last"]
    full = train(sqlite_store, task, ds, home, tiny_bert, "classifier", load_recipe("classifier", overrides=overrides))
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, sqlite_store.url, str(task.path), tiny_bert, str(home),
                           "17", *overrides], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    from protege.runs.registry import list_runs

    killed = next(r for r in list_runs(sqlite_store, kind="train") if r["id"] != full)
    assert killed["status"] == "running"  # nothing got to say otherwise
    assert (home / "runs" / killed["id"] / "checkpoint" / "state.pt").exists()
    code, out, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--resume", killed["id"][:20])
    assert code == 0, err
    done = get_run(sqlite_store, killed["id"])
    assert done["status"] == "done" and done["metrics"]["resumed"]
    assert not (home / "runs" / killed["id"] / "checkpoint").exists()
    a, b = get_run(sqlite_store, full)["metrics"], done["metrics"]
    assert a["steps"] == b["steps"] and a["best_step"] == b["best_step"]
    assert [h["val_score"] for h in a["history"]] == [h["val_score"] for h in b["history"]]
    _assert_same_weights(Path(get_run(sqlite_store, full)["checkpoint_path"]), Path(done["checkpoint_path"]), 1e-5)
    code, _, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--resume", killed["id"])
    assert code == 1 and "already finished" in err
    code, _, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--resume", full, "--method", "lora")
    assert code == 1 and "--method 'lora' differs from the run's 'classifier'" in " ".join(err.split())


def _one_then_two_processes(store, capsys, args: list[str]) -> tuple[dict, dict]:
    """The finished runs of `protege ARGS` in one process, then with --nproc 2."""
    from protege.runs.registry import list_runs

    code, out, err = run(capsys, *args)
    assert code == 0, err
    one = get_run(store, run_id_in(out))
    code, out, err = run(capsys, *args, "--nproc", "2")
    assert code == 0, err
    two = list_runs(store, kind="train")[0]
    assert two["id"] != one["id"] and two["status"] == "done", two
    return one, two


def test_two_processes_match_one(sqlite_store, tmp_path, home, capsys):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from protege.bases import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)  # no dropout: the processes draw different masks
    base = tmp_path / "tiny-bert-nodrop"
    BertModel(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    task, _ = make_banking(sqlite_store, tmp_path, home)
    args = ["--db", sqlite_store.url, "train", str(task.path), "--base", str(base), "--method", "classifier",
            "--set", "epochs=2", "--set", "batch_size=16", "--set", "eval_every=4", "--set", "keep=last"]
    one, two = _one_then_two_processes(sqlite_store, capsys, args)
    assert two["metrics"]["processes"] == 2 and two["config"]["processes"] == 2
    assert two["metrics"]["steps"] == one["metrics"]["steps"]
    _assert_same_weights(Path(one["checkpoint_path"]), Path(two["checkpoint_path"]), 1e-4)
    assert [round(h["val_score"], 6) for h in one["metrics"]["history"]] == \
        [round(h["val_score"], 6) for h in two["metrics"]["history"]]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_two_processes_match_one(sqlite_store, tmp_path, home, tiny_llama, capsys, method):
    """strategy fsdp shards the tiny Llama's blocks over 2 gloo processes; the run (its
    evaluations, checkpoints and the gathered export) matches one process."""
    from transformers import AutoModelForCausalLM

    task, _ = make_banking(sqlite_store, tmp_path, home)
    args = ["--db", sqlite_store.url, "train", str(task.path), "--base", tiny_llama, "--method", method,
            "--set", "strategy=fsdp", "--set", "epochs=1", "--set", "batch_size=16", "--set", "eval_every=3",
            "--set", "eval_rows=6", "--set", "keep=last", "--set", "lora_dropout=0", "--set", "lr=1e-3"]
    one, two = _one_then_two_processes(sqlite_store, capsys, args)
    assert two["metrics"]["processes"] == 2 and two["metrics"]["strategy"] == "fsdp"
    assert two["metrics"]["steps"] == one["metrics"]["steps"] >= 3
    _assert_same_weights(Path(one["checkpoint_path"]), Path(two["checkpoint_path"]), 1e-4)
    assert [h["val_score"] for h in one["metrics"]["history"]] == [h["val_score"] for h in two["metrics"]["history"]]
    assert AutoModelForCausalLM.from_pretrained(two["checkpoint_path"]) is not None  # plain transformers loads it
    if method == "lora":
        assert (Path(two["checkpoint_path"]).parent / "adapter" / "adapter_model.safetensors").exists()
        _kill_and_resume_sharded(sqlite_store, tmp_path, task, tiny_llama, home, args, two, capsys)


FSDP_KILL_SCRIPT = """
import os, sys
from protege.datasets.registry import get_dataset
from protege.tasks.spec import load_task
from protege.train.api import train
from protege.train.recipe import load_recipe
from protege.traces.store import Store

url, task_path, base, home, kill_at = sys.argv[1:6]
store = Store(url)
task = load_task(task_path)

def on_step(step):
    if step == int(kill_at):
        os.kill(os.getpid(), 9)

train(store, task, get_dataset(store, task.name), home, base, "lora", load_recipe("lora", overrides=sys.argv[6:]),
      on_step=on_step)
"""


def _kill_and_resume_sharded(store, tmp_path, task, base, home, args, uninterrupted, capsys):
    """Both processes of an FSDP run are killed after its first checkpoint; --resume with 2
    processes ends with the uninterrupted run's weights."""
    import os
    import subprocess
    import sys

    from protege.runs.registry import list_runs

    script = tmp_path / "fsdp_kill.py"
    script.write_text(FSDP_KILL_SCRIPT)
    overrides = [a for a, prev in zip(args, ["", *args]) if prev == "--set"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           str(script), store.url, str(task.path), base, str(home), "5", *overrides],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    killed = list_runs(store, kind="train")[0]
    assert killed["id"] != uninterrupted["id"] and killed["status"] == "running", proc.stderr[-2000:]
    code, _, err = run(capsys, "--db", store.url, "train", str(task.path), "--resume", killed["id"], "--nproc", "2")
    assert code == 0, err
    done = get_run(store, killed["id"])
    assert done["status"] == "done" and done["metrics"]["resumed"] and done["metrics"]["strategy"] == "fsdp"
    assert done["metrics"]["steps"] == uninterrupted["metrics"]["steps"]
    _assert_same_weights(Path(uninterrupted["checkpoint_path"]), Path(done["checkpoint_path"]), 1e-5)


def test_fsdp_is_refused_where_it_cannot_run(tmp_path):
    from protege.train.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="strategy"):
        load_recipe("classifier", None, ["strategy=fsdp"])
    with pytest.raises(RecipeError, match="strategy"):
        load_recipe("lora", None, ["strategy=zero3"])


def test_distill_relabels_with_the_teacher_then_trains(sqlite_store, tmp_path, home, tiny_llama, capsys):
    from protege.testing import ScriptedUpstream

    task, ds = make_banking(sqlite_store, tmp_path, home)
    # the teacher answers every train input with one label: easy to tell its labels from the gold ones
    up = ScriptedUpstream(model="teacher-1", reply=lambda req: "pin_blocked").start()
    try:
        teacher = f"openai:teacher-1@{up.url}?concurrency=2"
        args = ["--db", sqlite_store.url, "train", str(task.path), "--base", tiny_llama, "--method", "distill",
                "--set", f"teacher={teacher}", "--set", "epochs=1", "--set", "eval_rows=4", "--set", "batch_size=16"]
        code, out, err = run(capsys, *args)
        assert code == 0, err
        run_id = run_id_in(out)
        r = get_run(sqlite_store, run_id)
        assert r["config"]["method"] == "distill" and r["config"]["distilled_from"] == teacher
        distilled = r["config"]["dataset"]
        assert distilled != ds.id and distilled.startswith("bank6@")
        from protege.datasets.registry import get_dataset

        new = get_dataset(sqlite_store, distilled)
        train_rows = new.split("train")
        assert len(train_rows) == len(ds.split("train")) and {x["reference"] for x in train_rows} == {"pin_blocked"}
        assert new.split("test") == ds.split("test")  # the benchmark keeps its references
        assert new.manifest["steps"][-1]["name"] == "distill"
        calls = up.count
        assert calls == len(train_rows)
        code, out, err = run(capsys, *args)  # again: answers come from the cache, same dataset version
        assert code == 0, err
        assert up.count == calls
        assert get_run(sqlite_store, run_id_in(out))["config"]["dataset"] == distilled
        assert json.loads((Path(r["checkpoint_path"]) / "protege.json").read_text())["method"] == "distill"
        code, _, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--base", tiny_llama,
                           "--method", "distill")
        assert code == 1 and "method distill needs a teacher" in err
    finally:
        up.stop()


def test_grpo_on_top_of_sft_logs_rewards_and_benches(sqlite_store, tmp_path, home, tiny_llama, capsys):
    from protege.bench.run import run_bench
    from protege.train.grpo import reward_function

    task, ds = make_banking(sqlite_store, tmp_path, home)
    code, out, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--base", tiny_llama,
                         "--method", "lora", "--set", "epochs=1", "--set", "eval_rows=4")
    assert code == 0, err
    sft = run_id_in(out)
    code, out, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--base", f"run:{sft}",
                         "--method", "grpo", "--set", "epochs=0.2", "--set", "batch_size=2", "--set", "group_size=3",
                         "--set", "max_new_tokens=6", "--set", "eval_every=3", "--set", "eval_rows=4")
    assert code == 0, err
    run_id = run_id_in(out)
    r = get_run(sqlite_store, run_id)
    m = r["metrics"]
    assert r["config"]["base"] == f"run:{sft}" and m["reward"] == "accuracy"
    logged = [h for h in m["history"] if h["step"] > 0]
    assert logged and all(0 <= h["train_reward"] <= 1 and h["train_kl"] >= 0 for h in logged)
    folder = Path(r["checkpoint_path"])
    assert json.loads((folder / "protege.json").read_text())["method"] == "grpo"
    report = run_bench(sqlite_store, task, ds, home, [f"run:{run_id}"], limit=3, latency_samples=1)
    assert all(p.output in task.labels for p in report.results[0].outputs)
    name, reward = reward_function(task, "chrf")
    assert name == "chrf" and reward(["card arrival"], ["card_arrival"])[0] < 1.0
    with pytest.raises(ProtegeError, match="not a per-example score"):
        reward_function(task, "macro_f1")


def test_shared_prefix_gives_the_same_loss_and_gradients(tmp_path, home, tiny_llama):
    """Running the system prompt once per batch from its cache changes the compute, not the
    loss or the gradients; examples that do not share a prefix fall back to whole rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from protege.tasks.spec import load_task
    from protege.train.sft import CompletionLoss, encode, shared_prefix

    p = tmp_path / "t.yaml"
    p.write_text("name: t\nkind: classification\nlabels: [card_arrival, lost_or_stolen_card]\n"
                 "prompt: {system: Classify the bank customer's message.}\n")
    task, tok = load_task(p), AutoTokenizer.from_pretrained(tiny_llama)
    texts = ["where is my card", "I lost my card yesterday and need a new one", "card?"]
    examples = [encode(tok, task, t, lab, 256) for t, lab in zip(texts, ["card_arrival", "lost_or_stolen_card",
                                                                        "card_arrival"])]
    L = shared_prefix(examples)
    system = tok.apply_chat_template([{"role": "system", "content": "Classify the bank customer's message."}],
                                     tokenize=False)
    assert L >= len(tok(system).input_ids)  # at least the whole system turn
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    grads = []
    for share in (True, False):
        loss_module = CompletionLoss(model, examples, tok.pad_token_id or 0, share_prefix=share)
        assert loss_module.shared == (L if share else 0)
        model.zero_grad()
        loss = loss_module([0, 1, 2], 1.0)
        loss.backward()
        grads.append((loss.item(), {n: q.grad.clone() for n, q in model.named_parameters()}))
    (a, ga), (b, gb) = grads
    assert abs(a - b) < 1e-4 * abs(b)
    assert all(torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4) for n in ga)
    cut = encode(tok, task, "word " * 300, "card_arrival", 64)  # its prompt lost its beginning
    assert shared_prefix(examples + [cut]) == 0


def test_bf16_precision_trains_in_bf16_and_saves_fp32(sqlite_store, tmp_path, home, tiny_llama, capsys):
    import torch
    from safetensors import safe_open

    from protege.train.common import native_bf16, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    task, _ = make_banking(sqlite_store, tmp_path, home)
    weights = {}
    for precision in ("fp32", "bf16"):
        code, out, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--base", tiny_llama,
                             "--method", "full", "--set", "epochs=1", "--set", "eval_every=100",
                             "--set", "eval_rows=4", "--set", "lr=1e-3", "--set", "keep=last",
                             "--set", f"precision={precision}")
        assert code == 0, err
        r = get_run(sqlite_store, run_id_in(out))
        assert r["metrics"]["precision"] == precision and r["config"]["recipe"]["precision"] == precision
        with safe_open(Path(r["checkpoint_path"]) / "model.safetensors", "pt") as f:
            weights[precision] = {k: f.get_tensor(k) for k in f.keys()}
    assert all(t.dtype == torch.float32 for t in weights["bf16"].values())  # master weights stay fp32
    # the same seed and data: only the arithmetic differs, a little
    diffs = [(weights["bf16"][k] - weights["fp32"][k]).abs().max().item() for k in weights["fp32"]]
    assert 0 < max(diffs) < 0.05
    with pytest.raises(RecipeError, match="--set precision: Input should be 'fp32', 'bf16' or 'auto'"):
        load_recipe("lora", overrides=["precision=fp16"])


class _LineJob:
    """The least a training method writes: a 2-weight linear fit through the `Job` protocol."""

    unit = "ex"

    def __init__(self, folder: Path):
        import torch

        torch.manual_seed(0)
        self.folder, self.model = folder, torch.nn.Linear(2, 1)
        self.x = torch.randn(12, 2)
        self.y = self.x @ torch.tensor([[1.0], [-2.0]])
        job = self

        class Loss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = job.model

            def forward(self, idx, weight):
                return ((self.model(job.x[idx]) - job.y[idx]) ** 2).sum() * weight

        self.loss, self.lengths, self.metrics, self.validates = Loss(), [1] * 12, {"train_rows": 12}, False
        self.exported: list[dict] = []

    def count(self, idx):
        return len(idx)

    def work(self, idx):
        return len(idx)

    def param_groups(self):
        return [{"params": list(self.model.parameters()), "lr": 0.1}]

    def evaluate(self):
        raise AssertionError("no validation split: the loop must not evaluate")

    def stats(self):
        return {}

    def export(self, metrics):
        self.exported.append(metrics)
        return self.folder


def test_any_class_with_the_job_protocol_trains(tmp_path):
    """The loop needs nothing from a method but the protocol's members; each built-in method
    implements them, and only the causal-LM SFT job can be sharded."""
    from protege.train.classifier import ClassifierJob
    from protege.train.grpo import GRPOJob
    from protege.train.job import Job, ShardableJob
    from protege.train.loop import run_loop
    from protege.train.recipe import load_recipe
    from protege.train.sft import SFTJob

    methods = [m for m in dir(ShardableJob) if not m.startswith("_") and callable(getattr(ShardableJob, m))]
    assert set(methods) == {"count", "work", "param_groups", "evaluate", "stats", "export", "rebuild"}
    for cls in (ClassifierJob, SFTJob, GRPOJob):
        assert all(callable(getattr(cls, m, None)) for m in methods if m != "rebuild"), cls
    assert [callable(getattr(cls, "rebuild", None)) for cls in (ClassifierJob, SFTJob, GRPOJob)] == \
        [False, True, False]
    job = _LineJob(tmp_path)
    assert isinstance(job, Job) and not isinstance(job, ShardableJob)
    error = lambda: float(((job.model(job.x) - job.y) ** 2).mean().detach())  # noqa: E731
    before = error()
    recipe = load_recipe("classifier", overrides=["epochs=20", "batch_size=4", "warmup_fraction=0"])
    metrics = run_loop(None, "line", tmp_path, job, recipe)
    assert metrics["steps"] == 60 and metrics["best_step"] == 60 and metrics["best_val_score"] is None
    assert metrics["history"] == [] and metrics["train_rows"] == 12 and job.exported == [metrics]
    assert error() < before / 10  # it learned
    assert not (tmp_path / "checkpoint").exists()
