#!/usr/bin/env bash
# GPU check: installs what a bare GPU machine lacks from wheels carried in .whl/ (cuCIM, this package's
# pure-Python dependencies), builds the package, then checks GPU against CPU paths and times them.
# Usage on the GPU machine, from the repository root:  bash benchmarks/gpu_check.sh
set -euo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || python3 -m pip install -q --no-deps -e .
python3 benchmarks/gpu_check.py "$@"
python3 -m gigassl_fast bench --quick --out "${OUT:-bench_out}/bench_gpu"
