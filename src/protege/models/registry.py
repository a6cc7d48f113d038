"""The table of candidate backends: which scheme builds which candidate.

    openai:MODEL@BASE_URL    any OpenAI-compatible endpoint (frontier API, vLLM, protege serve)
    replay                   the outputs recorded in the traces (the frontier model as it was)
    hf:ID_OR_PATH            a local causal LM (zero-/k-shot; constrained label decoding)
    knn:minilm               embedding nearest neighbour over the train split
    run:RUN_ID               a specialist trained by protege (`protege train`)

The built-ins are listed as data (`BUILTINS`: scheme -> "module:factory"), imported only
when a spec names them, so `protege --help` loads no model code. A plugin adds a scheme
with `register_candidate(scheme, factory)`, the same table the built-ins are read into.
A factory is called as `factory(rest, options, context)` and returns a `Candidate`.
"""

from __future__ import annotations

import importlib
from typing import Callable

from ..errors import ProtegeError
from .base import Candidate, Context, parse_spec

Factory = Callable[[str, dict[str, str], Context], Candidate]

BUILTINS: dict[str, str] = {
    "openai": "protege.models.openai_api:OpenAICandidate",
    "replay": "protege.models.replay:factory",
    "hf": "protege.models.causal:factory",
    "knn": "protege.models.knn:factory",
    "student": "protege.models.student:factory",
    "run": "protege.models.trained:factory",
}
_REGISTRY: dict[str, Factory] = {}


def register_candidate(scheme: str, factory: Factory) -> None:
    """Make `scheme:...` specs build candidates with `factory(rest, options, context)`."""
    _REGISTRY[scheme] = factory


def factory_for(scheme: str) -> Factory | None:
    if scheme not in _REGISTRY and scheme in BUILTINS:
        module, _, name = BUILTINS[scheme].partition(":")
        _REGISTRY[scheme] = getattr(importlib.import_module(module), name)
    return _REGISTRY.get(scheme)


def build_candidate(spec: str, ctx: Context) -> Candidate:
    scheme, rest, options = parse_spec(spec)
    factory = factory_for(scheme)
    if factory is None:
        known = sorted(set(BUILTINS) | set(_REGISTRY))
        raise ProtegeError(f"unknown candidate {spec!r}: the scheme must be one of {', '.join(known)} "
                           "(e.g. openai:gpt-4o-mini@https://api.openai.com/v1, replay, hf:smollm2-135m, knn:minilm, run:RUN_ID)")
    return factory(rest, options, ctx)
