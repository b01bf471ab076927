#!/usr/bin/env bash
# GPU checks in one device command, from the repository root; phases (default: tests gap speed):
#   tests   the GPU tests (pytest -m gpu), among them issue 21's GPU-train / CPU-replay test;
#           test_300_steps_gpu_vs_cpu[2] is left out (184 s alone; it trains `full`, like [1])
#   gap     benchmarks/precision_gap.py: float32 / tf32 / bf16 projected gradients (issue 19)
#   speed   benchmarks/step_time.py and benchmarks/reuse.py, 6b3081a (before the restructure)
#           against this tree, in the same call (issue 20), small settings
#   causal  the GPU tests of the causal path (issue 22): candidate scoring, CUDA graphs, causal
#           training, model parity, layers (pytest -m gpu on those files)
#   large   benchmarks/causal_step.py: MeZO's large_models reference step against zotune's, random
#           OPT-1.3B and Llama-3.2-1B shapes, batch 16 (ms, peak memory, against zotune's forward)
#   prefix  benchmarks/prefix_sharing.py on CUDA: random OPT-1.3B and OPT-125M shapes, bf16,
#           SST-2- and COPA-shaped batches of 16 (tokens computed and ms per forward, shared / plain)
#   concurrent  benchmarks/concurrent_runs.py (issue 19's table throughput): 4 and 12 MeZO (full)
#           runs of the shipped model as processes, as processes under a CUDA MPS server, and as
#           one process on a stream each (steps/s of all runs together); then where the host's
#           time goes while one process steps 12 runs on streams (cProfile)
#   together  the GPU tests of session 14's code: runs on streams (test_together.py) and the
#           decoding cache on CUDA's kernels (engine/test_generate.py)
#   table   tools/fewshot_table.py, the six-task table (issue 19), until TABLE_END (epoch seconds),
#           its runs sharing the GPU as TABLE_FLAGS says; unset, as the concurrent phase of the same
#           call measured fastest for 12 runs (processes, MPS or streams), else 12 processes
#   paper   the MeZO paper's 100,000-step SST-2 protocol (issue 19) until PAPER_END, PAPER_RUNS (4)
#           at a time under MPS; returns its bundle in 15 MiB parts (see "Next session" below)
#   edge    past a grid's edge (issue 19): the paper protocol's MeZO (LoRA+head) at k=512 and lr
#           EDGE_LRS (default 1e-4), its five seeds at once under MPS, until EDGE_END, in a runs folder of
#           its own (runs/paper-edge; the protocol's cell keeps its grid); returns its bundle in
#           parts as the paper phase does, which a later call carries as .bundles/paper-edge.tgz
#   adam    the Adam baseline's step (benchmarks/profile_step.py --optimizer adam) of 94caf51, whose
#           attention dropout took an SDPA call per sequence, against this tree's one call, in the
#           same call; then the GPU tests of attention and training. The baseline travels as an
#           ignored folder: rm -rf .baseline-adam && mkdir .baseline-adam && git archive 94caf51 src
#           benchmarks/{profile_step.py,common.py,roberta-large-config.json} | tar -x -C .baseline-adam;
#           carry it
#   profile benchmarks/profile_step.py on the shipped model, SST-2 k=512: kernels by family (eager)
#           and wall per step (CUDA graphs); then the Adam baseline's step (where its ~50 ms go)
#   probe   the causal table's speed: a random checkpoint of tools/pretrain_clm.py's default shape
#           (19M parameters), MeZO (full) at 300 steps and Adam (full) at 1,000, SST-2 k=512, 12
#           runs sharing the GPU as the table does; prints steps/s, per-run overhead, and the
#           --mezo-steps that fits the table into one call
# then prints the tables, the step times as before/after pairs. Logs are written to $OUT.
#
# Issues 19-21. The device receives the working tree without .git, so the baseline travels as an
# ignored folder (src, benchmarks, tokenizers of 6b3081a, 4.5 MB; data/ is this tree's, whose
# SST-2 files are unchanged since). Prepare it here, once:
#   rm -rf .baseline && mkdir .baseline && git archive 6b3081a src benchmarks tokenizers | tar -x -C .baseline
# and run (about 8-9 minutes on an H100; each phase has its own time limit):
#   device run: command "bash benchmarks/gpu_session.sh", carry [".baseline"], timeout_s 600
# TESTS_LIMIT=S raises the tests' limit, for a call that shares the GPU with other work.
# or in two calls if one runs long: "bash benchmarks/gpu_session.sh tests gap", then "... speed".
#
# Issue 19's GPU work is done: the six-task table (720 runs), the paper's protocol (60 runs, 6M
# steps, sessions 20-22 and 24) and its LoRA+head k=512 grid one lr past its edge (5 runs at 1e-4,
# session 24); their small files are in benchmarks/paper-runs.tar.xz (fewshot-paper/, paper-edge/).
# To run the protocol again in calls under 10 minutes (a machine taken back mid-call returns
# nothing; a refused start costs 90-180 s of device time):
#   PAPER_END=$(( $(date +%s) + 570 )) bash benchmarks/gpu_session.sh paper, with carry [".bundles"];
#   after each call: cat FILES_AT/paper-runs.tgz.part-* > .bundles/paper-runs.tgz (the phase unpacks
#   it and the unfinished runs continue from their logs). A call sends at most 64 MiB: the tracked
#   tree is about 56.5 MB, the bundle up to 8.8 MB (gzip); above that, move data/{MNLI,SNLI,RTE,
#   sst-5,trec} out for the call (11 MB; the paper phase reads SST-2 only). The edge phase does the
#   same with EDGE_END and .bundles/paper-edge.tgz; `PAPER_END=$E EDGE_END=$E ... paper edge` gives
#   the edge what the protocol leaves of a call.
# Left for a call with device time to spare: benchmarks/step_time.py was split into functions in
# session 22 (checked on the CPU only); the `speed` phase runs it against 6b3081a's.
# If `status` lends a kind of several GPUs (nvidia-h100-x4/x8, not lent in sessions 15-16), take
# it: fewshot_table.py --device cuda spreads its runs over every visible GPU (--runs-per-device
# each), and the table and the protocol fit one session.
# pytest by hand on the device needs PYTHONPATH=src (this script sets it; nothing is installed there).
#
# A held machine goes back after 30 s idle, and whatever ran on it in the background with it
# (session 13 lost a running table that way, to a 21-second CPU test between two calls): issue
# the next call at once, and do the work here during a call, not between calls.
#
# Issue 22 (decoder-only demonstration; run in session 14, RESULTS.md): three calls on one H100, back to back (a machine left
# idle goes back, and a fresh one costs minutes), about 24 minutes of device time in all. A call
# returns at most 8 files of 16 MiB and carries at most 64 MiB; the tracked tree is 55 MB, 36 MB
# of it the shipped masked LM's safetensors, which calls B and C do not need: remove them before
# B (`rm models/zotune-roberta-small/*.safetensors`) and bring them back from git after C
# (`git checkout -- models/zotune-roberta-small`); tests in this checkout fail in between.
#  A. ~6 min (limits: causal 200 s, prefix 90 + 45 s, probe 45 + 180 s). The causal GPU path
#     first, so that nothing is spent on the table if it fails; the probe sizes the table.
#       device run: command "bash benchmarks/gpu_session.sh causal prefix probe", timeout_s 600
#     Returns summary.txt, causal.log, prefix_*.log (2), probe_model.log, probe.log.
#  B. 10 min: pretrain the causal LM, tools/pretrain_clm.py's one-call recipe (see its docstring).
#     Once here: `mkdir -p .corpus && cp ../shared/corpus/imdb_reviews.txt.xz .corpus/ && echo
#     /.corpus/ >> "$(git rev-parse --git-path info/exclude)"`; the tree without the weights
#     (19 MB) and the 34 MB corpus fit. carry [".corpus"], timeout_s 600:
#       set -o pipefail; export PYTHONUNBUFFERED=1; python tools/pretrain_clm.py \
#         --corpus .corpus/imdb_reviews.txt.xz --end-time $(( $(date +%s) + 530 )) --deadline-s 575 \
#         --out out/clm 2>&1 | tee $OUT/pretrain.log && \
#         tar cf - -C out/clm --exclude checkpoint . | split -b 15m - $OUT/clm.tar.part-
#     Here: `mkdir -p out/clm && cat <files_at>/clm.tar.part-* | tar xf - -C out/clm`.
#  C. ~9.5 min: the causal table (tools/fewshot_table.py, protocol causal: zero-shot, threshold,
#     MeZO full and LoRA, Adam; SST-2 k=16 and 512, five seeds, 60 runs, 12 at a time) on the
#     pretrained checkpoint: carry ["out/clm"] (42 MB; with the 19 MB tree, 61 MB of the 67), timeout_s 600;
#     N is the --mezo-steps that A's probe printed (the protocol's 2,000 where that fits):
#       set -o pipefail; export PYTHONUNBUFFERED=1; python tools/fewshot_table.py --model out/clm \
#         --device cuda --runs-per-device 12 --deadline 500 --mezo-steps N \
#         --bundle $OUT/causal-runs.tgz --output $OUT/fewshot_causal_table.json 2>&1 | tee $OUT/causal-table.log
#     A line "deadline: R of 60 runs unfinished" means: the same command again, at once (the runs
#     folder stays on a warm machine; finished runs are skipped, MeZO runs resume). Here:
#     `mkdir -p runs && tar xzf <files_at>/causal-runs.tgz -C runs`, then `python
#     tools/fewshot_table.py --model out/clm --aggregate-only --plot sst2-causal.png` (the table
#     again, and the dev curves) and `python tools/pretrain_clm.py --card out/clm --results MD`.
set -u
PHASES=${*:-tests gap speed}
OUT=${OUT:-out}
BASELINE=${BASELINE:-.baseline}
ADAM_BASELINE=${ADAM_BASELINE:-.baseline-adam}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src ZOTUNE_DATA_DIR=$PWD/data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"

phase() {  # phase NAME LIMIT_S COMMAND...: run it under a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s (limit $limit)" | tee -a "$OUT/summary.txt"
}

unpack() {  # unpack ARCHIVE DIR: Python's tarfile, since the image may lack an xz binary for tar
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$1" "$2"
}

protocol_phase() {  # protocol_phase NAME RUNS BUNDLE END FLAGS...: fewshot_table's mezo-paper runs in runs/RUNS
    # under MPS until END (epoch s); unfinished runs continue from a carried .bundles/BUNDLE.tgz
    # (their trajectory logs), and the new bundle comes back in 15 MiB parts (a returned file holds
    # at most 16 MiB)
    local name=$1 runs=$2 bundle=$3 end=$4; shift 4
    mkdir -p runs && { [ -d "runs/$runs" ] || [ ! -f ".bundles/$bundle.tgz" ] || unpack ".bundles/$bundle.tgz" runs; }
    phase "$name" $(( end - $(date +%s) + 60 )) python tools/fewshot_table.py --protocol mezo-paper --device cuda \
        --runs-dir "runs/$runs" --mps --deadline $(( end - $(date +%s) )) --bundle "out/$bundle.tgz" "$@"
    split -b 15m "out/$bundle.tgz" "$OUT/$bundle.tgz.part-"
}

fastest_sharing() {  # fewshot_table flags for the mode of 12 runs that concurrent_runs.py measured fastest
    python3 - "$1" <<'EOF'
import re, sys
rates = {m: float(r) for m, r in re.findall(r"^\| 12 \| (\w+) \| ([0-9.]+) \|", open(sys.argv[1]).read(), re.M)}
flags = {"processes": "--runs-per-device 12", "mps": "--runs-per-device 12 --mps",
         "streams": "--runs-per-device 2 --runs-per-process 6"}
print(flags[max(rates, key=rates.get)] if rates else flags["processes"])
EOF
}

for p in $PHASES; do
    case $p in
    tests) phase tests "${TESTS_LIMIT:-220}" python -m pytest -q -m gpu tests \
               --deselect "tests/test_gpu_agreement.py::test_300_steps_gpu_vs_cpu[2]" ;;
    gap) phase gap 150 python benchmarks/precision_gap.py --directions 64 --cpu-directions 8 ;;
    speed)
        [ -d "$BASELINE/src/zotune" ] || { echo "no baseline tree at $BASELINE: see this script's header"; exit 2; }
        ln -sfn "$PWD/models" "$BASELINE/models"  # the baseline's scripts read the tokenizer beside them
        # Baseline and this tree back to back per benchmark; the baseline's own scripts (the
        # restructure changed what they import), its zotune first on PYTHONPATH.
        phase step_time_before 75 env PYTHONPATH="$PWD/$BASELINE/src" python "$BASELINE/benchmarks/step_time.py" --steps 10
        phase step_time_after 75 python benchmarks/step_time.py --steps 10
        phase reuse_before 75 env PYTHONPATH="$PWD/$BASELINE/src" python "$BASELINE/benchmarks/reuse.py" \
            --steps 32 --k 16 512 --only top:1 lora-pair
        phase reuse_after 75 python benchmarks/reuse.py --steps 32 --k 16 512 --only top:1 lora-pair ;;
    causal) phase causal 200 python -m pytest -q -m gpu tests/engine/test_candidates.py tests/engine/test_causal_graphs.py \
                tests/test_causal_train.py tests/model tests/layers ;;
    large) phase large 300 python benchmarks/causal_step.py --steps 10 ;;
    prefix)
        phase prefix_opt1.3b 90 python benchmarks/prefix_sharing.py --device cuda --size opt-1.3b --precision bf16
        phase prefix_opt125m 45 python benchmarks/prefix_sharing.py --device cuda --size opt-125m --precision bf16 ;;
    concurrent)
        mkdir -p out/tmp  # where the MPS daemon's pipe goes, so that one left running can be told to quit
        phase concurrent_full 240 env TMPDIR="$PWD/out/tmp" python benchmarks/concurrent_runs.py --runs 4 12 \
            --seconds 8 --modes processes mps streams --profile-host 12
        for pipe in out/tmp/*/pipe; do
            [ -d "$pipe" ] && echo quit | CUDA_MPS_PIPE_DIRECTORY="$pipe" timeout 30 nvidia-cuda-mps-control
        done ;;
    adam)  # the backprop baseline's step before (attention dropout a call per sequence) and after (one call)
        [ -d "$ADAM_BASELINE/src/zotune" ] || { echo "no baseline tree at $ADAM_BASELINE: see this script's header"; exit 2; }
        ln -sfn "$PWD/models" "$ADAM_BASELINE/models"
        phase profile_adam_before 90 env PYTHONPATH="$PWD/$ADAM_BASELINE/src" python "$ADAM_BASELINE/benchmarks/profile_step.py" \
            --model models/zotune-roberta-small --k 512 --optimizer adam
        phase profile_adam_after 90 python benchmarks/profile_step.py --model models/zotune-roberta-small --k 512 --optimizer adam
        phase adam_tests 120 python -m pytest -q -m gpu tests/layers/test_attention.py tests/test_train.py ;;
    profile)  # where the table's step goes: the shipped model, SST-2 k=512 batch 64, eager (kernels) and graphed
        phase profile_eager 90 python benchmarks/profile_step.py --model models/zotune-roberta-small --k 512
        phase profile_graphs 90 python benchmarks/profile_step.py --model models/zotune-roberta-small --k 512 --graphs
        phase profile_adam 90 python benchmarks/profile_step.py --model models/zotune-roberta-small --k 512 --optimizer adam ;;
    together) phase together 150 python -m pytest -q -m gpu tests/test_together.py tests/engine/test_generate.py ;;
    table)  # the six-task table (issue 19) until TABLE_END (epoch s); TABLE_FLAGS: how runs share the GPU
        [ -z "${TABLE_FLAGS:-}" ] && [ -f "$OUT/concurrent_full.log" ] && TABLE_FLAGS=$(fastest_sharing "$OUT/concurrent_full.log")
        echo "table: ${TABLE_FLAGS:---runs-per-device 12}" | tee -a "$OUT/summary.txt"
        mkdir -p runs && { [ -d runs/fewshot ] || unpack benchmarks/fewshot-runs.tar.xz runs; }
        phase table $(( TABLE_END - $(date +%s) + 60 )) python tools/fewshot_table.py --device cuda ${TABLE_FLAGS:---runs-per-device 12} \
            --methods "MeZO (full),MeZO (LoRA+head),MeZO (prefix),Adam (full)" --deadline $(( TABLE_END - $(date +%s) )) \
            --bundle "$OUT/table.tgz" --output "$OUT/table.json" ;;
    paper)  # the MeZO paper's 100,000-step SST-2 protocol (issue 19) until PAPER_END (epoch s), PAPER_RUNS
        # at a time under MPS (4 make about the steps/s of 12 and leave fewer runs in flight at the
        # end), k=512 first (the picture's runs)
        protocol_phase paper fewshot-paper paper-runs "$PAPER_END" --ks 512,16 --runs-per-device "${PAPER_RUNS:-4}" \
            --output "$OUT/paper.json" ;;
    edge)  # MeZO (LoRA+head) k=512 past its grid's top lr (3e-5, every seed's choice) until EDGE_END
        if (( EDGE_END - $(date +%s) < 60 )); then echo "edge: skipped, under 60 s before EDGE_END" | tee -a "$OUT/summary.txt"; continue; fi
        protocol_phase edge paper-edge paper-edge "$EDGE_END" --ks 512 --methods "MeZO (LoRA+head)" \
            --lrs "${EDGE_LRS:-1e-4}" --runs-per-device 5 --output out/edge.json ;;  # the log holds the table; 8 files come back
    probe)
        rm -rf out/probe out/clm-random
        phase probe_model 45 python -c 'import sys, torch; sys.path.insert(0, "tools")
from pathlib import Path; from pretrain_clm import ClmConfig, build_model; from pretraining import save_hf
torch.manual_seed(0); save_hf(build_model(ClmConfig()), Path("out/clm-random"), torch.float16)'
        phase probe 180 python tools/fewshot_table.py --model out/clm-random --device cuda --runs-per-device 12 \
            --ks 512 --methods "MeZO (full),Adam (full)" --mezo-steps 300 --deadline 110 --runs-dir out/probe \
            --output out/probe/table.json ;;
    *) echo "unknown phase $p (tests, gap, speed, causal, large, prefix, adam, profile, together, concurrent, table, paper, edge, probe)"; exit 2 ;;
    esac
done

echo; echo "==== results ($PHASES) ===="
cat "$OUT/summary.txt"
[ -f "$OUT/tests.log" ] && tail -n 15 "$OUT/tests.log" | grep -E "passed|failed|error|FAILED|ERROR"
[ -f "$OUT/gap.log" ] && grep -E "^\||^MeZO projected" "$OUT/gap.log"
[ -f "$OUT/causal.log" ] && tail -n 15 "$OUT/causal.log" | grep -E "passed|failed|error|FAILED|ERROR"
[ -f "$OUT/adam_tests.log" ] && tail -n 15 "$OUT/adam_tests.log" | grep -E "passed|failed|error|FAILED|ERROR"
[ -f "$OUT/large.log" ] && grep -E "^\|" "$OUT/large.log" | tail -n 6
[ -f "$OUT/concurrent_full.log" ] && grep -E "^\||^MeZO|Error|^mps" "$OUT/concurrent_full.log"
for f in "$OUT"/profile_*.log; do [ -f "$f" ] && grep -E "^(MeZO|Adam) step|^\| [a-z(]" "$f" | head -n 12; done
[ -f "$OUT/together.log" ] && tail -n 15 "$OUT/together.log" | grep -E "passed|failed|error|FAILED|ERROR"
[ -f "$OUT/table.log" ] && grep -E "^plan: [0-9]|^deadline|error" "$OUT/table.log"
for f in "$OUT"/paper.log "$OUT"/edge.log; do [ -f "$f" ] && grep -E "^plan: [0-9]|^deadline|error|^sst2|^\|" "$f"; done
for f in "$OUT"/prefix_*.log; do [ -f "$f" ] && grep -E "^device|^sst2|^copa" "$f"; done
[ -d out/probe ] && python3 - out/probe <<'EOF'
# The probe's runs: steps/s of a run while 12 share the GPU and its seconds outside the steps, per
# optimizer; then the MeZO step count that fits the causal table (40 MeZO runs, 20 Adam runs of
# 1,000 steps, 12 at a time) into 450 s of runs (call C's --deadline 500, less the zero-shot rows).
import json, statistics, sys
from pathlib import Path

found = {}
for path in Path(sys.argv[1]).glob("*/*/*/summary.json"):
    s, c = json.loads(path.read_text()), json.loads((path.parent / "config.json").read_text())
    found.setdefault(c["optimizer"], []).append((s["steps_per_s"], s["wall_time_s"] - s["train_time_s"]))
speed = {o: (statistics.mean(r[0] for r in rs), statistics.mean(r[1] for r in rs)) for o, rs in found.items()}
for o, (rate, overhead) in speed.items():
    print(f"probe {o}: {len(found[o])} runs finished, {rate:.0f} steps/s a run, {overhead:.0f} s a run besides")
if len(speed) == 2:
    (mezo, m_over), (adam, a_over) = speed["mezo"], speed["adam"]
    room = 450 * 12 - 20 * (1000 / adam + a_over) - 40 * m_over
    steps = max(0, int(room / 40 * mezo) // 250 * 250)
    print(f"probe: the causal table fits one call with --mezo-steps {min(steps, 2000)} "
          f"(the protocol's 2000; {steps} would fill the 450 s)")
EOF
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
