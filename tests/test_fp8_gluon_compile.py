"""The Gluon 8-bit Hopper kernel compiled for sm_90 on this GPU-less machine.

As tests/test_gluon_compile.py does for the bf16 kernel: Gluon does not run under the
interpreter, so CI compiles the kernel and checks the facts its speed rests on: INT8 and FP8
wgmma in the PTX (not a conversion to 16-bit math), registers handed from the loaders to the
consumers, no local-memory spills and shared memory within one CTA's limit. Numbers are checked
on a GPU by tests/test_fp8_kernel_gpu.py.

The compile runs in a child process without TRITON_INTERPRET; ``python
tests/test_fp8_gluon_compile.py HEAD_DIM DTYPE V_TERMS STAGES ROWS_PER_CTA SWITCHES...`` (0/1
each, in ``SWITCHES`` order) prints the facts as JSON.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys

import pytest
import torch

gluon_fp8 = pytest.importorskip(
    "compact_search.runtime.kernels.gluon_hopper_fp8", reason="this Triton has no Gluon Hopper API"
)

from sass_checks import descriptor_reads_before_writes, disassemble  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from compact_search.runtime.quantize import QuantizedQKV  # noqa: E402

H100_SHARED_MEMORY = 227 * 1024  # bytes one CTA may use on sm_90
FP32_POINTERS = ("q_scale_ptr", "k_scale_ptr", "v_scale_ptr", "v_mean_ptr")


def _stand_in(head_dim: int, v_terms: int = 1, v_format: str = "e4m3") -> QuantizedQKV:
    """Tensors with the dtypes, shapes and strides of a real call (nothing is launched)."""
    batch, heads, padded_len = 1, 2, 256
    int8 = torch.empty(batch, heads, padded_len, head_dim, dtype=torch.int8)
    fp32 = torch.empty(1)
    v_dtype = torch.int8 if v_format == "int8" else torch.float8_e4m3fn
    v_t = torch.empty(batch, heads, v_terms * head_dim, padded_len, dtype=v_dtype)
    return QuantizedQKV(int8, fp32, int8, fp32, v_t, fp32, fp32, fp32, 128, 250, True)


def compile_for_hopper(
    head_dim: int, dtype: torch.dtype, config, v_terms: int = 1, v_format: str = "e4m3"
):
    import triton
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    kernel = gluon_fp8._gluon_fp8_attention_kernel
    out = torch.empty(1, 2, 250, head_dim, dtype=dtype)
    names = ("q_desc", "k_desc", "v_desc", "o_desc")
    stand_in = _stand_in(head_dim, v_terms, v_format)
    descriptors = dict(zip(names, gluon_fp8.descriptors(stand_in, out), strict=True))
    constants = {"HEAD_DIM": head_dim, "V_TERMS": v_terms, **config.kwargs()}
    constants["INT8_PV"] = v_format == "int8"
    signature, constexprs = {}, {}
    for index, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in descriptors:
            signature[name] = mangle_type(descriptors[name])
        elif name in constants:
            signature[name] = "constexpr"
            constexprs[(index,)] = constants[name]
        elif name in FP32_POINTERS:
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = "*i32"
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    source = GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": gluon_fp8.CONSUMER_WARPS.value, "maxnreg": gluon_fp8.MAX_REGISTERS}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def innermost_loops(sass: str) -> list[list[str]]:
    """The opcodes of each loop of the disassembly that holds no other loop (a backward branch
    and its target bound a loop), in address order."""
    instructions = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    addresses = [int(address, 16) for address, _ in instructions]
    index = {address: i for i, address in enumerate(addresses)}
    loops = []
    for i, (_, text) in enumerate(instructions):
        target = re.search(r"\bBRA\s+(?:\S+\s+)?0x([0-9a-f]+)", text)
        if (
            target
            and int(target.group(1), 16) in index
            and int(target.group(1), 16) <= addresses[i]
        ):
            loops.append((index[int(target.group(1), 16)], i))
    inner = [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]
    return [
        [
            re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
            for _, text in instructions[s : e + 1]
        ]
        for s, e in sorted(inner)
    ]


E4M3_SELF_PAIR = re.compile(r"cvt\.rn\.satfinite\.e4m3x2\.f32\s+%rs\d+, (%r\d+), \1;")


def compiled_facts(
    head_dim: int, dtype: torch.dtype, config, v_terms: int = 1, v_format: str = "e4m3"
) -> dict:
    compiled = compile_for_hopper(head_dim, dtype, config, v_terms, v_format)
    ptx = compiled.asm["ptx"]
    usage, sass = disassemble(compiled.asm["cubin"])
    loops = innermost_loops(sass)
    # The first loop with both matmuls is warpgroup 0's loop over fully valid key blocks (with
    # INT8 P V both are IGMMA: Q K^T's four k-steps and at least as many of P V's).
    if v_format == "int8":
        main_loop = next(ops for ops in loops if ops.count("IGMMA") >= 8)
    else:
        main_loop = next(ops for ops in loops if "QGMMA" in ops and "IGMMA" in ops)
    return {
        "loop_spills": [ops.count("STL") + ops.count("LDL") for ops in loops],
        "main_loop": {
            op: main_loop.count(op)
            for op in (
                "PRMT",
                "SHFL",
                "STS",
                "LDS",
                "MUFU",
                "WARPGROUP",
                "STL",
                "LDL",
                "FMUL",
                "BSSY",
                "BSYNC",
                "I2FP",
                "F2I",
            )
        },
        "main_loop_length": len(main_loop),
        "wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.[\w.]+", ptx))),
        "sass_mma": sorted(set(re.findall(r"\b[A-Z]GMMA\.\w+\.\w+\.\w+", sass))),
        "setmaxnreg": "setmaxnreg" in ptx,
        "ptx_local_memory": "ld.local" in ptx or "st.local" in ptx,
        "stack_bytes": int(re.search(r"STACK:(\d+)", usage).group(1)),
        "spill_instructions": len(re.findall(r"\b(?:STL|LDL)\b", sass)),
        "shared": compiled.metadata.shared,
        "cvt_s32_f32": ptx.count("cvt.rn.f32.s32"),
        # One fp32 converted to an e4m3 pair of itself: how the MMA row sum's ones tile was
        # first built, which ptxas 12.8 compiled into a merge with a stray register's bytes.
        "e4m3_self_pairs": len(E4M3_SELF_PAIR.findall(ptx)),
        "descriptor_reads_before_writes": [
            (hex(address), register) for address, register in descriptor_reads_before_writes(sass)
        ],
        "ptxas": gluon_fp8.ptxas_version(),
        # The registers of the two row factors each inlined rescale branch tests.
        "rescale_tests": re.findall(
            r"setp\.neu\.f32 moved, (%r\d+), 0f3F800000;\s*"
            r"setp\.neu\.f32 moved_high, (%r\d+), 0f3F800000;",
            ptx,
        ),
    }


SWITCHES = (
    "pingpong",
    "two_level",
    "magic_i2f",
    "permuted_keys",
    "tree_rows",
    "lookahead",
    "lazy_rescale",
    "mma_row_sum",
)
CONFIGS = [
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config()),
    (64, torch.float16, gluon_fp8.GluonFP8Config()),
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(stages=3, pingpong=True)),
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(two_level=True, magic_i2f=False)),
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(permuted_keys=False)),
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(tree_rows=False)),
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(lazy_rescale=False)),
    (64, torch.float16, gluon_fp8.GluonFP8Config(lazy_rescale=False)),
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(lookahead=True)),
    (64, torch.float16, gluon_fp8.GluonFP8Config(lookahead=True)),
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(stages=3, lookahead=True)),
    # The row sum as an FADD tree on the CUDA cores (what the lookahead keeps).
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(mma_row_sum=False)),
    (64, torch.float16, gluon_fp8.GluonFP8Config(mma_row_sum=False)),
    # Several query blocks a CTA, one after the other.
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(rows_per_cta=2)),
    (64, torch.float16, gluon_fp8.GluonFP8Config(rows_per_cta=3)),
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(rows_per_cta=4, pingpong=True)),
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(rows_per_cta=8, mma_row_sum=False)),
]
# V in two e4m3 terms (quantize_qkv(v_terms=2)): a second P V wgmma from the same registers.
TWO_TERM_CONFIGS = [
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config()),
    (64, torch.float16, gluon_fp8.GluonFP8Config()),
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(pingpong=True)),
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(mma_row_sum=False)),
]
CASES = [(*case, 1) for case in CONFIGS] + [(*case, 2) for case in TWO_TERM_CONFIGS]


def _config_id(case) -> str:
    head_dim, dtype, config, v_terms = case
    return (
        f"d{head_dim}-{str(dtype)[6:]}-s{config.stages}"
        + "".join(f"-{name}" for name in SWITCHES if getattr(config, name))
        + (f"-{config.rows_per_cta}-rows" if config.rows_per_cta > 1 else "")
        + ("-two-v-terms" if v_terms == 2 else "")
    )


@pytest.mark.parametrize("case", CASES, ids=_config_id)
def test_fp8_kernel_compiles_for_hopper_without_spills(case) -> None:
    head_dim, dtype, config, v_terms = case
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [str(head_dim), str(dtype).removeprefix("torch."), str(v_terms), str(config.stages)]
    args += [str(config.rows_per_cta)] + [str(int(getattr(config, n))) for n in SWITCHES]
    done = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    row_sum_mma = "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3"  # P ones^T
    assert set(facts["wgmma"]) == {
        f"wgmma.mma_async.sync.aligned.m64n{head_dim}k32.f32.e4m3.e4m3",  # P V
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8",  # Q K^T; no 16-bit matmul left
    } | ({row_sum_mma} if config.mma_row_sum else set())
    assert set(facts["sass_mma"]) == {
        "IGMMA.64x128x32.S8.S8",
        f"QGMMA.64x{head_dim}x32.F32.E4M3",
    } | ({"QGMMA.64x8x32.F32.E4M3"} if config.mma_row_sum else set())
    assert facts["setmaxnreg"]
    assert not facts["ptx_local_memory"]
    loop = facts["main_loop"]
    # ptxas spills nothing but with two-level accumulation, whose second accumulator does not
    # fit at head dim 128 (why it is off by default), and with the lookahead at head dim 128,
    # whose S tile in flight leaves a padded tile's loop two spilled registers; never in the
    # loop over full tiles.
    if not (head_dim == 128 and config.two_level):
        assert loop["STL"] == loop["LDL"] == 0
    if not (head_dim == 128 and (config.two_level or config.lookahead)) and (
        config.rows_per_cta == 1
    ):
        assert facts["stack_bytes"] == 0 and facts["spill_instructions"] == 0
    if config.rows_per_cta > 1:
        # A row's own values (its output tile's coordinates) wait in local memory through its
        # loops: two registers, stored once and loaded once a row, never in a loop.
        assert facts["stack_bytes"] <= 8 and facts["spill_instructions"] <= 8
        assert not any(loop_spills for loop_spills in facts["loop_spills"])
    if config.lookahead and head_dim == 128:
        assert facts["stack_bytes"] <= 16 and facts["spill_instructions"] <= 8
    # Both matmuls asynchronous: one arrive and one wait a matmul (V's second term and the
    # row sum's wgmma add one more arrive each). Where ptxas cannot prove an accumulator retired
    # before a non-wgmma read, or runs short of registers, it serializes every wgmma of the
    # kernel (warning C7514/C7512), and a wait follows each of them.
    assert loop["WARPGROUP"] == 3 + v_terms + config.mma_row_sum
    # Every wgmma's shared-memory descriptors come from uniform registers written on every path
    # to it. ptxas 12.8 breaks that in the lookahead schedule (the fault seen on the H200,
    # docs/kernel.md), so the launcher refuses that schedule under it.
    reads = facts["descriptor_reads_before_writes"]
    if config.lookahead and tuple(facts["ptxas"]) < gluon_fp8.LOOKAHEAD_MIN_PTXAS:
        assert reads, "this ptxas compiles the lookahead soundly: lower LOOKAHEAD_MIN_PTXAS"
    else:
        assert not reads, reads
    assert facts["shared"] <= H100_SHARED_MEMORY
    assert facts["e4m3_self_pairs"] == 0
    # The integer-add conversion leaves no cvt for the 64 scores a thread holds per tile.
    assert (facts["cvt_s32_f32"] == 0) == config.magic_i2f
    # One exp2 a score a thread holds (64 per 128-key tile), plus the row rescales.
    assert 64 <= loop["MUFU"] <= 68
    # P reaches the tensor cores in its own registers: no trip through shared memory, and with
    # the permuted keys no shuffle but the 8 of the row max and sum and one byte-pair merge per
    # packed register (16); 8-bit values carried across the loop cost ~190 of them instead.
    assert loop["STS"] == loop["LDS"] == 0
    # The row sum on the tensor cores leaves the row max's 4 shuffles, and ~60 fewer
    # instructions (its FADD tree).
    if config.permuted_keys and not config.two_level:
        assert loop["SHFL"] == (4 if config.mma_row_sum else 8)
        assert loop["PRMT"] <= 16  # P is packed once for all its wgmma
        limit = 500 if config.mma_row_sum else 560
        # Several rows a CTA: ~10 more integer instructions a tile (ptxas's address arithmetic
        # with the loop over rows around it; the same with the loops counting ring tiles).
        limit += 15 if config.rows_per_cta > 1 else 0
        assert facts["main_loop_length"] <= limit + 20 * (v_terms - 1)
    # The accumulator rescale: a thread's D / 2 multiplies, in the lazy default behind one
    # branch (ptxas's BSSY/BSYNC reconvergence around it) over a thread whose two rows' max did
    # not move. The branch tests value 0's and value 2's factor: two different registers, so
    # one of each of the thread's two rows (were they one row, the other's rescale would be
    # skipped whenever only it moved).
    lazy = config.lazy_rescale and not (config.two_level or config.lookahead)
    assert loop["FMUL"] >= head_dim // 2
    assert (loop["BSSY"], loop["BSYNC"]) == ((1, 1) if lazy else (0, 0))
    tests = facts["rescale_tests"]
    assert bool(tests) == lazy
    assert all(first != second for first, second in tests), tests


# INT8 P V (quantize_qkv(v_format="int8")): the switches that apply to it.
INT8_PV_CONFIGS = [
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config()),
    (64, torch.float16, gluon_fp8.GluonFP8Config()),
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(stages=3, pingpong=True)),
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(permuted_keys=False)),
    (128, torch.bfloat16, gluon_fp8.GluonFP8Config(rows_per_cta=3)),
]


@pytest.mark.parametrize("case", INT8_PV_CONFIGS, ids=lambda case: _config_id((*case, 1)))
def test_int8_pv_kernel_compiles_for_hopper(case) -> None:
    head_dim, dtype, config = case
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [str(head_dim), str(dtype).removeprefix("torch."), "int8", str(config.stages)]
    args += [str(config.rows_per_cta)] + [str(int(getattr(config, n))) for n in SWITCHES]
    done = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    # Every matmul in INT8: Q K^T, P V and P's row sums (P ones^T); no FP8 or 16-bit one.
    assert set(facts["wgmma"]) == {
        f"wgmma.mma_async.sync.aligned.m64n{head_dim}k32.s32.s8.s8",
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8",
        "wgmma.mma_async.sync.aligned.m64n8k32.s32.s8.s8",
    }
    assert set(facts["sass_mma"]) == {
        "IGMMA.64x128x32.S8.S8",
        f"IGMMA.64x{head_dim}x32.S8.S8",
        "IGMMA.64x8x32.S8.S8",
    }
    assert facts["setmaxnreg"] and not facts["ptx_local_memory"]
    loop = facts["main_loop"]
    # The loop over full tiles spills nothing: P V is issued before S_j, so its int32 product
    # is merged while S_j runs and is not live through the softmax with the fp32 accumulator
    # and the score tile (issued the other way round, 42 spill instructions). At head dim 128
    # the padded tiles' loops (a few tiles a row) spill 3 registers.
    assert loop["STL"] == loop["LDL"] == 0
    if head_dim == 64:
        assert facts["stack_bytes"] == 0 and facts["spill_instructions"] == 0
    else:
        assert all(spills <= 8 for spills in facts["loop_spills"])
    # One arrive a wgmma (P V, its row sums, S) and two waits.
    assert loop["WARPGROUP"] == 5
    assert not facts["descriptor_reads_before_writes"]
    assert facts["shared"] <= H100_SHARED_MEMORY
    # exp2: 64 scores a thread, plus each row's factor and weight.
    assert 64 <= loop["MUFU"] <= 70
    assert loop["STS"] == loop["LDS"] == 0
    # The scores by the integer add; the int32 P V product (D / 2 values a thread) and the 4
    # row sums a tile by the conversion instruction, each value then one fused multiply-add;
    # P packed to INT8 by the magic add and 3 byte permutes a register (48), no float-to-int
    # conversion; the lazy rescale's branch as in the FP8 path.
    assert loop["I2FP"] == head_dim // 2 + 4
    assert loop["F2I"] == 0
    if config.permuted_keys:
        assert loop["SHFL"] == 4 and loop["PRMT"] == 48
        # ~200 more than the FP8 kernel's 482: P's magic add, and the product's conversion and
        # fused multiply-add a value of the accumulator (681 at D 128; with the magic-number
        # conversion and its bias taken out, 745).
        assert facts["main_loop_length"] <= (700 if head_dim == 128 else 600)
    assert (loop["BSSY"], loop["BSYNC"]) == (1, 1)


# The pre-pass and portable kernels run under the interpreter in CI; compiling them for sm_90 as
# well catches what only the compiler rejects (a global that is not constexpr, a dot it cannot
# lower) and what only ptxas shows (spills). Pointer and scalar types by argument name; the rest
# are int32.
PORTABLE_TYPES = {
    "_key_value_stats_kernel": {
        ("k_ptr", "v_ptr", "hadamard_ptr"): "*bf16",
        ("key_lengths_ptr",): "*i32",
        ("k_sum_ptr", "v_sum_ptr", "v_max_ptr", "v_min_ptr"): "*fp32",
    },
    "_quantize_kernel": {
        ("q_ptr", "k_ptr", "v_ptr", "hadamard_ptr"): "*bf16",
        ("key_lengths_ptr",): "*i32",
        ("k_mean_ptr", "v_mean_ptr", "v_inverse_scale_ptr", "q_scale_ptr", "k_scale_ptr"): "*fp32",
        ("v_error_sum_ptr",): "*fp32",
        ("q8_ptr", "k8_ptr"): "*i8",
        ("v8_ptr",): "*fp8e4nv",
    },
    "_finalize_stats_kernel": {
        ("k_sum_ptr", "v_sum_ptr", "v_max_ptr", "v_min_ptr", "hadamard_ptr"): "*fp32",
        ("stats_ptr",): "*fp32",
        ("key_lengths_ptr",): "*i32",
    },
    "_corrected_v_mean_kernel": {
        ("v_mean_ptr", "v_scale_ptr", "error_sums_ptr", "out_ptr"): "*fp32",
        ("key_lengths_ptr",): "*i32",
    },
    "_fp8_block_sparse_attention_kernel": {
        ("q8_ptr", "k8_ptr"): "*i8",
        ("v8_ptr",): "*fp8e4nv",
        ("q_scale_ptr", "k_scale_ptr", "v_scale_ptr", "v_mean_ptr"): "*fp32",
        ("o_ptr",): "*bf16",
        ("qk_scale",): "fp32",
    },
}
# (kernel, constexprs other than the defaults below, what it launches with): the statistics
# kernel as it runs (keys summed unrotated) and with the rotation on the tensor cores (a bench
# variant), the quantization kernel in both V^T store paths at its launch's warp count.
PORTABLE_CASES = {
    "stats": ("_key_value_stats_kernel", {"ROTATE": False}),
    "stats-rotated": ("_key_value_stats_kernel", {"ROTATE": True}),
    # The former statistics kernel: whole [128, 128] tiles, each reduced over its rows.
    "stats-whole-blocks": ("_key_value_stats_kernel", {"ROTATE": False, "ROWS": 0}),
    "quantize": ("_quantize_kernel", {"PERMUTE_IN_REGISTERS": False}),
    "quantize-permuted": ("_quantize_kernel", {"PERMUTE_IN_REGISTERS": True}),
    "quantize-permuted-two-v-terms": (
        "_quantize_kernel",
        {"PERMUTE_IN_REGISTERS": True, "V_TERMS": 2},
    ),
    "quantize-values-only": ("_quantize_kernel", {"PERMUTE_IN_REGISTERS": True, "PARTS": 4}),
    "quantize-queries": ("_quantize_kernel", {"PARTS": 1}),
    "quantize-queries-looped": (
        "_quantize_kernel",
        {"PARTS": 1, "BLOCKS_PER_PROGRAM": 4, "LOAD_STAGES": 2},
    ),
    "quantize-keys-looped": (
        "_quantize_kernel",
        {"PARTS": 2, "BLOCKS_PER_PROGRAM": 4, "LOAD_STAGES": 3},
    ),
    # quantize_qkv(rotate=False): no Hadamard matrix is loaded or multiplied.
    "quantize-keys-unrotated-looped": (
        "_quantize_kernel",
        {"PARTS": 2, "BLOCKS_PER_PROGRAM": 4, "LOAD_STAGES": 2, "ROTATE": False},
    ),
    # The sums of the statistics' partials and V's corrected mean: one small launch each.
    "finalize": ("_finalize_stats_kernel", {"CHUNK_ROWS": 16, "ROTATE_SUM": True}),
    "finalize-unrotated": ("_finalize_stats_kernel", {"CHUNK_ROWS": 16, "ROTATE_SUM": False}),
    "correction": ("_corrected_v_mean_kernel", {"BLOCK_ROWS": 16}),
    "attention-two-v-terms": ("_fp8_block_sparse_attention_kernel", {"V_TERMS": 2}),
    "attention": ("_fp8_block_sparse_attention_kernel", {}),
}


def compile_portable_for_hopper(case: str) -> tuple[str, int, int]:
    """(PTX, stack bytes, registers a thread) of one ``tl`` kernel of the 8-bit path for sm_90
    (head dim 128, block 128), at the warp count its launcher uses."""
    import triton
    from triton.compiler import ASTSource

    from compact_search.runtime import quantize
    from compact_search.runtime.kernels import triton_portable_fp8 as triton_fp8

    name, overrides = PORTABLE_CASES[case]
    kernel = getattr(quantize, name, None) or getattr(triton_fp8, name)
    types = {arg: kind for args, kind in PORTABLE_TYPES[name].items() for arg in args}
    constants = {"HEAD_DIM": 128, "BLOCK_SIZE": 128, "ROTATE": True, "EMULATE_ROUNDING": False}
    constants["HARDWARE_E4M3"] = True  # what a GPU launch passes
    constants |= {"WGMMA_KEY_ORDER": True, **overrides}
    if name == "_key_value_stats_kernel":
        constants["BLOCKS_PER_PROGRAM"] = quantize.STATS_BLOCKS_PER_PROGRAM
        constants["ROWS"] = overrides.get("ROWS", quantize.STATS_ROWS)
    signature, constexprs, attrs = {}, {}, {}
    for index, (arg, parameter) in enumerate(inspect.signature(kernel.fn).parameters.items()):
        if arg not in constants and parameter.default is not inspect.Parameter.empty:
            constants[arg] = parameter.default  # a constexpr with a default, as a launch omits it
        if arg in constants:
            signature[arg] = "constexpr"
            constexprs[(index,)] = constants[arg]
        else:
            signature[arg] = types.get(arg, "*i32" if arg.endswith("_ptr") else "i32")
        # What a launch with contiguous [B, H, N, 128] tensors specializes on: 16-byte aligned
        # pointers and strides (without it the loads are scalar and the register count is not
        # the one a GPU runs).
        if arg.endswith("_ptr") or arg.startswith("stride_") or arg == "padded_len":
            attrs[(index,)] = [["tt.divisibility", 16]]
    warps = {
        "_key_value_stats_kernel": quantize.STATS_NUM_WARPS,
        "_quantize_kernel": quantize.QUANTIZE_NUM_WARPS,
        "_finalize_stats_kernel": 4,
        "_corrected_v_mean_kernel": 4,
    }.get(name, 8)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}
    )
    usage, _ = disassemble(compiled.asm["cubin"])
    stack_bytes = int(re.search(r"STACK:(\d+)", usage).group(1))
    return compiled.asm["ptx"], stack_bytes, int(re.search(r"REG:(\d+)", usage).group(1))


@pytest.mark.parametrize("case", list(PORTABLE_CASES))
def test_portable_8bit_kernels_compile_for_hopper(case: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, __file__, "portable", case],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    mma = set(facts["wgmma"])
    if case.startswith("attention"):
        assert any(".s32.s8.s8" in m for m in mma) and any(".e4m3.e4m3" in m for m in mma)
    elif case in ("stats", "stats-whole-blocks", "quantize-values-only") or "unrotated" in case:
        assert not mma and not facts["mma_sync"]  # no matmul
    elif case == "stats-rotated":  # [16, D] steps: too few rows for wgmma, mma.sync does it
        assert not mma and any(".bf16.bf16" in m for m in facts["mma_sync"])
    elif case in ("finalize", "correction"):  # [D] x [D, D] as products and sums, no matmul
        assert not mma and facts["stack_bytes"] == 0
    else:  # the Hadamard rotation runs on the tensor cores
        assert any(".bf16.bf16" in m for m in mma)
    if case.startswith("quantize"):
        # Three [128, 128] fp32 tiles and two Hadamard dots: at 4 warps they spill
        # (QUANTIZE_NUM_WARPS says so), at the launch's 8 they fit.
        assert facts["stack_bytes"] == 0
        # V rounded by the conversion instruction, as a GPU launch does: with the rounding in
        # integer arithmetic V's launch took 163 registers, one CTA an SM (the pre-pass's
        # slowest launch on the H200); now under 128, two or more.
        if PORTABLE_CASES[case][1].get("PARTS", 7) & 4:
            assert facts["e4m3_conversions"] == ["cvt.rn.satfinite.e4m3x2.f32"]
    if case == "quantize-values-only":
        assert facts["registers"] <= 128
    # The statistics kernel folds [16, D] steps into elementwise running statistics: under 128
    # registers at 4 warps (4 CTAs an SM or more); whole [128, 128] tiles took all 255.
    if case == "stats":
        assert facts["registers"] <= 128 and facts["stack_bytes"] == 0
    if case == "stats-whole-blocks":
        assert facts["registers"] > 200
    # Q's and K's programs looping over blocks: the pipeliner copies each tile straight into
    # the shared memory the Hadamard product reads (cp.async) instead of staging it from
    # registers, as the one-block programs do.
    if case.startswith("quantize"):
        assert (facts["cp_async"] > 0) == case.endswith("-looped")


def test_lookahead_is_refused_under_a_ptxas_that_miscompiles_it(monkeypatch) -> None:
    monkeypatch.setattr(gluon_fp8, "ptxas_version", lambda: (12, 8))
    out = torch.empty(1, 2, 250, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="ptxas >= 12.9"):
        gluon_fp8.gluon_fp8_attention(
            _stand_in(128), None, out, scale=1.0, config=gluon_fp8.GluonFP8Config(lookahead=True)
        )


def test_fp8_config_rejects_ring_depths_it_does_not_fit() -> None:
    with pytest.raises(ValueError, match="stages"):
        gluon_fp8.GluonFP8Config(stages=5)
    with pytest.raises(ValueError, match="stages"):
        gluon_fp8.GluonFP8Config(stages=1, lookahead=True)


@pytest.mark.parametrize("threshold", [-1.0, 9.0])
def test_fp8_config_rejects_rescale_thresholds_that_would_saturate_p(threshold) -> None:
    # P is scaled by 448 * 2^-threshold: past 8 the row max's own P leaves e4m3's normals.
    with pytest.raises(ValueError, match="rescale_threshold"):
        gluon_fp8.GluonFP8Config(rescale_threshold=threshold)


@pytest.mark.parametrize("switch", ["pingpong", "two_level", "mma_row_sum"])
def test_fp8_config_rejects_lookahead_with_turns_two_levels_or_mma_row_sum(switch) -> None:
    with pytest.raises(ValueError, match="lookahead"):
        gluon_fp8.GluonFP8Config(lookahead=True, **{switch: True})


if __name__ == "__main__" and sys.argv[1] == "portable":
    ptx, stack_bytes, registers = compile_portable_for_hopper(sys.argv[2])
    found = re.findall(r"wgmma\.mma_async\.sync\.aligned\.[\w.]+", ptx)
    facts = {"wgmma": sorted(set(found)), "stack_bytes": stack_bytes, "registers": registers}
    facts["e4m3_conversions"] = sorted(set(re.findall(r"cvt\.rn\.satfinite\.e4m3x2\.f32", ptx)))
    facts["cp_async"] = len(re.findall(r"\bcp\.async\.c[ag]\b", ptx))
    facts["mma_sync"] = sorted(set(re.findall(r"mma\.sync\.aligned\.[\w.]+", ptx)))
    print(json.dumps(facts))
elif __name__ == "__main__":
    # V_TERMS: 1, 2, or "int8" (one INT8 term).
    head_dim, dtype_name, v_terms, stages, rows_per_cta, *switches = sys.argv[1:]
    v_format = "int8" if v_terms == "int8" else "e4m3"
    v_terms = "1" if v_terms == "int8" else v_terms
    config = gluon_fp8.GluonFP8Config(
        int(stages),
        rows_per_cta=int(rows_per_cta),
        **{name: bool(int(on)) for name, on in zip(SWITCHES, switches, strict=True)},
    )
    facts = compiled_facts(
        int(head_dim), getattr(torch, dtype_name), config, int(v_terms), v_format
    )
    print(json.dumps(facts))


@pytest.mark.parametrize(
    "options", [{"two_level": True}, {"mma_row_sum": False}, {"rescale_threshold": 1.0}]
)
def test_int8_pv_refuses_the_switches_it_does_not_take(options) -> None:
    from compact_search.runtime.lut import build_block_lut

    lut = build_block_lut(torch.ones(1, 2, 2, dtype=torch.bool), seq_len=250, block_size=128)
    out = torch.empty(1, 2, 250, 128, dtype=torch.bfloat16)
    config = gluon_fp8.GluonFP8Config(**options)
    with pytest.raises(ValueError, match="INT8 P V"):
        gluon_fp8.gluon_fp8_attention(
            _stand_in(128, v_format="int8"), lut, out, scale=0.1, config=config
        )
