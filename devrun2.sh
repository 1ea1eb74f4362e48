export PYTHONPATH=. TRITON_INTERPRET=0 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 COMPACT_SEARCH_GIT_SHA=$SHA
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/diffusers-0.42.1-py3-none-any.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:.
mkdir -p $OUT/compile
timeout 560 python3 -m benchmarks.bench_compile --shapes wan14b-720p --precisions bf16,fp8 --out /tmp/compile.csv 2>&1 | grep -v -i warn | tee $OUT/compile/log.txt | tail -30
cp /tmp/compile.csv $OUT/compile/ 2>/dev/null
