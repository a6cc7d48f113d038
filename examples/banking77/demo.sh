#!/usr/bin/env bash
# The end-to-end demo on the shipped BANKING77 traces (run it with `make demo`).
# Re-runnable: what is already done is reused (re-imports add nothing).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=examples/banking77

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/7 Import the app's logged traces (10,003 BANKING77 training queries)"
protege traces import "$here/traces.jsonl.gz" --task banking77

step "2/7 What is in the store"
protege traces stats --task banking77
protege traces list --task banking77 --limit 5

step "3/7 Capture live traffic through the logging proxy"
python "$here/capture_demo.py"

step "4/7 Export the task's traces as OpenAI fine-tuning JSONL"
protege traces export .protege/exports/banking77.jsonl --task banking77

step "5/7 Build the frozen dataset, with the official test split as the benchmark"
protege dataset build "$here/task.yaml" --test-from "$here/test.jsonl.gz"

step "6/7 Train the specialist: MiniLM + classification head (about 5 minutes on 2 cores; reused when done)"
dataset_id=$(protege dataset show banking77 --json | python -c 'import json,sys; print(json.load(sys.stdin)["id"])')
run_id=$(protege runs list --task banking77 --kind train --json | python -c '
import json, sys
runs = [r for r in json.load(sys.stdin) if r["status"] == "done" and r["config"].get("method") == "classifier"
        and r["dataset_id"] == sys.argv[1]]
print(runs[0]["id"] if runs else "")' "$dataset_id")
if [ -z "$run_id" ]; then
  protege train "$here/task.yaml" --base minilm --method classifier --config recipes/classifier.yaml
  run_id=$(protege runs list --task banking77 --kind train --json | python -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
else
  echo "reusing training run $run_id"
fi

step "7/7 Bench: recorded replies vs the cheap baseline (MiniLM nearest neighbour) vs the trained specialist"
protege bench "$here/task.yaml" -c replay -c knn:minilm -c "run:$run_id" --json .protege/reports/bench-banking77.json

printf '\nThe store is %s; the bench report is .protege/reports/bench-banking77.json.\n' \
  "${PROTEGE_DATABASE_URL:-.protege/protege.db}"
printf 'Next stages (the train-or-not report, serving) are on the roadmap in README.md.\n'
