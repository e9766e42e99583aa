#!/usr/bin/env bash
# The CUDA-only checks in one device call (docs/benchmarks.md, "Running the GPU checks"):
#   command "bash benchmarks/gpu/run_checks.sh", carry [".gpu-wheels"], timeout_s 600
# after `bash benchmarks/gpu/prepare_wheels.sh` here. Installs the carried wheels offline into
# the machine's python (torch untouched), then runs, most important first, each under its own
# timeout and all under one budget (GPU_CHECKS_BUDGET s, default 510), going on past failures:
# the CUDA tests, check_qlora, bench_train (MFU), serving and eval benchmarks.
# Writes 8 files to $OUT (the device tool returns at most 8): summary.txt (PASS/FAIL and the
# key lines of every step), results.jsonl (the benchmarks' JSON lines), and setup / pytest /
# check_qlora / bench_train / bench_serving / bench_eval .log.
# GPU_CHECKS_DRY=1: the same steps on the CPU at tiny sizes, with `pip install --dry-run`, to
# check paths and options on a machine without a GPU (the QLoRA and flex steps fail there).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
cd "$ROOT" || exit 1
DRY="${GPU_CHECKS_DRY:-0}"
OUT="${OUT:-$ROOT/runs/gpu-checks}"
PY="${PY:-$(command -v /opt/torch/.venv/bin/python3 || echo python3)}"
WHEELS="$ROOT/.gpu-wheels"
WORK="$(mktemp -d)"
BUDGET="${GPU_CHECKS_BUDGET:-510}"  # the call's limit is 600 s: leave room for the transfer back
START=$SECONDS
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
RESULTS="$OUT/results.jsonl"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$DRY" == 1 ]]; then
  DEV=cpu DTYPE=fp32 M1=smol-3m M2=smol-3m SHAPE=(--batch 2 --seq 64 --steps 1 --warmup 1)
  QLORA=(--batch 2 --seq 32 --steps 1 --warmup 1) DRYRUN=(--dry-run)
  SERVE=(--preset smol-3m --requests 4 --prompt-len 8 16 --new-tokens 4 8 --threads 1)
  EVAL=(--preset smol-3m --limit 2 --repeats 1 --max-new-tokens 4 --threads 1)
else
  DEV=cuda DTYPE=bf16 M1=smollm2-135m M2=smollm2-360m SHAPE=(--batch 8 --seq 2048 --steps 10 --warmup 2)
  QLORA=(--steps 10) DRYRUN=()
  SERVE=(--preset smollm2-135m --requests 16 --prompt-len 16 128 --new-tokens 32 128)
  EVAL=(--preset smollm2-135m --limit 20 --repeats 1 --max-new-tokens 32)
fi

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LOG MAX_S KEYS CMD...: run CMD under min(MAX_S, what the budget has left), its
# output appended to $OUT/LOG.log as it comes; one PASS/FAIL line plus the lines matching the
# regex KEYS go to the summary. A shell function runs without `timeout` (which cannot run one);
# the pip calls inside it carry their own.
step() {
  local name=$1 log="$OUT/$2.log" want=$3 keys=$4
  shift 4
  local left=$((BUDGET - (SECONDS - START) - 5))
  local limit=$((want < left ? want : left))
  if ((limit < 15)); then
    note "$(printf 'SKIP  %-26s budget spent' "$name")"
    return 0
  fi
  echo "===== $name (timeout ${limit}s): $*" >>"$log"
  local t0=$SECONDS
  if declare -F "$1" >/dev/null; then
    "$@" 2>&1 | tee -a "$log" >"$WORK/step.out"
  else
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log" >"$WORK/step.out"
  fi
  local rc=${PIPESTATUS[0]} status=PASS
  if ((rc == 124 || rc == 137)); then status=TIMEOUT; elif ((rc != 0)); then status="FAIL($rc)"; fi
  note "$(printf '%-5s %-26s %4ds' "$status" "$name" $((SECONDS - t0)))"
  [[ -n "$keys" ]] && grep -E -- "$keys" "$WORK/step.out" | head -n 30 | sed 's/^/      /' | tee -a "$SUMMARY"
  [[ "$status" == PASS ]] || tail -n 3 "$WORK/step.out" | sed 's/^/    ! /' | tee -a "$SUMMARY"
  return 0
}

pip_in() {  # offline pip install from the carried wheels; never touches torch (no torch wheel there)
  timeout 120 "$PY" -m pip install -q --no-index --find-links "$WHEELS" --disable-pip-version-check --no-cache-dir \
    --root-user-action=ignore "${DRYRUN[@]}" "$@"
}

install_all() {  # one requirement at a time if the set fails, so that one gap blocks nothing else
  local reqs=() r rc=0
  mapfile -t reqs < <("$PY" -c 'import tomllib; print("\n".join(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if not d.startswith("torch")))')
  reqs+=("pytest>=8" "setuptools>=68" "wheel" "bitsandbytes>=0.45" "liger-kernel>=0.4" "peft>=0.13")
  echo "requirements: ${reqs[*]}"
  if ! pip_in "${reqs[@]}"; then
    for r in "${reqs[@]}"; do pip_in "$r" || { echo "NOT INSTALLED: $r"; rc=1; }; done
  fi
  pip_in --no-deps --no-build-isolation -e . || { echo "NOT INSTALLED: smolforge (-e .); PYTHONPATH=src is used"; rc=1; }
  return $rc
}

versions() {
  "$PY" - <<'EOF'
import importlib.metadata as md, sys, torch
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"python {sys.version.split()[0]} | torch {torch.__version__} (CUDA {torch.version.cuda}) | {gpu}")
print(" | ".join(f"{n} {v(n)}" for n in ("triton", "transformers", "pydantic", "bitsandbytes", "liger-kernel",
                                          "peft", "flash-attn", "pytest", "smolforge")))
EOF
}

note "GPU checks $(date -u +%FT%TZ), dry=$DRY, budget ${BUDGET}s, $(git rev-parse --short HEAD 2>/dev/null || echo 'no git') $(git status --porcelain 2>/dev/null | grep -q . && echo '+ uncommitted changes')"
{ command -v nvidia-smi >/dev/null && nvidia-smi || echo "no nvidia-smi"; } >>"$OUT/setup.log" 2>&1
step install setup 150 "NOT INSTALLED" install_all
# Fallback, should the machine's environment refuse the install (read-only, say): every carried
# wheel into a private folder on PYTHONPATH. Done here, not in a step: a step runs in a subshell.
if ! "$PY" -c "import pydantic, yaml, rich, jinja2, pytest" 2>/dev/null; then
  step "install --target (fallback)" setup 120 "ERROR" pip_in --no-deps --target "$WORK/site" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
step versions setup 60 "." versions
# bench_eval.py reads ../shared/data: link the carried copy there when the machine has none.
if [[ ! -d "$ROOT/../shared/data" && -d "$WHEELS/data" ]]; then
  { mkdir -p "$ROOT/../shared" && ln -sfn "$WHEELS/data" "$ROOT/../shared/data"; } || note "cannot link ../shared/data"
fi

# 1. Correctness: the CUDA tests (flash-attn is not carried: its test skips).
step pytest pytest 240 "^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed|skipped|errors?)\b" \
  "$PY" -m pytest -q -rfEs -p no:cacheprovider --durations=8 tests/test_attention_backends.py tests/test_qlora.py \
  "tests/test_engine.py::test_cuda_graph_decoding_equals_eager"
step check_qlora check_qlora 120 "^\| (lora|qlora|full) |^\{" \
  "$PY" benchmarks/check_qlora.py --modes lora qlora full "${QLORA[@]}" --out "$WORK/check_qlora.json"
[[ -s "$WORK/check_qlora.json" ]] && "$PY" -c 'import json, sys; print(json.dumps({"bench": "check_qlora", **json.load(open(sys.argv[1]))}))' \
  "$WORK/check_qlora.json" >>"$RESULTS"

# 2. Throughput and MFU (bench_train appends one JSON line per run to results.jsonl).
TRAIN=("$PY" benchmarks/bench_train.py --device "$DEV" --dtype "$DTYPE" --json "$RESULTS")
KEYS="tokens/s|ratio|MFU"
step "train $M1 eager" bench_train 90 "$KEYS" "${TRAIN[@]}" --preset "$M1" "${SHAPE[@]}"
step "train $M1 compile" bench_train 180 "$KEYS" "${TRAIN[@]}" --preset "$M1" "${SHAPE[@]}" --compile
step "train $M1 docs8 sdpa" bench_train 90 "$KEYS" "${TRAIN[@]}" --preset "$M1" "${SHAPE[@]}" --docs 8 --attention sdpa
step "train $M1 docs8 flex" bench_train 150 "$KEYS" "${TRAIN[@]}" --preset "$M1" "${SHAPE[@]}" --docs 8 --attention flex
step "train $M2 eager" bench_train 120 "$KEYS" "${TRAIN[@]}" --preset "$M2" "${SHAPE[@]}"

# 3. Serving (CUDA graphs in the one-by-one path) and evaluation throughput.
step serving bench_serving 90 "one by one|batched|ratio" \
  "$PY" benchmarks/bench_serving_batching.py --device "$DEV" --dtype "$DTYPE" "${SERVE[@]}" --json "$RESULTS"
step eval bench_eval 120 "^\| [a-z]|q/s" \
  "$PY" benchmarks/bench_eval.py --device "$DEV" "${EVAL[@]}" --json "$RESULTS"

note "done in $((SECONDS - START))s; files in $OUT: $(cd "$OUT" && printf '%s ' *)"
rm -rf "$WORK"
