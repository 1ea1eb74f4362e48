set -x
export PYTHONPATH=. TRITON_INTERPRET=0 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 COMPACT_SEARCH_GIT_SHA=$SHA
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv
python3 -c "import optuna" 2>/dev/null || echo "no optuna"
mkdir -p $OUT/tests $OUT/probe $OUT/rising
timeout 250 python3 -m pytest -q -m gpu tests/test_fp8_kernel_gpu.py -x -k "not lookahead" -p no:cacheprovider 2>&1 | tail -25 | tee $OUT/tests/log.txt
OUT=$OUT/probe timeout 200 python3 -m benchmarks.bench_fp8 --probe --variants default,eager-rescale,threshold1,threshold3,pingpong,pingpong-eager-rescale --csv /tmp/probe.csv 2>&1 | grep -v Warning | tail -40
OUT=$OUT/rising timeout 120 python3 -m benchmarks.bench_fp8 --probe --inputs rising --shapes wan2.1-14b-720p --variants default,eager-rescale,threshold3 --csv /tmp/rising.csv 2>&1 | grep -v Warning | tail -12
