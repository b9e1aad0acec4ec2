#!/usr/bin/env bash
# py-spy host profiles of decode steps on a lent GPU machine (see bench/host_profile.py):
#   [BATCH=32] bash bench/gpu_host_profiles.sh OUT_DIR MODE...      (e.g. off copy:ngram copy:draft)
# Needs `make gpu-wheels` (py-spy) in build/gpu-wheels; writes OUT_DIR/host_<mode>.{txt,sum}.
set -u
cd "$(dirname "$0")/.."
out=$1; shift
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site build/gpu-wheels/*.whl
export PYTHONPATH=worker/src:/tmp/site PYTHONUNBUFFERED=1
for mode in "$@"; do
  name=${mode//[:=]/_}_b${BATCH:-1}
  timeout 120 /tmp/site/bin/py-spy record --format raw -r 250 -o "$out/host_$name.txt" -- \
    python3 bench/host_profile.py --mode "$mode" --batch-size "${BATCH:-1}" --seconds 12 2>&1 | grep -v py-spy | tail -1
  python3 bench/host_profile.py --summarize "$out/host_$name.txt" > "$out/host_$name.sum"
  head -25 "$out/host_$name.sum"
done
