#!/usr/bin/env bash
# Fetches into .whl/ the wheels that tools/gpu_check.sh installs on a bare GPU machine with no
# package index: cuCIM and nvImageCodec (GPU decoding), OpenSlide (the reference reader), imagecodecs
# (JPEG for the synthetic slides), kornia (the encode reference's augmentations). Run where pip can reach PyPI; PY is the GPU machine's Python version.
# nvImageCodec ships an extension per Python version and cuCIM its test data: both are dropped, which
# keeps the set near 51 MB (the device tool carries 64 MiB at most).
#   bash tools/fetch_gpu_wheels.sh [PY=3.12]
set -euo pipefail
py="${1:-3.12}"
tag="cp${py/./}"
dest=.whl
tmp=$(mktemp -d)
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" \
  cucim-cu13 "nvidia-nvimgcodec-cu13>=0.9,<0.10" openslide-python openslide-bin imagecodecs kornia kornia_rs
for whl in "$tmp"/*.whl; do
  name=$(basename "$whl")
  case "$name" in
    nvidia_nvimgcodec*|cucim*)
      dir="$tmp/unpacked"; rm -rf "$dir"; mkdir -p "$dir"; (cd "$dir" && python3 -m zipfile -e "$whl" .)
      find "$dir" -name "nvimgcodec_impl.cpython-*" ! -name "*cpython-${tag#cp}-*" -delete
      find "$dir" -path "*/tests/*" -type f -delete
      # RECORD must list only what the wheel holds
      python3 - "$dir" <<'PY'
import glob, os, sys
root = sys.argv[1]
for rec in glob.glob(os.path.join(root, "*.dist-info", "RECORD")):
    keep = [l for l in open(rec) if os.path.exists(os.path.join(root, l.split(",")[0])) or l.startswith(os.path.relpath(rec, root))]
    open(rec, "w").writelines(keep)
PY
      rm -f "$dest/$name"; (cd "$dir" && python3 -m zipfile -c "$OLDPWD/$dest/$name" $(ls -A)) ;;
    *) cp "$whl" "$dest/" ;;
  esac
done
rm -rf "$tmp"
du -sh "$dest"; ls "$dest"
