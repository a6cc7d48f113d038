"""Make the demo's two trace files from BANKING77 and GPT-4's real answers on it.

Run: python examples/banking77/convert.py [SHARED_DATA_DIR]   (default ../shared/data)

- `tickets.jsonl.gz`: the 10,003 BANKING77 training messages as the team's labelled support
  tickets: the customer's message and the intent a support agent gave it (the human label).
- `gpt4_calls.jsonl.gz`: the app's 3,080 logged GPT-4 calls: the system prompt the app sent
  (below), the customer's message (the BANKING77 test split) and GPT-4's real answer
  (OCaTS, Stogiannidis et al. 2023), with the team's human review of each call attached as
  trace feedback: `feedback.correction` is BANKING77's human label.

Sources and licences: SOURCE.md (BANKING77, CC BY 4.0; GPT-4 answers, MIT).
"""

import csv
import gzip
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
MODEL = "gpt-4"


def system_prompt(labels: list[str]) -> str:
    """The prompt this demo says the app sent with every call (the source file does not hold
    the prompt the paper's authors used; the cost figures are computed on this one)."""
    return (
        "You are the intent classifier of a digital bank's customer-support assistant.\n"
        "Read the customer's message and answer with exactly one intent name from this list, "
        "and nothing else:\n" + "\n".join(f"- {label}" for label in labels)
    )


def write(out: Path, records: list[dict]) -> int:
    # mtime=0 keeps the .gz byte-identical across runs
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        for record in records:
            gz.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
    return len(records)


def read_csv(path: Path, labels: list[str], *columns: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for n, row in enumerate(rows, 2):
        for col in columns:
            if row[col] not in labels:
                raise SystemExit(f"{path}:{n}: unknown intent {row[col]!r} in column {col}")
    return rows


def tickets(src: Path, labels: list[str]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": row["text"]},
                          {"role": "assistant", "content": row["category"]}],
             "metadata": {"origin": "support ticket", "labelled_by": "support agent (BANKING77 human label)"}}
            for row in read_csv(src / "banking77" / "train.csv", labels, "category")]


def gpt4_calls(src: Path, labels: list[str]) -> list[dict]:
    prompt = system_prompt(labels)
    test = read_csv(src / "banking77" / "test.csv", labels, "category")
    answers = read_csv(src / "banking77" / "frontier" / "gpt4_test.csv", labels, "category", "gpt4_category")
    if [(r["text"], r["category"]) for r in test] != [(r["text"], r["category"]) for r in answers]:
        raise SystemExit("frontier/gpt4_test.csv is not row-aligned with banking77/test.csv")
    return [{"model": MODEL,
             "messages": [{"role": "system", "content": prompt}, {"role": "user", "content": row["text"]},
                          {"role": "assistant", "content": row["gpt4_category"]}],
             "feedback": {"correction": row["category"], "by": "support team review (BANKING77 human label)"},
             "metadata": {"origin": "app log", "answered_by": "GPT-4 (OCaTS, Stogiannidis et al. 2023)"}}
            for row in answers]


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data"
    labels = json.loads((src / "banking77" / "categories.json").read_text())
    (HERE / "categories.json").write_text(json.dumps(labels, indent=1) + "\n")
    print(f"tickets: {write(HERE / 'tickets.jsonl.gz', tickets(src, labels)):,} -> tickets.jsonl.gz")
    calls = gpt4_calls(src, labels)
    agree = sum(c["messages"][2]["content"] == c["feedback"]["correction"] for c in calls)
    print(f"GPT-4 calls: {write(HERE / 'gpt4_calls.jsonl.gz', calls):,} -> gpt4_calls.jsonl.gz "
          f"(GPT-4 agrees with the human review on {agree:,}: {agree / len(calls):.4f})")


if __name__ == "__main__":
    main()
