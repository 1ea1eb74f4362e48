"""The Gluon Hopper kernel compiled for sm_90 on this (GPU-less) machine.

Gluon does not run under the Triton interpreter, so CI cannot execute the kernel; it can compile
it, which catches the breakage most likely between Triton releases (Gluon's API is experimental)
and checks the resource budget the design depends on: no register spills and the shared memory
of one CTA per SM. Numerics are checked on a GPU by tests/test_triton_kernel_gpu.py.

The compile runs in a child process without TRITON_INTERPRET (the test session sets it, and
under it Triton's own library functions cannot be compiled): ``python tests/test_gluon_compile.py
HEAD_DIM DTYPE BLOCK_N STAGES PINGPONG`` prints what the test checks as JSON.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

gluon_hopper = pytest.importorskip(
    "compact_search.runtime.kernels.gluon_hopper", reason="this Triton has no Gluon Hopper API"
)

from sass_checks import descriptor_reads_before_writes, disassemble  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from compact_search import sparse_attention  # noqa: E402

H100_SHARED_MEMORY = 227 * 1024  # bytes one CTA may use on sm_90


def compile_for_hopper(head_dim: int, dtype: torch.dtype, config):
    """triton.compile of the kernel for sm_90 with the signature a real launch would have."""
    import triton
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    kernel = gluon_hopper._gluon_block_sparse_attention_kernel
    names = list(inspect.signature(kernel.fn).parameters)
    # Descriptors need a tensor only for dtype, shape and strides; nothing is launched.
    stand_in = torch.empty(1, 2, 256, head_dim, dtype=dtype)
    rows = gluon_hopper.GLUON_BLOCK_SIZE // 2
    descriptors = {
        "q_desc": gluon_hopper._descriptor(stand_in, rows),
        "k_desc": gluon_hopper._descriptor(stand_in, config.block_n),
        "v_desc": gluon_hopper._descriptor(stand_in, config.block_n),
        "o_desc": gluon_hopper._descriptor(stand_in, rows),
    }
    constants = {
        "HEAD_DIM": head_dim,
        "BLOCK_N": config.block_n,
        "STAGES": config.stages,
        "PINGPONG": config.pingpong,
    }
    signature, constexprs = {}, {}
    for index, name in enumerate(names):
        if name in descriptors:
            signature[name] = mangle_type(descriptors[name])
        elif name in constants:
            signature[name] = "constexpr"
            constexprs[(index,)] = constants[name]
        elif name.endswith("_ptr"):
            signature[name] = "*i32"
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    source = GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {
        "num_warps": gluon_hopper.CONSUMER_WARPS.value,
        "maxnreg": gluon_hopper.MAX_REGISTERS,
    }
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.parametrize(
    "head_dim, dtype, config",
    [
        (128, torch.bfloat16, gluon_hopper.GluonConfig()),
        (64, torch.float16, gluon_hopper.GluonConfig()),
        (128, torch.float16, gluon_hopper.GluonConfig(block_n=64, stages=3, pingpong=True)),
    ],
    ids=["d128-bf16-default", "d64-fp16-default", "d128-fp16-bn64-pingpong"],
)
def test_kernel_compiles_for_hopper_without_spills(head_dim, dtype, config) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [str(head_dim), str(dtype).removeprefix("torch."), str(config.block_n)]
    args += [str(config.stages), str(int(config.pingpong))]
    done = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["wgmma"]  # tensor-core path, not an FMA fallback
    assert facts["setmaxnreg"]  # warp specialization reassigned registers
    assert not facts["local_memory"]  # no register spills
    assert facts["shared"] <= H100_SHARED_MEMORY
    # wgmma descriptors from uniform registers written on every path (tests/sass_checks.py)
    assert facts["descriptor_reads_before_writes"] == 0


def test_gluon_config_rejects_tiles_that_do_not_divide_the_block() -> None:
    with pytest.raises(ValueError, match="block_n"):
        gluon_hopper.GluonConfig(block_n=96)


def test_explicit_gluon_kernel_off_hopper_is_a_clear_error() -> None:
    q = torch.randn(1, 2, 256, 64, dtype=torch.float16)
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="Gluon kernel needs"):
        sparse_attention(q, q, q, mask, block_size=128, backend="triton-gluon")
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_attention(q, q, q, mask, block_size=128, backend="triton-fast")


if __name__ == "__main__":
    head_dim, dtype_name, block_n, stages, pingpong = sys.argv[1:6]
    compiled = compile_for_hopper(
        int(head_dim),
        getattr(torch, dtype_name),
        gluon_hopper.GluonConfig(int(block_n), int(stages), bool(int(pingpong))),
    )
    ptx = compiled.asm["ptx"]
    _, sass = disassemble(compiled.asm["cubin"])
    facts = {
        "wgmma": "wgmma.mma_async" in ptx,
        "setmaxnreg": "setmaxnreg" in ptx,
        "local_memory": "ld.local" in ptx or "st.local" in ptx,
        "shared": compiled.metadata.shared,
        "descriptor_reads_before_writes": len(descriptor_reads_before_writes(sass)),
    }
    print(json.dumps(facts))


def test_triton_backend_picks_gluon_only_where_it_runs(monkeypatch):
    from compact_search.runtime.attention import choose_kernel

    q = torch.empty(1, 2, 256, 64, dtype=torch.float16)
    # A CUDA tensor without a GPU: the chooser reads only is_cuda, dtype and shape.
    cuda_q = torch.empty(1, 2, 256, 64, dtype=torch.float16, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: t.device.type == "meta"))
    monkeypatch.setattr(gluon_hopper, "gluon_supports", lambda *args, **kwargs: True)
    choose = lambda backend, x=cuda_q: choose_kernel(x, x, x, 128, backend)  # noqa: E731
    assert choose("auto") == choose("triton") == ("triton-gluon", None)
    assert choose("triton-gluon") == ("triton-gluon", None)
    assert choose("triton-portable") == ("triton-portable", None)
    assert choose("auto", q) == ("reference", None)  # CPU: the interpreter is no default
    monkeypatch.setattr(gluon_hopper, "gluon_supports", lambda *args, **kwargs: False)
    assert choose("auto") == choose("triton") == ("triton-portable", None)
    fp32 = cuda_q.float()
    kernel, reason = choose("triton-gluon", fp32)
    assert kernel == "reference" and "dtype torch.float32" in reason


def test_gluon_supports_nothing_off_the_gpu():
    token_major = torch.empty(1, 64, 2, 64, dtype=torch.bfloat16).transpose(1, 2)
    assert not gluon_hopper.gluon_supports(token_major, token_major, token_major, 128)  # CPU
