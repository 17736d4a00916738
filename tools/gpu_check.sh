#!/usr/bin/env bash
# GPU check, one script for a bare GPU machine (about 7 minutes on an H100):
#   1. installs what the machine lacks from wheels carried in .whl/ (cuCIM and nvImageCodec for GPU
#      decoding, OpenSlide for the reference reader, imagecodecs to write the synthetic JPEG slides,
#      kornia for the reference's augmentations);
#   2. builds and installs this package in place (falls back to a plain CMake build when pip cannot);
#   3. tools/gpu_check.py: GPU paths against CPU paths, Triton kernels against their twins, rates;
#   4. `gigassl-fast bench --quick --device cuda`, then the full-size train and embed benchmarks, and
#      encode on a 2-slide realistic cohort at Naug 50 x Nt 256 (4 slides with GPU_CHECK_FULL_ENCODE=1).
# Usage, from the repository root:  bash tools/gpu_check.sh      (results in $OUT or bench_out/)
# Fetch the wheels beforehand on a machine with pip access: bash tools/fetch_gpu_wheels.sh 3.12
set -uo pipefail
out="${OUT:-bench_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() { echo; echo "#### $* ($(date +%T))"; }

step "install carried wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true

step "build and install gigassl-fast"
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/build.log 2>&1; then
  echo "pip install -e . failed (tail of build.log below); building with CMake directly"
  tail -5 /tmp/build.log
  cmake -S . -B build/gpu -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" >>/tmp/build.log 2>&1 \
    && cmake --build build/gpu -j 16 >>/tmp/build.log 2>&1 || { tail -20 /tmp/build.log; exit 1; }
  cp build/gpu/_core*.so python/gigassl_fast/
  ln -sfn ../../kernels python/gigassl_fast/kernels
  ln -sfn ../../benchmarks python/gigassl_fast/benchmarks
  export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m gigassl_fast info

step "gpu_check.py"
python3 tools/gpu_check.py --out "$out" "$@"
check=$?

step "bench --quick on the GPU"
timeout 240 python3 -m gigassl_fast bench --quick --device cuda --out "$out/bench_quick"

step "bench (full settings: train, embed) on the GPU"
timeout 300 python3 -m gigassl_fast bench --stages train,embed --device cuda --out "$out/bench_full"

step "encode on a realistic cohort at Naug 50 x Nt 256 on the GPU, ours against the reference"
slides=2; [ "${GPU_CHECK_FULL_ENCODE:-0}" = 1 ] && slides=4
timeout 300 python3 benchmarks/bench_encode.py --slides "$slides" --device cuda --workdir /tmp/gigassl_workloads \
  --out "$out/bench_encode_cohort.json"

step "done"
exit $check
