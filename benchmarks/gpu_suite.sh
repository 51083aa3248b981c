#!/usr/bin/env bash
# The GPU suite: pipeline speed and memory at batch 1 and 4, a G = 12 rollout group, one training iteration with its
# peak memory next to the memory model's estimate, against the recorded original Self-Forcing figures. About 8 minutes
# on one H200; writes one JSON file (default gpu_suite.json).
#
#   bash benchmarks/gpu_suite.sh [OUTPUT.json] [--compile]     # on a GPU machine, from the repository root
#   GPU_SUITE_TINY=1 bash benchmarks/gpu_suite.sh out.json      # tiny sizes on CPU: checks the script itself
#
# Missing Python packages travel as wheels in .whl/ (for a GPU machine without a package index, whose image has torch,
# transformers, peft and accelerate but not diffusers, trl or datasets). Where pip works, from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --platform any -d .whl diffusers==0.42.1 trl==1.16.0 datasets==5.2.0 transformers==5.25.0 \
#       accelerate==1.16.0 peft==0.21.2 huggingface_hub==2.4.0 dill==0.4.1 multiprocess==0.70.19
# (the versions the test suite runs with) and carry .whl with the checkout: this script installs them
# into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
output="${1:-gpu_suite.json}"
shift || true
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
missing=$(python3 -c "
import importlib.util
print(' '.join(m for m in ('diffusers', 'transformers', 'peft', 'accelerate', 'trl', 'datasets') if not importlib.util.find_spec(m)))
")
if [ -n "$missing" ]; then
    echo "gpu_suite: missing Python packages: $missing (put their wheels in .whl/, see the header of this script)" >&2
    exit 1
fi
tiny=()
if [ "${GPU_SUITE_TINY:-0}" = "1" ]; then
    tiny=(--tiny --repeats 1)
fi
python3 benchmarks/gpu_suite.py "$output" "${tiny[@]}" "$@"
