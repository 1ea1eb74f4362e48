export PYTHONPATH=. NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 COMPACT_SEARCH_GIT_SHA=$SHA TRITON_INTERPRET=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/sageattention-1.0.6-py3-none-any.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:.
mkdir -p $OUT/bench
OUT=$OUT/bench timeout 400 python3 -m benchmarks.bench_fp8 --csv $OUT/bench/fp8.csv 2>&1 | grep -v -i warn | tail -45
