"""What one request to an API candidate costs: from the token counts it reported when it has
them (measured), else computed from stated inputs (the price table's row for the recorded
model, the prompt tokens of the recorded requests counted with the task's tokenizer, and the
reply tokens of the candidate's own answers). The bench stores the figure and its basis;
`protege decide` reads them back, so both show one computation the same way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models.base import Prediction
from ..tasks.spec import Task
from ..tasks.tokens import mean_token_count, task_tokenizer


@dataclass
class RequestCost:
    cost_per_1m: float | None
    basis: str
    tokens_in: float | None
    tokens_out: float | None
    tokens_basis: str


def measured_cost(preds: list[Prediction]) -> RequestCost | None:
    """From the candidate's own token counts and costs (priced calls, recorded usage)."""
    costs = [p.cost_usd for p in preds if p.cost_usd is not None]
    tokens = mean_tokens(preds)
    if not costs:
        if None not in tokens:
            return RequestCost(None, "unknown (the model is not in the price table)", *tokens,
                               "measured in the bench")
        return None
    basis = "price table x token counts" + ("" if len(costs) == len(preds)
                                            else f" ({len(costs)} of {len(preds)} requests priced)")
    return RequestCost(float(np.mean(costs)) * 1e6, basis, *tokens, "measured in the bench")


def mean_tokens(preds: list[Prediction]) -> tuple[float | None, float | None]:
    """Mean prompt and reply tokens over the predictions that report them."""
    tin = [p.prompt_tokens for p in preds if p.prompt_tokens is not None]
    tout = [p.completion_tokens for p in preds if p.completion_tokens is not None]
    return (float(np.mean(tin)) if tin else None, float(np.mean(tout)) if tout else None)


def computed_cost(rows: list[dict], preds: list[Prediction], task: Task, tokens_report: dict | None, prices,
                  home: Path) -> RequestCost:
    """For recorded replies without usage: the price of the recorded model times the task's
    token counts, labelled as computed."""
    models = Counter((r.get("recorded") or {}).get("model") for r in rows)
    models.pop(None, None)
    model = models.most_common(1)[0][0] if models else None
    tokens_in = (tokens_report or {}).get("original_prompt_tokens")
    tokenizer = (tokens_report or {}).get("tokenizer")
    tokens_out = count_tokens([p.output for p in preds], task, home)
    tokens_basis = (f"computed with the {tokenizer} tokenizer (prompt: the recorded requests; reply: the "
                    "recorded answers)") if tokens_in is not None and tokens_out is not None else \
        "unknown (the traces carry no token counts and the task names no tokenizer)"
    price = prices.lookup(model) if (prices is not None and model) else None
    if model is None:
        basis = "unknown (the traces name no model to price)"
    elif price is None:
        basis = f"unknown ({model} is not in the price table)"
    elif tokens_in is None or tokens_out is None:
        basis = "unknown (the traces carry no token counts and the task names no tokenizer)"
    else:
        cost = price.cost(round(tokens_in), round(tokens_out)) * 1e6
        return RequestCost(cost, f"computed, not measured: {model} at the price table's {price.as_of} prices x "
                           f"{tokens_in:.0f} prompt + {tokens_out:.0f} reply tokens per request (the "
                           f"{tokenizer} tokenizer)", tokens_in, tokens_out, tokens_basis)
    return RequestCost(None, basis, tokens_in, tokens_out, tokens_basis)


def count_tokens(texts: list[str], task: Task, home: Path) -> float | None:
    """Mean token count of `texts` with the task's tokenizer; None without one."""
    tok = task_tokenizer(task, home)
    return None if tok is None or not texts else mean_token_count(tok, [[t] for t in texts])
