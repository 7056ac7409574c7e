#!/usr/bin/env bash
# One command for a GPU machine: the `gpu` tests, then the full benchmark grid (CUDA sizes),
# raw pytest-benchmark JSON named after the device: benchmarks/results/<device>-<date>.json.
#
#   benchmarks/gpu_check.sh            # run (aim: under 10 minutes on an H100)
#   benchmarks/gpu_check.sh --dry-run  # print what it would run, run nothing (works on CPU)
#
# Budget: pytest's --timeout is not assumed installed; each step is wrapped in `timeout`.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY="${PYTHON:-python}"

if [[ $DRY == 1 ]]; then
  DEVICE="${GPU_CHECK_DEVICE:-<device>}"
else
  DEVICE="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')"
  if [[ -z "$DEVICE" ]]; then
    echo "gpu_check.sh: no CUDA device (torch.cuda.is_available() is False); try --dry-run" >&2
    exit 2
  fi
fi
SLUG="$(printf '%s' "$DEVICE" | tr -c 'A-Za-z0-9._-' '-' | sed 's/--*/-/g; s/^-//; s/-$//')"
OUT="benchmarks/results/${SLUG}-$(date +%Y%m%d-%H%M).json"

STEPS=(
  "timeout 180 $PY -m pytest -q -m gpu tests"
  "timeout 420 $PY -m pytest -q benchmarks/test_supcon_bank.py benchmarks/test_smsa_attention.py --benchmark-only --benchmark-json=$OUT"
)

if [[ $DRY == 1 ]]; then
  echo "would write: $OUT"
  for s in "${STEPS[@]}"; do echo "would run: $s"; done
  exit 0
fi

mkdir -p benchmarks/results
status=0
for s in "${STEPS[@]}"; do
  echo "gpu_check.sh: $s"
  eval "$s" || status=$?
done
echo "gpu_check.sh: benchmark JSON -> $OUT (exit $status)"
exit $status
