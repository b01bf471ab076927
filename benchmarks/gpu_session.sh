#!/usr/bin/env bash
# The GPU checks of issues 19, 20 and 21 in one device command, from the repository root:
#   tests  the GPU tests (pytest -m gpu), among them issue 21's GPU-train / CPU-replay test;
#          test_300_steps_gpu_vs_cpu[2] is left out (184 s alone; it trains `full`, like [1])
#   gap    benchmarks/precision_gap.py: float32 / tf32 / bf16 projected gradients (issue 19)
#   speed  benchmarks/step_time.py and benchmarks/reuse.py, 6b3081a (before the restructure)
#          against this tree, in the same call (issue 20), small settings
# then prints the tables, the step times as before/after pairs. Logs are written to $OUT.
#
# The device receives the working tree without .git, so the baseline travels as an ignored
# folder (src, benchmarks, tokenizers of 6b3081a, 4.5 MB; data/ is this tree's, whose SST-2
# files are unchanged since). Prepare it here, once:
#   rm -rf .baseline && mkdir .baseline && git archive 6b3081a src benchmarks tokenizers | tar -x -C .baseline
# and run (about 8-9 minutes on an H100; each phase has its own time limit):
#   device run: command "bash benchmarks/gpu_session.sh", carry [".baseline"], timeout_s 600
# TESTS_LIMIT=S raises the tests' limit, for a call that shares the GPU with other work.
# or in two calls if one runs long: "bash benchmarks/gpu_session.sh tests gap", then "... speed".
set -u
PHASES=${*:-tests gap speed}
OUT=${OUT:-out}
BASELINE=${BASELINE:-.baseline}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src ZOTUNE_DATA_DIR=$PWD/data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"

phase() {  # phase NAME LIMIT_S COMMAND...: run it under a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s (limit $limit)" | tee -a "$OUT/summary.txt"
}

for p in $PHASES; do
    case $p in
    tests) phase tests "${TESTS_LIMIT:-220}" python -m pytest -q -m gpu tests \
               --deselect "tests/test_gpu_agreement.py::test_300_steps_gpu_vs_cpu[2]" ;;
    gap) phase gap 150 python benchmarks/precision_gap.py --directions 64 --cpu-directions 8 ;;
    speed)
        [ -d "$BASELINE/src/zotune" ] || { echo "no baseline tree at $BASELINE: see this script's header"; exit 2; }
        # Baseline and this tree back to back per benchmark; the baseline's own scripts (the
        # restructure changed what they import), its zotune first on PYTHONPATH.
        phase step_time_before 75 env PYTHONPATH="$PWD/$BASELINE/src" python "$BASELINE/benchmarks/step_time.py" --steps 10
        phase step_time_after 75 python benchmarks/step_time.py --steps 10
        phase reuse_before 75 env PYTHONPATH="$PWD/$BASELINE/src" python "$BASELINE/benchmarks/reuse.py" \
            --steps 32 --k 16 512 --only top:1 lora-pair
        phase reuse_after 75 python benchmarks/reuse.py --steps 32 --k 16 512 --only top:1 lora-pair ;;
    *) echo "unknown phase $p (tests, gap, speed)"; exit 2 ;;
    esac
done

echo; echo "==== results ($PHASES) ===="
cat "$OUT/summary.txt"
[ -f "$OUT/tests.log" ] && tail -n 15 "$OUT/tests.log" | grep -E "passed|failed|error|FAILED|ERROR"
[ -f "$OUT/gap.log" ] && grep -E "^\||^MeZO projected" "$OUT/gap.log"
python3 - "$OUT" <<'EOF'
# Step times before/after: rows matched by their label columns, times side by side.
import sys
from pathlib import Path

out = Path(sys.argv[1])
# benchmark: (label columns, time columns) of its table, as printed
TABLES = {"step_time": ((0, 5), (3, 6, 10)), "reuse": ((0, 2), (3, 4, 8))}


def rows(path):
    if not path.is_file():
        return [], {}
    lines = path.read_text().splitlines()
    table = [line.strip("|").split("|") for line in lines if line.startswith("|")]
    header = [cell.strip() for cell in table[0]] if table else []
    return header, {tuple(c.strip() for c in r): r for r in table[2:]}


for bench, (labels, times) in TABLES.items():
    header, before = rows(out / f"{bench}_before.log")
    _, after = rows(out / f"{bench}_after.log")
    if not before and not after:
        continue
    print(f"\n{bench}: before = 6b3081a, after = this tree (same call, same card)")
    print("| " + " | ".join([header[i] for i in labels] + [f"{header[i]} before / after" for i in times]) + " |")
    after_by_label = {tuple(r[i].strip() for i in labels): r for r in after.values()}
    for row in before.values():
        key = tuple(row[i].strip() for i in labels)
        other = after_by_label.get(key)
        cells = [f"{row[i].strip()} / {other[i].strip() if other else '-'}" for i in times]
        print("| " + " | ".join(list(key) + cells) + " |")
EOF
