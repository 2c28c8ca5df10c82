#!/usr/bin/env bash
# The GPU suite of fused-ops-and-kernels (issue 14) and accelerated-moe (issue 25), in one
# command.
#
# On a CUDA machine (the lent H200: no network; python3 with torch 2.11 cu130, triton 3.6,
# transformers 5.17, peft, accelerate) it, within about 8 minutes:
#   install  our packages, bitsandbytes 0.50.2, liger-kernel 0.8.5 and cut-cross-entropy
#            25.1.1 from .whl/ (no network, no dependency resolution) into a private target dir
#            on PYTHONPATH;
#   kernels  every kernel vs torch eager, HF code and Liger-Kernel, as GB/s and % of the
#            device-to-device copy bandwidth measured in the same run; the causal-LM loss on
#            bf16 logits (ours vs the previous patch vs HF); fused linear CE at vocab 128256,
#            lm_head trained and frozen, 16k and 32k tokens, vs unfused, Liger's and Cut
#            Cross-Entropy's (its Triton impl);
#   e2e      LoRA and QLoRA tokens/s and peak memory, HF vs ours, random-init Llama-3-8B shapes
#            (batch 4 x seq 2048);
#   moe      one Mixtral-8x7B experts layer (8192 tokens, bf16, forward + backward): tokens/s
#            of our grouped Triton GEMMs vs transformers' default experts (grouped_mm on 5.x)
#            and its per-expert eager loop (4.55's only one);
#   tests    the foak and moe tests on CUDA: kernels compiled (not interpreted), in bf16 too, at
#            realistic shapes; patched vs unpatched models and fused LoRA in bf16;
#   summary  the table (scripts/gpu/summarize.py), also written as gpu_summary.md.
# CSVs (device, versions, date on every row) go to scripts/benchmarks/refs/gpu_*.csv.
#
# Without CUDA it dry-runs: the same steps on CPU at toy shapes (wheels built here if missing,
# CUDA tests collected and skipped, benchmarks through their CPU paths), writing to
# outputs/gpu-suite-dryrun/, so the plumbing is known to work before a GPU is lent.
#
# Before going to the GPU machine, on a machine that reaches the package index:
#     python scripts/gpu/prepare_wheels.py          # fills .whl/ (about 42 MB)
# Then, there:
#     bash scripts/gpu/suite.sh
# Settings (environment): PYTHON (default python3), SUITE_OUT (where the CSVs go),
# SUITE_PARTS (default "install kernels e2e moe tests summary": the figures first; parts always
# run in this order), SUITE_WHEELS (default .whl),
# SUITE_TESTS=all (the whole foak test suite on the GPU machine, not only its CUDA tests),
# SUITE_BUDGET_S (default 480: each part gets at most what is left; later parts are skipped,
# and reported, once it is spent, so one run fits the machine's 10-minute command limit).

set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PYTHON:-python3}
WHEELS=${SUITE_WHEELS:-$ROOT/.whl}
PARTS=${SUITE_PARTS:-"install kernels e2e moe tests summary"}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
SUITE_START=$(date +%s)
FAILED=()

BUDGET=${SUITE_BUDGET_S:-480}  # the whole run, seconds: parts get what is left of it
log() { printf '\n=== [%4ss] %s\n' "$(($(date +%s) - SUITE_START))" "$*"; }
# seconds a step may take: its own cap, or what is left of the budget (0: skip it)
allow() {
    local left=$((BUDGET - ($(date +%s) - SUITE_START)))
    if [ "$left" -lt 20 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
# run a step under `timeout`, or say why it was skipped (the budget is spent)
step() {
    local cap=$1 name=$2
    shift 2
    local t
    t=$(allow "$cap")
    if [ "$t" -eq 0 ]; then
        echo "!!! skipped $name: the ${BUDGET} s budget is spent (SUITE_BUDGET_S)" >&2
        FAILED+=("$name (skipped)")
        return 0
    fi
    timeout "$t" "$@" || fail "$name"
}
fail() { echo "!!! $*" >&2; FAILED+=("$1"); }
want() { [[ " $PARTS " == *" $1 "* ]]; }

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "$PY cannot import torch: set PYTHON to an interpreter with torch (for a dry run, e.g." >&2
    echo "the tox environment: python -m tox -e gpu-suite-dryrun)" >&2
    exit 2
fi
if [ "$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')" = 1 ]; then
    MODE=gpu
    OUT=${SUITE_OUT:-$ROOT/scripts/benchmarks/refs}
else
    MODE=dry-run
    OUT=${SUITE_OUT:-$ROOT/outputs/gpu-suite-dryrun}
    echo "No CUDA device: DRY RUN. The CUDA parts are skipped or shrunk to toy CPU shapes;"
    echo "figures go to $OUT and mean nothing. Run this on the GPU machine for real ones."
fi
mkdir -p "$OUT"
log "mode $MODE, python $("$PY" -c 'import sys; print(sys.version.split()[0])'), out $OUT"
"$PY" - <<'EOF'
import importlib.metadata as md
import torch
names = ("torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel",
         "cut-cross-entropy")
for name in names:
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} (not installed)")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"  device {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
EOF

# --- install: our wheels + bitsandbytes + the peers, no network, no dependency resolution -------
if want install; then
    log "install from $WHEELS"
    missing=()
    for pkg in fms_acceleration fms_acceleration_peft fms_acceleration_foak fms_acceleration_moe; do
        compgen -G "$WHEELS/$pkg-[0-9]*.whl" >/dev/null || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$MODE" = gpu ]; then
            echo "missing wheels of ${missing[*]} in $WHEELS: run 'python scripts/gpu/prepare_wheels.py'"
            echo "on a machine with the package index first (this one has no network)"
            exit 3
        fi
        echo "building our wheels into $WHEELS (prepare_wheels.py --ours-only)"
        "$PY" scripts/gpu/prepare_wheels.py --ours-only --dest "$WHEELS" || { fail install; }
    fi
    for pkg in bitsandbytes liger_kernel cut_cross_entropy; do
        if ! compgen -G "$WHEELS/$pkg-[0-9]*.whl" >/dev/null; then
            if [ "$MODE" = gpu ]; then
                echo "missing the $pkg wheel in $WHEELS: run scripts/gpu/prepare_wheels.py first"
                exit 3
            fi
            echo "note: no $pkg wheel in $WHEELS (the GPU machine needs it; prepare_wheels.py)"
        fi
    done
    SITE=${SUITE_SITE:-${TMPDIR:-/tmp}/foak-gpu-suite-site}
    rm -rf "$SITE" && mkdir -p "$SITE"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        "$PY" -c "
import fms_acceleration_foak as foak, fms_acceleration_peft, fms_acceleration
assert foak.__file__.startswith('$SITE'), foak.__file__
print('  importing', foak.__name__, 'from', foak.__file__)
" || fail install
    else
        fail install
    fi
fi

# --- kernel benchmarks: bandwidth vs copy, Liger, HF; loss on bf16 logits; fused linear CE ------
if want kernels; then
    csv_out=$OUT/gpu_kernels.csv
    bench=scripts/benchmarks/benchmark_kernels.py
    if [ "$MODE" = gpu ]; then
        log "kernel benchmarks (Llama-3-8B shapes, 16k tokens, bf16)"
        step 240 "kernel benchmarks" "$PY" $bench --out "$csv_out"
        log "fused linear CE: frozen lm_head (LoRA), and 32k tokens"
        step 90 "fused linear CE (frozen)" "$PY" $bench --kernels fused_linear_cross_entropy \
            --passes full --impls foak reference hf_eager liger cce --frozen-lm-head --append \
            --out "$csv_out"
        step 90 "fused linear CE (32k tokens)" "$PY" $bench --kernels fused_linear_cross_entropy \
            --passes full --impls foak hf_eager liger cce --tokens 32768 --append --out "$csv_out"
    else
        log "kernel benchmarks (dry run: toy CPU shapes, torch paths, no Liger)"
        tiny=(--device cpu --in-process --tokens 256 --hidden 64 --intermediate 128 --seq 64
              --heads 4 --kv-heads 2 --head-dim 16 --vocab 1000 --warmup 0 --repeat 1)
        step 300 "kernel benchmarks" "$PY" $bench "${tiny[@]}" --passes full --out "$csv_out"
        step 120 "fused linear CE (frozen)" "$PY" $bench "${tiny[@]}" \
            --kernels fused_linear_cross_entropy --passes full --frozen-lm-head --append \
            --out "$csv_out"
    fi
fi

# --- end to end: LoRA and QLoRA, HF vs ours -----------------------------------------------------
if want e2e; then
    if [ "$MODE" = gpu ]; then
        log "end to end: LoRA / QLoRA on random-init Llama-3-8B shapes, batch 4 x seq 2048"
        step 300 "end to end" "$PY" scripts/benchmarks/benchmark_e2e.py --timeout 150 \
            --out "$OUT/gpu_e2e.csv"
    else
        log "end to end (dry run: 2-layer toy Llama on CPU)"
        step 300 "end to end" "$PY" scripts/benchmarks/benchmark_e2e.py --tiny \
            --out "$OUT/gpu_e2e.csv"
    fi
fi

# --- MoE: grouped expert GEMMs vs transformers' experts ------------------------------------------
if want moe; then
    bench=scripts/benchmarks/benchmark_moe.py
    if [ "$MODE" = gpu ]; then
        log "MoE experts: one Mixtral-8x7B experts layer, 8192 tokens, bf16"
        step 240 "moe experts" "$PY" $bench --device cuda --dtype bfloat16 --tokens 8192 \
            --hidden 4096 --intermediate 14336 --experts 8 --top-k 2 --reps 5 --rounds 1 \
            --out "$OUT/gpu_moe.csv"
    else
        log "MoE experts (dry run: toy CPU shapes, the PyTorch path)"
        rm -f "$OUT/gpu_moe.csv"
        step 240 "moe experts" "$PY" $bench --device cpu --tokens 256 --hidden 64 \
            --intermediate 96 --experts 4 --top-k 2 --reps 1 --rounds 1 --impls scattermoe eager \
            --out "$OUT/gpu_moe.csv"
    fi
fi

# --- tests: compiled kernels on CUDA, models in bf16 ---------------------------------------------
if want tests && [ "$(allow 300)" -eq 0 ]; then
    echo "!!! skipped tests: the ${BUDGET} s budget is spent (SUITE_BUDGET_S)" >&2
    FAILED+=("tests (skipped)")
elif want tests; then
    junit=$OUT/.junit.xml
    if [ "$MODE" = gpu ]; then
        log "tests on CUDA (kernels compiled, bf16, realistic shapes; models in bf16)"
        # The kernel tests, every CUDA test and the loss tests; SUITE_TESTS=all runs the whole
        # plugin suite (its CPU-only tests too). The AOT compile test is CI's: here the kernels
        # really run.
        tests=plugins/fused-ops-and-kernels/tests
        moe=plugins/accelerated-moe/tests
        select=(-k "test_kernels or cuda or fast_loss or triton" "$tests/test_kernels.py"
                "$tests/test_models.py" "$tests/test_fused_lora_model.py" "$moe/test_kernels.py"
                "$moe/test_models.py")
        [ "${SUITE_TESTS:-}" = all ] && select=("$tests" "$moe" --deselect
                "$tests/test_aot_compile.py" --deselect "$moe/test_aot_compile.py")
        timeout "$(allow 300)" "$PY" -m pytest -q -n 8 -p no:cacheprovider \
            --junitxml="$junit" "${select[@]}"
        rc=$?
    else
        log "tests (dry run): collecting the CUDA tests, which skip here"
        timeout "$(allow 300)" "$PY" -m pytest -q -p no:cacheprovider --junitxml="$junit" \
            plugins/fused-ops-and-kernels/tests plugins/accelerated-moe/tests/test_kernels.py -k cuda
        rc=$?
    fi
    [ $rc -eq 0 ] || fail "tests (exit $rc)"
    "$PY" - "$junit" "$OUT/gpu_tests.csv" "$MODE" "$rc" <<'EOF'
import csv, datetime, sys, xml.etree.ElementTree as ET
import torch, transformers, triton
junit, out, mode, rc = sys.argv[1:]
try:
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failures = [
        f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    stats = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    seconds = suite.get("time", "")
except (OSError, ET.ParseError) as err:
    failures, stats, seconds = [f"no junit report: {err}"], {}, ""
row = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)",
    "torch": torch.__version__,
    "triton": triton.__version__,
    "transformers": transformers.__version__,
    "passed": stats.get("tests", 0) - stats.get("failures", 0) - stats.get("errors", 0)
    - stats.get("skipped", 0),
    "failed": stats.get("failures", 0),
    "errors": stats.get("errors", 0),
    "skipped": stats.get("skipped", 0),
    "seconds": seconds,
    "exit_code": rc,
    "failures": "; ".join(failures)[:2000],
}
with open(out, "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=list(row))
    writer.writeheader()
    writer.writerow(row)
print(f"  {row['passed']} passed, {row['failed']} failed, {row['errors']} errors, "
      f"{row['skipped']} skipped -> {out}")
EOF
    rm -f "$junit"
fi

if want summary; then
    log "summary"
    "$PY" scripts/gpu/summarize.py "$OUT" --write "$OUT/gpu_summary.md" || fail summary
fi

log "done in $(($(date +%s) - SUITE_START)) s ($MODE); results in $OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed parts: ${FAILED[*]}" >&2
    exit 1
fi
