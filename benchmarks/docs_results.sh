#!/usr/bin/env bash
# Regenerates, whole, the results files that docs/ quotes for these benchmarks, one run after another, each file
# headed by its command and date. Run it on a quiet machine (trial_cost and the demo time themselves); every run
# uses one thread but the demo (its two Ray workers).
#
#   benchmarks/docs_results.sh                       # all of them (about an hour on 2 cores)
#   benchmarks/docs_results.sh format_kl trial_cost  # some
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
TIMEFORMAT='wall time: %0R s'  # what `time` prints (the demo's)
SCRATCH=$(mktemp -d)  # a fresh store: nothing is reused from an earlier run
trap 'rm -rf "$SCRATCH"' EXIT
declare -A CMD=(
  [quant_error]="OMP_NUM_THREADS=1 $PY benchmarks/quant_error.py --real"
  [format_kl]="$PY benchmarks/format_kl.py --threads 1"
  [trial_cost]="$PY benchmarks/trial_cost.py --model smollm2-135m --eval-seqs 4 --trials 60 --sampler evo --granularity block --threads 1"
  [search_quality]="$PY benchmarks/search_quality.py --model smollm2-135m --eval-seqs 4 --granularity block --bits 2,3,4 --groups 32,64,128 --budgets 2.5,3.0,3.5,4.0 --trials 20 --samplers nsga2,tpe,evo,evo-unguided --threads 1 --storage sqlite:///$SCRATCH/search_quality.db"
  [demo]="rm -f demo.db && time make -s demo"   # a fresh study (the demo resumes the one in demo.db), on an installed tree
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(quant_error trial_cost format_kl search_quality demo)
for name in "${names[@]}"; do
  cmd=${CMD[$name]:?"unknown benchmark $name (one of: ${!CMD[*]})"}
  out=benchmarks/results/$name.txt
  echo "== $name -> $out"
  { echo "\$ ${cmd//$SCRATCH/\$SCRATCH}   # $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc)-core machine, load $(cut -d' ' -f1 /proc/loadavg)"
    eval "$cmd"; } > "$out.part" 2>&1
  mv "$out.part" "$out"
done
