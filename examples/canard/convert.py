"""Convert CANARD (../../shared/data/canard/dev.json) into query-rewriting traces.

Run: python examples/canard/convert.py [SOURCE_DIR]

The pipeline step: a conversational search app rewrites the user's latest question into a
self-contained query before retrieval. Each CANARD example becomes one chat trace: the
conversation so far (article, section, earlier questions and answers) and the question
in the user message, the human rewrite as the assistant's reply. Only CANARD's official
dev split is available here, so it is split by QuAC dialog id, as its SOURCE.md says:
about 20% of the dialogs (chosen by a hash of the id, so the split is stable) become
the held-out test file, the rest the traces. The dialog id is kept in each trace's
metadata for `split.group_by`.
"""

import gzip
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
SYSTEM = ("You rewrite the user's latest question in a conversation about a Wikipedia article so that it can be "
          "understood on its own, without the conversation: resolve pronouns and references, keep the meaning. "
          "Reply with the rewritten question only.")


def user_message(ex: dict) -> str:
    title, section, *turns = ex["History"]
    lines = [f"Article: {title}", f"Section: {section}"]
    for i, turn in enumerate(turns):
        lines.append(("Q: " if i % 2 == 0 else "A: ") + turn)
    lines.append(f"Latest question: {ex['Question']}")
    return "\n".join(lines)


def is_test(dialog_id: str) -> bool:
    return int(hashlib.sha256(dialog_id.encode()).hexdigest(), 16) % 5 == 0


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data" / "canard"
    examples = json.loads((src / "dev.json").read_text())
    outs = {"traces.jsonl.gz": [], "test.jsonl.gz": []}
    for ex in examples:
        record = {
            "model": "gpt-4.1-mini",
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": user_message(ex)},
                         {"role": "assistant", "content": ex["Rewrite"]}],
            "metadata": {"dialog_id": ex["QuAC_dialog_id"], "question_no": ex["Question_no"],
                         "label_source": "CANARD human rewrite (stand-in for a frontier reply)"},
        }
        outs["test.jsonl.gz" if is_test(ex["QuAC_dialog_id"]) else "traces.jsonl.gz"].append(record)
    for name, rows in outs.items():
        with open(HERE / name, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
            for r in rows:
                gz.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")
        dialogs = len({r["metadata"]["dialog_id"] for r in rows})
        print(f"{name}: {len(rows):,} traces from {dialogs} dialogs")


if __name__ == "__main__":
    main()
