#!/usr/bin/env bash
# LaMemo against Transformer-XL on WikiText-2 (word level), end to end: docs/results.md reports what it produced.
#
#   bash tools/reproduce_wikitext2.sh                      # seeds 1 2 3, everything
#   SEEDS=1 bash tools/reproduce_wikitext2.sh              # one seed: data, both models, evaluation, plots
#
# Settings (environment variables):
#   SEEDS            seeds to train, each for both models (default "1 2 3")
#   OUT              where data, runs and evaluations go (default runs/repro; ignored by git)
#   EVAL_MAX_TOKENS  score only the first N tokens of valid / test (default 0: the whole split); the results go
#                    to OUT/eval (whole split) or OUT/eval-first<N>
#   EVAL_BATCH       parallel evaluation streams (default 16)
#   ATTN_TOKENS      tokens of valid for the attention-utilisation plot (default 4096)
#   MODELS           which of "lamemo xl" to train / evaluate (default both)
#   STAGES           any of "data train eval attention plot summary" (default: all, in that order)
#   PYTHON           the interpreter (default: .venv/bin/python if present, else python)
#   RESULTS_DIR      if set, the summary, the plots and the attention CSV are copied there (docs/results)
# One process at a time, one thread (OMP_NUM_THREADS=1): CPU runs with fixed seeds and threads are deterministic.
# Per seed: train LaMemo, train Transformer-XL, evaluate both (valid and test, memory = training M and 4 M).
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS=${SEEDS:-"1 2 3"}
OUT=${OUT:-runs/repro}
EVAL_MAX_TOKENS=${EVAL_MAX_TOKENS:-0}
EVAL_BATCH=${EVAL_BATCH:-16}
ATTN_TOKENS=${ATTN_TOKENS:-4096}
STAGES=${STAGES:-"data train eval attention plot summary"}
RESULTS_DIR=${RESULTS_DIR:-}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DATA=$OUT/data
if [[ $EVAL_MAX_TOKENS == 0 ]]; then EVAL_DIR=$OUT/eval; else EVAL_DIR=$OUT/eval-first$EVAL_MAX_TOKENS; fi
MODELS=${MODELS:-"lamemo xl"}
TRAIN_MEM=64                    # data.mem_len of both configs
LONG_MEM=$((4 * TRAIN_MEM))     # the 4x longer evaluation memory
wants() { [[ " $STAGES " == *" $1 "* ]]; }
stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }

mkdir -p "$EVAL_DIR" "$OUT/logs"
{ echo "commit $(git rev-parse HEAD)"; echo "dirty $(git status --porcelain --untracked-files=no | wc -l) files";
  echo "OMP_NUM_THREADS=$OMP_NUM_THREADS seeds=[$SEEDS] eval_max_tokens=$EVAL_MAX_TOKENS eval_batch=$EVAL_BATCH";
  echo "started $(stamp)"; } >> "$OUT/provenance.txt"

if wants data; then
    if [[ ! -f $DATA/tokenizer/tokenizer.json ]]; then
        $PYTHON tools/train_tokenizer.py --kind word --input tests/data/wikitext-2/train.txt.xz --output "$DATA/tokenizer"
    fi
    for split in train valid test; do          # kept when inputs and tokenizer are unchanged
        $PYTHON tools/preprocess_data.py --input tests/data/wikitext-2/$split.txt.xz --tokenizer "$DATA/tokenizer" \
            --output-prefix "$DATA/$split" --workers 1
    done
fi

train() {   # model seed
    local run=$OUT/$1-seed$2 start end
    if [[ -f $run/final/config.json ]]; then echo "[repro] $run already trained"; return; fi
    rm -rf "$run"; mkdir -p "$run"
    start=$(date +%s.%N)
    echo "[repro] $(stamp) training $run"
    $PYTHON -m pretrain.train --config configs/wikitext2-$1-small.yaml run.seed=$2 run.dir="$run" \
        data.train="$DATA/train" data.valid="$DATA/valid" data.tokenizer="$DATA/tokenizer" \
        > "$OUT/logs/train-$1-seed$2.log" 2>&1
    end=$(date +%s.%N)
    python3 -c "import json,sys; json.dump({'wall_s': float(sys.argv[2]) - float(sys.argv[1])}, open(sys.argv[3], 'w'))" \
        "$start" "$end" "$run/wall.json"
}

evaluate() {   # model seed
    local run=$OUT/$1-seed$2 split mem out limit=()
    if [[ $EVAL_MAX_TOKENS != 0 ]]; then limit=(--max-tokens "$EVAL_MAX_TOKENS"); fi
    for split in valid test; do
        for mem in $TRAIN_MEM $LONG_MEM; do
            out=$EVAL_DIR/$1-seed$2-$split-mem$mem.json
            [[ -s $out ]] && continue
            echo "[repro] $(stamp) evaluating $run/final on $split, mem_len $mem"
            $PYTHON tools/evaluate.py "$run/final" --tokens "$DATA/$split" --tgt-len 64 --mem-len "$mem" \
                --batch-size "$EVAL_BATCH" "${limit[@]}" --json > "$out.tmp"
            mv "$out.tmp" "$out"
        done
    done
}

for seed in $SEEDS; do
    if wants train; then for m in $MODELS; do train "$m" "$seed"; done; fi
    if wants eval; then for m in $MODELS; do evaluate "$m" "$seed"; done; fi
done

first=${SEEDS%% *}
if wants attention && [[ $MODELS == "lamemo xl" ]]; then
    echo "[repro] $(stamp) attention utilisation (seed $first)"
    $PYTHON tools/attention_utilization.py "$OUT/lamemo-seed$first/final" "$OUT/xl-seed$first/final" \
        --tokens "$DATA/valid" --max-tokens "$ATTN_TOKENS" --batch-size 4 --label LaMemo --label Transformer-XL \
        --out "$OUT/attention.png" --csv "$OUT/attention.csv" --json --no-progress > "$OUT/attention-summary.json"
fi
if wants plot; then
    runs=(); labels=()
    for m in $MODELS; do for seed in $SEEDS; do
        runs+=("$OUT/$m-seed$seed"); labels+=(--label "$([[ $m == lamemo ]] && echo LaMemo || echo Transformer-XL) seed $seed")
    done; done
    $PYTHON tools/plot_runs.py "${runs[@]}" "${labels[@]}" --metric loss --smooth 4 \
        --title "WikiText-2, 4 layers, d 128, N = M = 64: training loss" --out "$OUT/loss.png"
fi
if wants summary; then
    $PYTHON - "$OUT" "$SEEDS" "$EVAL_DIR" "$MODELS" <<'EOF'
"""Collect every run's numbers into OUT/summary.json (per run) and OUT/summary.csv (mean and spread per model)."""
import json, statistics, sys
from pathlib import Path
from lamemo_parallel import LaMemoModel
out, seeds, eval_dir, models = Path(sys.argv[1]), sys.argv[2].split(), Path(sys.argv[3]), sys.argv[4].split()


def batch_tokens(run):
    """Target tokens per optimizer step, from the run's resolved config."""
    from pretrain.config import load_config
    d = load_config(run / "config.yaml").data
    return d.micro_batch_size * d.micro_batches * d.tgt_len

runs, rows = [], []
for model in models:
    for seed in seeds:
        run = out / f"{model}-seed{seed}"
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train_steps = [m for m in metrics if "loss" in m]
        cfg = json.loads((run / "final" / "config.json").read_text())
        entry = {"model": model, "seed": int(seed), "variant": cfg.get("variant"),
                 "parameters": LaMemoModel.from_pretrained(run / "final").num_parameters(),
                 "steps": train_steps[-1]["step"], "final_train_loss": train_steps[-1]["loss"],
                 "train_tokens": train_steps[-1]["step"] * batch_tokens(run),
                 "train_loss_last50": statistics.mean(m["loss"] for m in train_steps[-50:]),
                 "wall_s": json.loads((run / "wall.json").read_text())["wall_s"] if (run / "wall.json").exists() else None}
        for m in metrics:
            if "eval_ppl" in m:
                entry["trainer_eval_ppl"] = m["eval_ppl"]
        for path in sorted(eval_dir.glob(f"{model}-seed{seed}-*.json")):
            split, mem = path.stem.split("-")[2:4]
            e = json.loads(path.read_text())
            entry[f"{split}_{mem}_ppl"] = e["perplexity"]
            entry[f"{split}_{mem}_tokens"] = e["tokens"]
        runs.append(entry)
keys = sorted({k for r in runs for k in r if k.endswith("_ppl") or k in ("wall_s", "final_train_loss", "train_loss_last50")})
for model in models:
    mine = [r for r in runs if r["model"] == model]
    for key in keys:
        values = [r[key] for r in mine if r.get(key) is not None]
        if values:
            rows.append((model, key, len(values), statistics.mean(values),
                         statistics.stdev(values) if len(values) > 1 else 0.0, min(values), max(values)))
(out / "summary.json").write_text(json.dumps(runs, indent=1) + "\n")
with open(out / "summary.csv", "w") as f:
    f.write("model,metric,n,mean,std,min,max\n")
    for r in rows:
        f.write(f"{r[0]},{r[1]},{r[2]},{r[3]:.4f},{r[4]:.4f},{r[5]:.4f},{r[6]:.4f}\n")
print((out / "summary.csv").read_text())
ppl_keys = [k for k in keys if k.endswith("_ppl")]
print("| model | seed | wall (min) | train loss, last 50 steps | " + " | ".join(ppl_keys) + " |")  # docs/results.md
for r in runs:
    print(f"| {r['model']} | {r['seed']} | {(r['wall_s'] or 0) / 60:.1f} | {r['train_loss_last50']:.4f} | "
          + " | ".join(f"{r[k]:.2f}" if k in r else "-" for k in ppl_keys) + " |")
EOF
fi
if [[ -n $RESULTS_DIR ]]; then
    mkdir -p "$RESULTS_DIR"
    for f in summary.csv summary.json loss.png attention.png attention.csv attention-summary.json provenance.txt; do
        if [[ -f $OUT/$f ]]; then cp "$OUT/$f" "$RESULTS_DIR/wikitext2-$f"; fi
    done
fi
echo "finished $(stamp)" >> "$OUT/provenance.txt"
echo "[repro] $(stamp) done: $OUT/summary.csv, $OUT/loss.png, $OUT/attention.png"
