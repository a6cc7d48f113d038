"""Export traces as OpenAI fine-tuning JSONL: `{"messages": [...request..., assistant reply]}`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import orjson

from .store import Store


def export_finetune_jsonl(store: Store, out: str | Path, **filters) -> int:
    """Write successful chat traces to `out`; returns the number of lines written.

    The file is written to a temporary name and renamed at the end, so an interrupted
    export never leaves a half-written file behind.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    n = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            for row in store.iter_traces(status="ok", endpoint="chat/completions", **filters):
                messages = (row["request"] or {}).get("messages")
                if not isinstance(messages, list) or row["output_text"] is None:
                    continue
                line = {"messages": messages + [{"role": "assistant", "content": row["output_text"]}]}
                fh.write(orjson.dumps(line) + b"\n")
                n += 1
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n
