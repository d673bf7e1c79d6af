#!/usr/bin/env bash
# The checks that need a GPU, in one run: the fused kernel and the GPU engine tests, the API tests against
# a server on the GPU, our GRU against cuDNN, and the load comparison with the service on the GPU.
# Run from the repository root on a machine with CUDA torch and the runtime and test dependencies.
# Every step runs even when one before it fails; the exit status says whether any failed.
set -uo pipefail
export PYTHONUNBUFFERED=1
status=0
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())' || status=1
GRU_DEVICE=cuda python3 -m pytest -p no:cacheprovider -q \
  tests/model/test_fused.py tests/model/test_gru.py tests/model/test_forecaster.py \
  tests/service/test_engine.py tests/service/test_api_operations.py tests/service/test_api_sessions.py \
  tests/service/test_api_validation.py || status=1
python3 -m bench.cell --device cuda --rounds "${ROUNDS:-2}" --min-run-time "${MIN_RUN_TIME:-0.1}" || status=1
# The row still over the 1.5x target (docs/bench.md part 4: H = 128, B = 256, T = 32), read again.
python3 -m bench.cell --device cuda --shapes 4,128,1 --batches 256 --steps 32 --rounds 5 || status=1
python3 -m bench.load --targets naive ours --duration "${DURATION:-5}" --warmup 1 || status=1
exit $status
