"""The API price table: USD per 1M tokens, per provider and model, with the date it was quoted.

protege ships a dated copy (`data/api_prices.csv`, sources in `data/PRICES_SOURCE.md`); a
user overrides it with their own CSV of the same columns (`--prices FILE`, `PROTEGE_PRICES`,
or `prices.csv` in the home folder). Every cost protege prints comes from this table and is
shown with its `as_of` date; a model not in the table has unknown cost, never a guess.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .errors import InputError

DEFAULT_HARDWARE_USD_PER_HOUR = 0.10
"""Assumed price of the 2-vCPU cloud machine a CPU model runs on; pass your own with
--hardware-usd-per-hour. Shown next to every self-hosted cost."""

COLUMNS = ["provider", "model", "input_usd_per_1m", "cached_input_usd_per_1m", "output_usd_per_1m", "as_of", "source"]
_DATED_SUFFIX = re.compile(r"-\d")


@dataclass(frozen=True)
class Price:
    provider: str
    model: str
    input_usd_per_1m: float
    cached_input_usd_per_1m: float | None
    output_usd_per_1m: float
    as_of: str
    source: str

    def cost(self, prompt_tokens: int | None, completion_tokens: int | None, cached_tokens: int | None = None) -> float | None:
        """USD for one request; None when the token counts are unknown."""
        if prompt_tokens is None or completion_tokens is None:
            return None
        cached = cached_tokens or 0
        cached_rate = self.cached_input_usd_per_1m if self.cached_input_usd_per_1m is not None else self.input_usd_per_1m
        return ((prompt_tokens - cached) * self.input_usd_per_1m + cached * cached_rate
                + completion_tokens * self.output_usd_per_1m) / 1e6


class PriceTable:
    def __init__(self, prices: list[Price], path: str):
        self.prices = prices
        self.path = path
        self._by_model = {p.model.lower(): p for p in prices}

    def lookup(self, model: str | None, provider: str | None = None) -> Price | None:
        """The price for a model name as an API reports it.

        Matches the exact name, else the longest table name followed by a dated snapshot
        suffix (`gpt-4o-mini-2024-07-18` is priced as `gpt-4o-mini`; `gpt-5-pro` is not `gpt-5`).
        A `provider/` prefix (`openai/gpt-4o`) is ignored.
        """
        if not model or not isinstance(model, str):  # a request's `model` is user input: 123 is no name
            return None
        name = model.lower().rsplit("/", 1)[-1]
        if name in self._by_model:
            return self._by_model[name]
        best = None
        for key, price in self._by_model.items():
            if name.startswith(key) and _DATED_SUFFIX.match(name, len(key)):
                if best is None or len(key) > len(best.model):
                    best = price
        return best

    def cost(self, model: str | None, prompt_tokens: int | None, completion_tokens: int | None,
             cached_tokens: int | None = None) -> float | None:
        price = self.lookup(model)
        return price.cost(prompt_tokens, completion_tokens, cached_tokens) if price else None


def _parse_float(value: str, path: str, line: int, column: str, optional: bool = False) -> float | None:
    value = value.strip()
    if value == "" and optional:
        return None
    try:
        number = float(value)
    except ValueError:
        raise InputError(path, line, f"column {column!r}: expected a number of USD per 1M tokens, found {value!r}") from None
    if number < 0:
        raise InputError(path, line, f"column {column!r}: price cannot be negative ({value})")
    return number


def load_prices(path: str | Path | None = None) -> PriceTable:
    """Read and validate a price table; the shipped one when `path` is None."""
    if path is None:
        text = resources.files("protege").joinpath("data/api_prices.csv").read_text("utf-8")
        return _parse(text, "protege/data/api_prices.csv")
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(str(path), None, f"cannot read price table: {exc}") from None
    return _parse(text, str(path))


@lru_cache(maxsize=8)
def cached_prices(path: str | None) -> PriceTable:
    return load_prices(path)


def _parse(text: str, path: str) -> PriceTable:
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise InputError(path, 1, "empty price table; expected a header row: " + ",".join(COLUMNS))
    header = [h.strip() for h in header]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise InputError(path, 1, f"missing column(s) {', '.join(missing)}; expected: {','.join(COLUMNS)}")
    idx = {c: header.index(c) for c in COLUMNS}
    prices, seen = [], {}
    for line, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise InputError(path, line, f"expected {len(header)} fields, found {len(row)}")
        model = row[idx["model"]].strip()
        if not model:
            raise InputError(path, line, "column 'model' is empty")
        if model.lower() in seen:
            raise InputError(path, line, f"model {model!r} is listed twice (first on line {seen[model.lower()]})")
        seen[model.lower()] = line
        prices.append(Price(
            provider=row[idx["provider"]].strip(),
            model=model,
            input_usd_per_1m=_parse_float(row[idx["input_usd_per_1m"]], path, line, "input_usd_per_1m"),
            cached_input_usd_per_1m=_parse_float(row[idx["cached_input_usd_per_1m"]], path, line,
                                                 "cached_input_usd_per_1m", optional=True),
            output_usd_per_1m=_parse_float(row[idx["output_usd_per_1m"]], path, line, "output_usd_per_1m"),
            as_of=row[idx["as_of"]].strip(),
            source=row[idx["source"]].strip(),
        ))
    return PriceTable(prices, path)
