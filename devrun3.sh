export PYTHONPATH=. TRITON_INTERPRET=0 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 COMPACT_SEARCH_GIT_SHA=$SHA
mkdir -p $OUT/prepass
OUT=$OUT/prepass timeout 400 python3 -m benchmarks.bench_prepass --shapes wan2.1-14b-720p --csv $OUT/prepass/prepass.csv 2>&1 | grep -v -i warn | tee $OUT/prepass/log.txt | grep -v "^\s*$" | tail -60
