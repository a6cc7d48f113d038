#!/usr/bin/env bash
# The end-to-end demo on the shipped BANKING77 traces (run it with `make demo`).
# Re-runnable: what is already done is reused (re-imports add nothing).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=examples/banking77

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/6 Import the app's logged traces (10,003 BANKING77 training queries)"
protege traces import "$here/traces.jsonl.gz" --task banking77

step "2/6 What is in the store"
protege traces stats --task banking77
protege traces list --task banking77 --limit 5

step "3/6 Capture live traffic through the logging proxy"
python "$here/capture_demo.py"

step "4/6 Export the task's traces as OpenAI fine-tuning JSONL"
protege traces export .protege/exports/banking77.jsonl --task banking77

step "5/6 Build the frozen dataset, with the official test split as the benchmark"
protege dataset build "$here/task.yaml" --test-from "$here/test.jsonl.gz"

step "6/6 Bench: the recorded replies vs the cheap 'don't train' baseline (MiniLM nearest neighbour)"
protege bench "$here/task.yaml" -c replay -c knn:minilm --json .protege/reports/bench-banking77.json

printf '\nThe store is %s; the bench report is .protege/reports/bench-banking77.json.\n' \
  "${PROTEGE_DATABASE_URL:-.protege/protege.db}"
printf 'Next stages (training, the train-or-not report, serving) are on the roadmap in README.md.\n'
