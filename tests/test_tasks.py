"""Task files and metrics: every error at once with its line; metrics against hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from protege.bench.stats import bootstrap, paired
from protege.errors import ProtegeError
from protege.tasks.metrics import get_metric, macro_f1, normalize_text
from protege.tasks.spec import Normalize, TaskError, load_task

ROOT = Path(__file__).parents[1]


def write(tmp_path, text, name="task.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_task_files_load():
    t = load_task(ROOT / "examples" / "banking77" / "task.yaml")
    assert t.kind == "classification" and len(t.labels) == 77 and t.metric_names == ["accuracy", "macro_f1"]
    assert t.references == "feedback" and t.split.test == "reviewed"
    first = (ROOT / "examples" / "banking77" / "task.yaml").read_text().splitlines()[0]
    assert first == "# protege dataset build examples/banking77/task.yaml"


def test_every_error_reported_at_once_with_lines(tmp_path):
    p = write(tmp_path, """name: bad name!
kind: classification
labels: [a, b]
split:
  method: sideways
  test_fraction: 1.5
prompt:
  template: no placeholder
dedupe:
  near_treshold: 0.8
""")
    with pytest.raises(TaskError) as info:
        load_task(p)
    msg = str(info.value)
    assert msg.startswith("5 problem(s) in task file:")
    assert f"{p}:1: name: String should match pattern" in msg
    assert f"{p}:5: split.method: Input should be 'stratified', 'temporal' or 'random'" in msg
    assert f"{p}:6: split.test_fraction: Input should be less than 1" in msg
    assert f"{p}:8: prompt.template: must contain the placeholder {{input}}" in msg
    assert f"{p}:10: dedupe.near_treshold: unknown key" in msg


@pytest.mark.parametrize("text, message", [
    ("name: t\nkind: classification\n", "classification needs `labels` or `labels_file`"),
    ("name: t\nkind: extraction\nsplit: {method: random}\n", "extraction needs `schema` or `schema_file`"),
    ("name: t\nkind: generation\n", "split.method stratified needs kind classification"),
    ("name: t\nkind: translation\n", "kind: Input should be 'classification', 'generation' or 'extraction'"),
    ("- just\n- a list\n", "a task file is a YAML mapping"),
    ("name: [unclosed\n", ":2: not valid YAML"),
    ("name: t\nkind: classification\nlabels_file: nope.json\n", "labels_file"),
    ("name: t\nkind: extraction\nsplit: {method: random}\nschema: {type: 12}\n", "schema is not a valid JSON schema"),
])
def test_bad_task_files(tmp_path, text, message):
    with pytest.raises(TaskError, match=None) as info:
        load_task(write(tmp_path, text))
    assert message in str(info.value)


def test_normalize():
    cfg = Normalize(lowercase=True, strip_punctuation=True)
    assert normalize_text("  Card  Arrival!\n", cfg) == "card arrival"
    assert normalize_text("  Card  Arrival!\n", Normalize()) == "Card Arrival!"
    assert normalize_text(None, Normalize()) == ""


def test_classification_metrics_by_hand():
    refs = ["a", "a", "b", "b", "c"]
    preds = ["a", "b", "b", "b", "a"]
    assert get_metric("accuracy").score(preds, refs) == pytest.approx(3 / 5)
    # F1 a: tp1 fp1 fn1 -> 0.5; b: tp2 fp1 fn0 -> 0.8; c: tp0 fp0 fn1 -> 0
    assert macro_f1(preds, refs) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_macro_f1_of_every_resample_at_once_matches_the_definition():
    """The bench bootstraps macro-F1 over 1,000 resamples in one vectorised count; each must
    equal macro-F1 computed the slow way on that resample (classes it holds, 2TP/(2TP+FP+FN))."""
    import numpy as np

    from protege.tasks.metrics import macro_f1_resampled

    def slow(p, r):
        f1s = []
        for c in set(p) | set(r):
            tp = sum(a == c and b == c for a, b in zip(p, r))
            fp = sum(a == c and b != c for a, b in zip(p, r))
            fn = sum(a != c and b == c for a, b in zip(p, r))
            f1s.append(2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0)
        return sum(f1s) / len(f1s)

    rng = np.random.default_rng(1)
    labels = [f"l{i}" for i in range(9)]
    refs = [labels[i] for i in rng.integers(0, 9, 120)]
    preds = [r if rng.random() < 0.7 else labels[rng.integers(0, 9)] for r in refs]
    idx = rng.integers(0, 120, size=(25, 120))
    fast = macro_f1_resampled(preds, refs, idx)
    assert fast == pytest.approx([slow([preds[i] for i in row], [refs[i] for i in row]) for row in idx])
    assert macro_f1(preds, refs) == pytest.approx(slow(preds, refs))


def test_generation_metrics():
    assert get_metric("exact_match").score(["x y", "z"], ["x y", "w"]) == 0.5
    chrf = get_metric("chrf").per_example(["the cat sat", "completely different"], ["the cat sat", "the cat sat"])
    assert chrf[0] == pytest.approx(1.0) and chrf[1] < 0.2
    # ROUGE-L F: LCS("a b c d", "a c d e") = 3 -> P=3/4, R=3/4, F=0.75
    assert get_metric("rouge_l").per_example(["a b c d"], ["a c d e"])[0] == pytest.approx(0.75)


def test_extraction_metrics():
    ref = json.dumps({"name": "Ann", "city": "Oslo", "tags": ["x", "y"]})
    preds = [json.dumps({"name": "Ann", "city": "Bergen", "tags": ["x"]}), "not json", "```json\n" + ref + "\n```"]
    assert list(get_metric("json_valid").per_example(preds, [ref] * 3)) == [1.0, 0.0, 1.0]
    # pairs: ref {name, city, tags[]x, tags[]y} = 4; pred {name, city(B), tags[]x} = 3; tp = 2 -> 2*2/7
    assert list(get_metric("field_f1").per_example(preds, [ref] * 3)) == pytest.approx([4 / 7, 0.0, 1.0])


def test_user_metric_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "mymetrics.py").write_text("def starts(p, r):\n    return float(p[:1] == r[:1])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_metric("mymetrics:starts").score(["ab", "xb"], ["aa", "bb"]) == 0.5
    with pytest.raises(ProtegeError, match="cannot import nothere"):
        get_metric("mymetrics:nothere")
    with pytest.raises(ProtegeError, match="unknown metric 'bleu'"):
        get_metric("bleu")


def test_bootstrap_ci_contains_estimate_and_shrinks():
    rng = np.random.default_rng(1)
    metric = get_metric("accuracy")
    widths = []
    for n in (50, 500, 5000):
        refs = ["y"] * n
        preds = ["y" if x else "n" for x in rng.random(n) < 0.8]
        est = bootstrap(metric, preds, refs)
        assert est.low <= est.value <= est.high
        widths.append(est.high - est.low)
    assert widths[0] > widths[1] > widths[2]
    # macro-F1 (not a mean) bootstraps too
    est = bootstrap(get_metric("macro_f1"), ["a", "b", "a", "b"] * 20, ["a", "b", "b", "b"] * 20, resamples=200)
    assert est.low <= est.value <= est.high


def test_paired_test():
    metric = get_metric("accuracy")
    refs = ["y"] * 400
    better = ["y"] * 360 + ["n"] * 40
    worse = ["y"] * 300 + ["n"] * 100
    t = paired(metric, better, worse, refs)
    assert t.difference == pytest.approx(0.15) and t.low > 0 and t.p_value < 0.01
    same = paired(metric, better, better, refs)
    assert same.difference == 0 and same.p_value == 1.0
    assert math.isnan(bootstrap(metric, ["y"], ["y"]).low)


def test_canard_task_loads():
    t = load_task(ROOT / "examples" / "canard" / "task.yaml")
    assert t.kind == "generation" and t.split.group_by == "dialog_id" and t.metric_names == ["exact_match", "chrf", "rouge_l"]
