"""Convert BANKING77 (../../shared/data/banking77) into the traces a production app would log.

Run: python examples/banking77/convert.py [SOURCE_DIR]

Each row becomes one OpenAI chat transcript: a system prompt listing the 77 intents, the
customer's message, and the intent as the assistant's reply. The replies are the dataset's
human labels standing in for a frontier model's outputs (see README.md). The official test
split is written to its own file so it can become the frozen benchmark.
"""

import csv
import gzip
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
MODEL = "gpt-4.1-mini"  # the model this imagined app calls; see README.md


def system_prompt(labels: list[str]) -> str:
    return (
        "You are the intent classifier of a digital bank's customer-support assistant.\n"
        "Read the customer's message and answer with exactly one intent name from this list, "
        "and nothing else:\n" + "\n".join(f"- {label}" for label in labels)
    )


def convert(src: Path, split: str, labels: list[str], out: Path) -> int:
    prompt = system_prompt(labels)
    n = 0
    # mtime=0 keeps the .gz byte-identical across runs
    with open(src / f"{split}.csv", newline="", encoding="utf-8") as fh, \
            open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        for row in csv.DictReader(fh):
            if row["category"] not in labels:
                raise SystemExit(f"{src / (split + '.csv')}: unknown category {row['category']!r}")
            record = {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": prompt},
                    {"role": "user", "content": row["text"]},
                    {"role": "assistant", "content": row["category"]},
                ],
                "metadata": {"split": split, "label_source": "banking77 human label (stand-in for a frontier reply)"},
            }
            gz.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
            n += 1
    return n


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data" / "banking77"
    labels = json.loads((src / "categories.json").read_text())
    (HERE / "categories.json").write_text(json.dumps(labels, indent=1) + "\n")
    for split, name in (("train", "traces.jsonl.gz"), ("test", "test.jsonl.gz")):
        print(f"{split}: {convert(src, split, labels, HERE / name):,} traces -> {name}")


if __name__ == "__main__":
    main()
