"""The shipped BANKING77 demo data, end to end through the product: GPT-4's real answers,
scored against the human review, priced from the dated price table."""

from __future__ import annotations

from pathlib import Path

import pytest

from protege.bench.run import run_bench
from protege.datasets.build import build_dataset
from protege.datasets.registry import get_dataset
from protege.prices import load_prices
from protege.tasks.spec import load_task
from protege.traces.importers import ImportOptions, import_file

EXAMPLES = Path(__file__).parents[1] / "examples" / "banking77"


@pytest.fixture(scope="module")
def banking77(tmp_path_factory, model_cache):
    from protege.traces.store import Store

    home = tmp_path_factory.mktemp("b77home")
    mp = pytest.MonkeyPatch()
    mp.setenv("PROTEGE_MODEL_CACHE", str(model_cache))
    store = Store(f"sqlite:///{home / 'protege.db'}")
    for name in ("tickets.jsonl.gz", "gpt4_calls.jsonl.gz"):
        import_file(store, EXAMPLES / name, ImportOptions(task="banking77"))
    task = load_task(EXAMPLES / "task.yaml")
    ds = get_dataset(store, build_dataset(store, task, home).id)
    yield store, task, ds, home
    store.close()
    mp.undo()


def test_every_reviewed_gpt4_call_is_the_benchmark(banking77):
    _, _, ds, _ = banking77
    test = ds.split("test")
    assert len(test) == 3080 and all(r["recorded"]["model"] == "gpt-4" for r in test)
    train = ds.split("train") + ds.split("validation")
    assert not {r["input"] for r in train} & {r["input"] for r in test}
    assert all(r["recorded"]["model"] is None for r in train)  # the tickets: no model answered them
    tokens = ds.manifest["tokens"]
    assert tokens["rows_measured"] == 500 and tokens["original_prompt_tokens"] > 400  # the 77 intents listed


def test_gpt4_measured_against_the_human_review_and_priced_as_computed(banking77):
    store, task, ds, home = banking77
    report = run_bench(store, task, ds, home, ["replay"], prices=load_prices())
    (gpt4,) = report.results
    assert report.rows == 3080
    assert gpt4.metrics["accuracy"]["value"] == pytest.approx(2558 / 3080)
    assert round(gpt4.metrics["accuracy"]["value"], 4) == 0.8305
    assert gpt4.latency_ms["p50"] is None and "unknown" in gpt4.latency_ms["note"]
    tin, tout = ds.manifest["tokens"]["original_prompt_tokens"], gpt4.tokens["out"]
    assert gpt4.tokens["in"] == tin and 1 <= tout < 15
    # the 2023 list price of gpt-4: $30 in, $60 out per 1M tokens
    assert gpt4.cost_per_1m_usd == pytest.approx(30 * round(tin) + 60 * round(tout))
    assert gpt4.cost_basis.startswith("computed, not measured: gpt-4 at the price table's 2023-04 prices")
    assert "smollm2-135m tokenizer" in gpt4.cost_basis and "computed" in gpt4.tokens_basis
