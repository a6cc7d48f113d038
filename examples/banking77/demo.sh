#!/usr/bin/env bash
# The end-to-end demo on the shipped BANKING77 data (run it with `make demo`; `make demo-full`
# adds a SmolLM2-135M LoRA specialist and a MiniLM student fine-tuned on GPT-4's answers alone,
# about 20 more minutes after `make demo`). The story: an app calls GPT-4 to route support
# messages; GPT-4's real answers are logged and the team reviewed them
# (examples/banking77/README.md).
# Re-runnable: what is already done is reused.
set -euo pipefail
shopt -s inherit_errexit  # a failing command inside $(...) stops the demo too
cd "$(dirname "$0")/../.."
here=examples/banking77
full=${PROTEGE_DEMO_FULL:-0}
reports=.protege/reports
mkdir -p "$reports"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/8 Import the app's 3,080 logged GPT-4 calls (with the team's review as feedback) and 10,003 labelled tickets"
protege traces import "$here/gpt4_calls.jsonl.gz" --task banking77
protege traces import "$here/tickets.jsonl.gz" --task banking77
protege traces stats --task banking77

step "2/8 Capture live traffic through the logging proxy"
python "$here/capture_demo.py"

step "3/8 Build the frozen dataset: every reviewed GPT-4 call is the benchmark, the tickets train"
protege dataset build "$here/task.yaml"
dataset_id=$(protege dataset show banking77 --json | python -c 'import json,sys; print(json.load(sys.stdin)["id"])')

# the newest finished run of a method on this dataset (empty when there is none)
latest_run() {
  protege runs list --task banking77 --kind train --json | python -c '
import json, sys
runs = [r for r in json.load(sys.stdin) if r["status"] == "done" and r["config"].get("method") == sys.argv[1]
        and r["dataset_id"] == sys.argv[2] and not r["config"].get("train_fraction")]
print(runs[0]["id"] if runs else "")' "$1" "$dataset_id"
}

# train_once METHOD ARGS...: the newest finished run of METHOD, trained with ARGS when there is none
train_once() {
  local method=$1 id
  shift
  id=$(latest_run "$method")
  if [ -z "$id" ]; then
    protege train "$here/task.yaml" --method "$method" "$@" >&2
    id=$(latest_run "$method")
    [ -n "$id" ] || { echo "demo: protege train --method $method finished no run" >&2; exit 1; }
  else
    echo "reusing training run $id" >&2
  fi
  echo "$id"
}

step "4/8 Train the specialist on the labelled tickets: MiniLM + classification head, 1.25 epochs (about 2 minutes; reused when done)"
clf=$(train_once classifier --base minilm --config recipes/classifier.yaml --set epochs=1.25)
candidates=(-c replay -c knn:minilm -c "student:knn:minilm?folds=3" -c "run:$clf")

if [ "$full" = 1 ]; then
  step "4b/8 Train a small LM specialist: SmolLM2-135M + LoRA, a 3-minute run (reused when done)"
  lora=$(train_once lora --base smollm2-135m --config recipes/lora.yaml --set eval_rows=40 --set eval_every=40 \
    --time-budget 3)
  step "4c/8 Fine-tune a student on GPT-4's answers alone (no human label): MiniLM, 3 folds, 2 epochs each (reused when done)"
  student=$(train_once student --base minilm --config recipes/student.yaml --set epochs=2)
  candidates+=(-c "run:$lora" -c "run:$student")
else
  echo "(skipped: the SmolLM2-135M LoRA specialist and the MiniLM student fine-tuned on GPT-4's answers;"
  echo " \`make demo-full\` trains and benches them too)"
fi

step "5/8 Learning curve: the classifier on 10% and 25% of the tickets (the 100% point is the run above)"
protege curve "$here/task.yaml" --base minilm --method classifier --config recipes/classifier.yaml --set epochs=1.25 \
  --fractions 0.1,0.25,1.0 --limit 1000

step "6/8 Bench on all 3,080 reviewed calls: GPT-4 as it answered, the cheap baseline, a student taught only by GPT-4, the specialist"
benched=$(protege runs list --task banking77 --kind bench --json | python -c '
import json, sys
want = {"run:" + x for x in sys.argv[2:] if x}
done = {r["config"].get("candidate") for r in json.load(sys.stdin) if r["dataset_id"] == sys.argv[1]
        and r["config"].get("tag") != "curve"}
print(want <= done)' "$dataset_id" "$clf" "${lora:-}" "${student:-}")
if [ "$benched" = "True" ]; then
  echo "reusing the bench of run:$clf"
else
  protege bench "$here/task.yaml" "${candidates[@]}" --latency-samples 10 --json "$reports/bench-banking77.json"
fi

step "7/8 Export the task's traces as OpenAI fine-tuning JSONL (for other tools)"
protege traces export .protege/exports/banking77.jsonl --task banking77

step "8/8 Decide: should we train a specialist for this step, and what should run in production?"
protege decide "$here/task.yaml" --monthly-requests 1000000 --html "$reports/decide-banking77.html" \
  --md "$reports/decide-banking77.md"

printf '\nThe store is %s.\n' "${PROTEGE_DATABASE_URL:-.protege/protege.db}"
printf 'The decision report (every chart): %s\n' "$(pwd)/$reports/decide-banking77.html"
printf 'Serve the classifier: protege serve run:%s --port 8000   (OpenAI-compatible, /v1/chat/completions)\n' "$clf"
if [ "$full" != 1 ]; then
  printf 'Not run here: the SmolLM2-135M LoRA specialist and the fine-tuned student (make demo-full).\n'
fi
