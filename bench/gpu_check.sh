#!/usr/bin/env bash
# The GPU check: one command on a Linux machine with an NVIDIA GPU, from a fresh clone.
#
#     bash bench/gpu_check.sh
#
#  1. installs what is missing: numpy, pillow, pytest; the pinned CuPy cupy-cuda12x==14.2.0 (with
#     the CUDA libraries from PyPI, cupy-cuda12x[ctk], where no CUDA toolkit is found); for the
#     comparison, torch==2.13.0 when no CUDA-enabled torch is installed (PyPI's Linux torch is a
#     CUDA build of a few GB; an existing CPU-only torch is left alone and the comparison skipped);
#  2. runs the GPU tests on CuPy and the GPU (MINICNN_TEST_GPU=cupy python -m pytest -k gpu: the
#     tests of tests/test_gpu_path.py that run on the strict stand-in in CI, and the GPU tests of
#     the other files, which skip without a GPU);
#  3. times a VGG16 training step (batch 128, width 1) of minicnn-CuPy against PyTorch-CUDA
#     (bench/train_step.py --device gpu);
#  4. trains CH3 at sparsity 0.5 for 2 epochs on generated CIFAR-10-shaped data on the GPU twice:
#     once straight through, once killed (SIGKILL) in the second epoch and resumed (--resume),
#     and compares the two final checkpoints;
#
# then prints one summary and exits 0, or 1 when a stage failed (2: no GPU). It stops within
# GPU_CHECK_SECONDS (default 600): every stage runs under a time limit taken from what is left.
# Installs go to a virtual environment that sees the system's packages, kept between runs
# (GPU_CHECK_VENV, default ~/.cache/minicnn-gpu-check/venv); work files to a temporary folder
# (kept, named in the summary). Other knobs: PYTHON (default python3), GPU_CHECK_TRAIN /
# GPU_CHECK_TEST (images, default 10000 / 2000).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset MINICNN_CUPY_MODULE               # the real CuPy, not the tests' stand-in
PY="${PYTHON:-python3}"
LIMIT="${GPU_CHECK_SECONDS:-600}"
NTRAIN="${GPU_CHECK_TRAIN:-10000}"
NTEST="${GPU_CHECK_TEST:-2000}"
CUPY_PIN="cupy-cuda12x==14.2.0"
TORCH_PIN="torch==2.13.0"
START=$(date +%s)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/minicnn-gpu-check.XXXXXX")"
declare -a SUMMARY=()
STATUS=0                                # 1 when a stage fails

left() { echo $(( LIMIT - ($(date +%s) - START) )); }
note() { SUMMARY+=("$1"); echo "== $1"; }
# limit WANT [RESERVE]: seconds for a stage: WANT, or what is left less RESERVE for later stages
# (at least 1: a stage out of time stops at once)
limit() {
  local l=$(( $(left) - ${2:-0} ))
  (( l > $1 )) && l=$1
  (( l < 1 )) && l=1
  echo "$l"
}

# shellcheck disable=SC2317  # called by the EXIT trap
summary() {
  echo
  echo "================ GPU check summary ($(( $(date +%s) - START )) s; work files in $WORK) ================"
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
}
trap summary EXIT

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  note "no NVIDIA GPU visible (nvidia-smi): nothing checked"
  exit 2
fi
note "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"

# -- 1. installs -------------------------------------------------------------------------------
# into a virtual environment that sees the system's packages (an installed torch or CuPy is used
# as it is) and is kept between runs; the system Python itself where no venv can be made
VENV="${GPU_CHECK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/minicnn-gpu-check/venv}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" >/dev/null 2>&1 || rm -rf "$VENV"
[ -x "$VENV/bin/python" ] && PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)     # a command, for timeout
note "python: $("$PY" --version 2>&1) ($PY), repository at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
"$PY" -c "import numpy, PIL, pytest" 2>/dev/null || timeout "$(limit 120 420)" "${PIP[@]}" numpy pillow pytest
cupy_works() {             # the pinned version, and it compiles and runs kernels (NVRTC, cuBLAS)
  "$PY" -c "import cupy; assert cupy.__version__ == '${CUPY_PIN#*==}'
assert int(cupy.arange(4).sum()) == 6; cupy.ones((2, 2)) @ cupy.ones((2, 2))" >/dev/null 2>&1
}
if ! cupy_works; then
  timeout "$(limit 180 360)" "${PIP[@]}" "$CUPY_PIN"
  cupy_works || timeout "$(limit 240 300)" "${PIP[@]}" "cupy-cuda12x[ctk]==${CUPY_PIN#*==}"   # CUDA libraries from PyPI
fi
if ! cupy_works; then
  note "CuPy: $CUPY_PIN does not run a kernel here: $("$PY" -c 'import cupy; cupy.arange(2).sum()' 2>&1 | tail -1)"
  exit 1
fi
note "CuPy: $("$PY" -c 'import cupy; print(cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())')"
torch_cuda() { "$PY" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; }
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  timeout "$(limit 240 300)" "${PIP[@]}" "$TORCH_PIN" || echo "gpu_check: $TORCH_PIN not installed in time"
fi
TORCH_FLAG=()
if torch_cuda; then
  note "PyTorch: $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
else
  TORCH_FLAG=(--no-torch)
  note "PyTorch: no CUDA-enabled torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1)): minicnn timed alone"
fi

# -- 2. the GPU tests on CuPy -------------------------------------------------------------------
T=$(limit 200 150)
MINICNN_TEST_GPU=cupy timeout "$T" "$PY" -m pytest -p no:cacheprovider -k gpu tests > "$WORK/tests.log" 2>&1
rc=$?
tail -25 "$WORK/tests.log"
line=$(grep -E "[0-9]+ (passed|failed|error)" "$WORK/tests.log" | tail -1)
note "tests (MINICNN_TEST_GPU=cupy pytest -k gpu): ${line:-no result} (exit $rc$( ((rc == 124)) && echo ", stopped at $T s"))"
((rc == 0)) || STATUS=1

# -- 3. a training step against PyTorch on CUDA -------------------------------------------------
T=$(limit 120 100)
timeout "$T" "$PY" bench/train_step.py --device gpu --steps 5 "${TORCH_FLAG[@]}" --json "$WORK/train_step.json" \
  > "$WORK/train_step.log" 2>&1
rc=$?
sed -n '/^end-to-end step/,/^$/p' "$WORK/train_step.log"
if ((rc == 0)); then
  while IFS= read -r l; do note "train_step: $l"; done \
    < <(sed -n '/^end-to-end step/,/^$/p' "$WORK/train_step.log" | sed -e '/^$/d' -e 's/^ *//')
else
  STATUS=1
  note "train_step.py --device gpu: exit $rc$( ((rc == 124)) && echo ", stopped at $T s"): $(tail -1 "$WORK/train_step.log")"
fi

# -- 4. two epochs on the GPU, straight and killed + resumed -------------------------------------
"$PY" - "$WORK/data" "$NTRAIN" "$NTEST" <<'EOF'
import os, sys
from data import synthetic
root, n_train, n_test = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(root, exist_ok=True)
synthetic.write_cifar_archive(os.path.join(root, "cifar-10-python.tar.gz"), "cifar10",
                              synthetic.random_cifar("cifar10", n_train, n_test, seed=0), compresslevel=1)
EOF
RUN=("$PY" run.py --dataset cifar10 --data-dir "$WORK/data" --method ch3 --sparsity 0.5 --epochs 2
     --warmup-epochs 1 --device gpu)
T=$(( $(limit 400 10) / 3 ))
timeout "$T" "${RUN[@]}" --out "$WORK/straight" > "$WORK/straight.log" 2>&1
rc_straight=$?
"${RUN[@]}" --out "$WORK/killed" > "$WORK/killed.log" 2>&1 &
pid=$!
deadline=$(( $(date +%s) + T ))
while [ ! -e "$WORK/killed/checkpoint.npz" ] && kill -0 "$pid" 2>/dev/null && (( $(date +%s) < deadline )); do sleep 0.2; done
sleep 2                                   # into the second epoch
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
killed_at="$("$PY" -c "import json, numpy
print(json.loads(str(numpy.load('$WORK/killed/checkpoint.npz')['meta']))['epoch'])" 2>/dev/null || echo none)"
finished_before_kill=$([ -e "$WORK/killed/result.json" ] && echo yes || echo no)
timeout "$(limit "$T" 5)" "$PY" run.py --resume "$WORK/killed" > "$WORK/resumed.log" 2>&1
rc_resumed=$?
grep -h "^epoch" "$WORK/straight.log" | tail -2
note "2 epochs CH3 on $NTRAIN+$NTEST CIFAR-shaped images, --device gpu: straight exit $rc_straight; killed with \
a checkpoint of epoch $killed_at (finished before the kill: $finished_before_kill), resumed exit $rc_resumed"
while IFS= read -r l; do note "  $l"; done < <(grep -h "^epoch" "$WORK/straight.log" | sed 's/ ETA.*//')
note "  $("$PY" - "$WORK/straight" "$WORK/killed" <<'EOF' 2>&1 | tail -1
import json, os, sys
import numpy as np
a, b = (np.load(os.path.join(d, "checkpoint.npz")) for d in sys.argv[1:3])
keys = sorted(k for k in a.files if k != "meta")
diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) if a[k].size else 0.0 for k in keys)
same = all(np.array_equal(a[k], b[k]) for k in keys)
acc = [json.load(open(os.path.join(d, "result.json")))["test_acc"] for d in sys.argv[1:3]]
print(f"resumed vs straight: {'bit for bit equal' if same else f'max abs difference {diff:.3g}'} over {len(keys)} arrays; "
      f"test accuracy {acc[0]:.2f}% / {acc[1]:.2f}%")
EOF
)"
((rc_straight == 0 && rc_resumed == 0)) || STATUS=1
exit "$STATUS"
