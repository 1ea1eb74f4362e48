export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 COMPACT_SEARCH_GIT_SHA=$SHA TRITON_INTERPRET=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/diffusers-0.42.1-py3-none-any.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:.
mkdir -p $OUT/tests $OUT/compile
timeout 150 python3 -m pytest -q -m gpu tests/test_fp8_kernel_gpu.py -p no:cacheprovider -k "prepass or token_major or outlier or (test_fp8_kernel_on_gpu and (gluon- or portable) and not lookahead and not two-level and not natural and not chain and not cvt and not stages)" 2>&1 | tail -5 | tee $OUT/tests/log.txt
timeout 420 python3 -m benchmarks.bench_compile --shapes wan14b-720p --precisions bf16,fp8 --out $OUT/compile 2>&1 | grep -v -i warn | tee $OUT/compile/log.txt | tail -12
