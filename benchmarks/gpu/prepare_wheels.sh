#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that the GPU checks need on a lent GPU
# machine that has no network (Python 3.12, x86-64, torch 2.11 + CUDA 13 preinstalled), into
# .gpu-wheels/ (git-ignored; the device call carries it: carry [".gpu-wheels"]).
#
#   bash benchmarks/gpu/prepare_wheels.sh          # then: du -sh .gpu-wheels
#
# What is carried and why (docs/benchmarks.md, "Running the GPU checks"):
# - smolforge's small runtime deps and pytest, pinned to the versions this project's tests pass
#   with. The GPU image already has most of them; run_checks.sh asks pip for the requirement and
#   pip keeps an installed version that satisfies it, so these are only a fallback. pydantic (and
#   its core) is the one the image is known to lack.
# - the CUDA-only extras: bitsandbytes (QLoRA's NF4 base; its wheel ships a CUDA 13.0 library)
#   and liger-kernel (Triton kernels), and peft (on the image, carried as a fallback).
# - setuptools + wheel: the build backend that `pip install --no-build-isolation -e .` needs.
# Left out on purpose: torch, triton and nvidia-* (on the image, never replaced: the install is
# --no-index, so pip cannot swap them); numpy, tokenizers, pyarrow, matplotlib, transformers
# (on the image and together ~70 MiB: the tree plus carry must stay under 64 MiB); flash-attn
# (no wheel for torch 2.11 / CUDA 13, and it cannot be built offline within the device time:
# its test skips with "flash-attn is not installed").
# bench_eval.py reads ../shared/data; the three files it needs are copied to .gpu-wheels/data/
# (pip's --find-links ignores subfolders) and run_checks.sh links them where the script looks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${GPU_WHEELS_DIR:-$ROOT/.gpu-wheels}"
PY="${PY:-$(command -v python3)}"

# name==version, one version of each: two versions of a name would make the offline install ambiguous.
CORE=(
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  "typing-extensions==4.16.0" "pyyaml==6.0.4" "rich==15.0.0" "markdown-it-py==4.3.0" "mdurl==0.1.2"
  "pygments==2.21.0" "jinja2==3.1.6" "markupsafe==3.0.4" "safetensors==0.8.0"
)
TEST=("pytest==9.2.0" "pluggy==1.7.0" "iniconfig==2.3.1" "packaging==26.4")
BUILD=("setuptools==84.2.1" "wheel==0.48.0")
EXTRAS=("bitsandbytes==0.50.2" "liger-kernel==0.8.5" "peft==0.21.2")
# Present on the GPU image (/work/.library/device/KINDS.md): a carried wheel may depend on these.
ON_IMAGE="torch triton numpy tokenizers transformers accelerate huggingface-hub psutil tqdm pyyaml
  filelock fsspec jinja2 networkx sympy setuptools packaging safetensors"

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
# --no-deps per package: resolving with dependencies would pull torch and the CUDA wheels (GiBs).
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  -d "$DEST" "${CORE[@]}" "${TEST[@]}" "${BUILD[@]}" "${EXTRAS[@]}"

# bench_eval.py's data (ARC-Easy, PIQA, GSM8K test), from the shared data beside the checkout.
SHARED="$ROOT/../shared/data"
if [[ -d "$SHARED" ]]; then
  mkdir -p "$DEST/data/mc" "$DEST/data/gsm8k"
  cp "$SHARED/mc/arc_easy.jsonl" "$SHARED/mc/piqa.jsonl" "$DEST/data/mc/"
  cp "$SHARED/gsm8k/test.jsonl" "$DEST/data/gsm8k/"
else
  echo "note: $SHARED not found; bench_eval will be skipped on the GPU machine" >&2
fi

# Every non-extra requirement of a carried wheel must be carried too or be on the image.
"$PY" - "$DEST" "$ON_IMAGE" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement

env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
carried = {norm(w.name.split("-")[0]) for w in wheels}
known = carried | {norm(n) for n in sys.argv[2].split()}
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if (req.marker is None or req.marker.evaluate(env)) and norm(req.name) not in known:
                missing.append(f"{w.name}: {req}")
if len(carried) != len(wheels):
    sys.exit(f"two versions of one package in {sys.argv[1]}")
if missing:
    sys.exit("requirements neither carried nor on the image:\n  " + "\n  ".join(missing))
print(f"{len(wheels)} wheels; every requirement is carried or on the image")
EOF
du -sh "$DEST"
# The device call sends the working tree (tracked + untracked-not-ignored files) plus the carry:
# 64 MiB in all.
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  tree=$(cd "$ROOT" && git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
         | awk '{s += $1} END {print s + 0}')
  carry=$(du -sb "$DEST" | cut -f1)
  total=$(( (tree + carry) / 1048576 ))
  echo "working tree $(( tree / 1048576 )) MiB + carry $(( carry / 1048576 )) MiB = $total MiB (limit 64)"
  (( total < 62 )) || { echo "too large for one device call" >&2; exit 1; }
fi
