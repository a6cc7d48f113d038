#!/usr/bin/env bash
# The end-to-end demo on the shipped BANKING77 traces (run it with `make demo`).
# Re-runnable: what is already done is reused (re-imports add nothing).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=examples/banking77

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/10 Import the app's logged traces (10,003 BANKING77 training queries)"
protege traces import "$here/traces.jsonl.gz" --task banking77

step "2/10 What is in the store"
protege traces stats --task banking77
protege traces list --task banking77 --limit 5

step "3/10 Capture live traffic through the logging proxy"
python "$here/capture_demo.py"

step "4/10 Export the task's traces as OpenAI fine-tuning JSONL"
protege traces export .protege/exports/banking77.jsonl --task banking77

step "5/10 Build the frozen dataset, with the official test split as the benchmark"
protege dataset build "$here/task.yaml" --test-from "$here/test.jsonl.gz"

# the newest finished run of a method on this dataset (empty when there is none)
latest_run() {
  protege runs list --task banking77 --kind train --json | python -c '
import json, sys
runs = [r for r in json.load(sys.stdin) if r["status"] == "done" and r["config"].get("method") == sys.argv[1]
        and r["dataset_id"] == sys.argv[2] and not r["config"].get("train_fraction")]
print(runs[0]["id"] if runs else "")' "$1" "$dataset_id"
}
dataset_id=$(protege dataset show banking77 --json | python -c 'import json,sys; print(json.load(sys.stdin)["id"])')

step "6/10 Train the specialist: MiniLM + classification head (about 5 minutes on 2 cores; reused when done)"
clf=$(latest_run classifier)
if [ -z "$clf" ]; then
  protege train "$here/task.yaml" --base minilm --method classifier --config recipes/classifier.yaml
  clf=$(latest_run classifier)
else
  echo "reusing training run $clf"
fi

step "7/10 Train a small LM specialist: SmolLM2-135M + LoRA, a 3-minute run (reused when done)"
lora=$(latest_run lora)
if [ -z "$lora" ]; then
  protege train "$here/task.yaml" --base smollm2-135m --method lora --config recipes/lora.yaml \
    --set eval_rows=40 --set eval_every=40 --time-budget 3
  lora=$(latest_run lora)
else
  echo "reusing training run $lora"
fi

step "8/10 Learning curve: the classifier on 10% and 25% of the traces (the 100% point is the run above)"
protege curve "$here/task.yaml" --base minilm --method classifier --config recipes/classifier.yaml \
  --fractions 0.1,0.25,1.0 --limit 1000

step "9/10 Bench: recorded replies (the reference) vs the cheap baseline vs both specialists, on 600 test rows"
benched=$(protege runs list --task banking77 --kind bench --json | python -c '
import json, sys
print(any(r["config"].get("candidate") == "run:" + sys.argv[1] and r["dataset_id"] == sys.argv[2]
          for r in json.load(sys.stdin)))' "$lora" "$dataset_id")
if [ "$benched" = "True" ]; then
  echo "reusing the bench of run:$lora"
else
  protege bench "$here/task.yaml" -c replay -c knn:minilm -c "run:$clf" -c "run:$lora" --limit 600 \
    --json .protege/reports/bench-banking77.json
fi

step "10/10 Decide: should we train a specialist for this step?"
protege decide "$here/task.yaml" --monthly-requests 1000000 --html .protege/reports/decide-banking77.html \
  --md .protege/reports/decide-banking77.md

printf '\nThe store is %s.\n' "${PROTEGE_DATABASE_URL:-.protege/protege.db}"
printf 'The decision report: %s\n' "$(pwd)/.protege/reports/decide-banking77.html"
printf 'Serve the classifier: protege serve run:%s --port 8000   (OpenAI-compatible, /v1/chat/completions)\n' "$clf"
