"""The public entry point `sparse_attention`: argument checks and the one place a kernel is chosen.

Backends (the `backend=` argument):

- "reference": PyTorch (`kernels/reference.py`), any device and float dtype;
- "triton-portable": the portable Triton kernel (`kernels/triton_portable.py`): every GPU, any
  power-of-two block size, the Triton interpreter on CPU;
- "triton-gluon": the warp-specialized Hopper kernel (`kernels/gluon_hopper.py`); ValueError
  where it cannot run;
- "triton": the Gluon kernel where it runs (compiled, Hopper, block size 128, TMA layouts), else
  the portable one;
- "flex": FlexAttention with the same block mask (`kernels/flex.py`), for comparison and interop;
- "auto": "triton" on CUDA, "reference" elsewhere (on CPU the interpreter is far slower).

Precisions (the `precision=` argument): "bf16" runs the kernels above; "fp8" (INT8 Q K^T, FP8
e4m3 P V) and "int8" (INT8 Q K^T and P V: slower, more accurate) run each one's 8-bit twin after
the pre-pass of `runtime/quantize.py`: `kernels/reference_fp8.py` (the exact torch emulation, for
"reference" and "auto" off CUDA), `kernels/triton_portable_fp8.py` (GPUs with FP8 tensor cores,
the interpreter) and `kernels/gluon_hopper_fp8.py` (Hopper, block size 128, any input layout),
chosen as their 16-bit twins are; the twins of both 8-bit precisions are the same functions, told
V's format (`KernelEntry.options`). "flex" has none (ValueError).

A Triton backend (or "auto" on CUDA) given a dtype or head dim the kernels do not take runs the
reference instead and says so in one warning per distinct reason; an 8-bit precision where no
8-bit kernel runs (block sizes other than 64 and 128, GPUs without FP8 tensor cores) runs as
"bf16", also after one warning. The kernel modules never import each other; they are imported here
on first use, so the 16-bit reference path never loads triton (the 8-bit one does: its pre-pass
module holds the Triton quantization kernels too).

Two PyTorch operators carry the kernels into torch.compile (`torch.library.custom_op`, opaque to
the compiler, with a fake implementation that allocates the output as the kernels do and reads no
data; docs/kernel.md says why not `triton_op`):

- `compact_search::sparse_attention` (q, k, v, block mask): what `sparse_attention` calls; its
  kernels build their lookup tables from the mask (cached per mask object) when it runs;
- `compact_search::sparse_attention_lut` (q, k, v, the five lookup tables): tables built
  beforehand, so nothing is built, looked up or read back to the host when it runs; what
  `apply`'s runtime calls (`lut_sparse_attention`), and what a CUDA graph can capture.

Both choose the kernel when they run, from the real tensors (the Gluon kernel needs aligned
addresses), and return a tensor in q's memory order. `recorded_kernels()` lists the kernels they
ran (so a test that names a backend can assert that this backend ran and did not fall back).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from compact_search.geometry import DEFAULT_BLOCK_SIZE
from compact_search.runtime.kernels.common import lut_tensors, mask_lut, unsupported_reason
from compact_search.runtime.lut import BlockLUT

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# "bf16": the kernels compute in the inputs' 16-bit dtype with fp32 accumulation; "fp8": INT8
# Q K^T and FP8 e4m3 P V after the pre-pass of runtime/quantize.py; "int8": INT8 Q K^T and INT8
# P V, P rounded against each tile's own row max (docs/kernel.md, "INT8 P V").
PRECISIONS = ("bf16", "fp8", "int8")
# V's 8-bit format at each 8-bit precision (`quantize_qkv(v_format=)`).
PRECISION_V_FORMATS = {"fp8": "e4m3", "int8": "int8"}
EIGHT_BIT_PRECISIONS = tuple(PRECISION_V_FORMATS)


class KernelEntry(NamedTuple):
    """What a kernel runs: called as run(q, k, v, block_mask, *, block_size, scale,
    key_block_lengths) and run_lut(q, k, v, lut, *, block_size, scale, **options)."""

    module: str
    from_mask: str | None  # None: its tables come from the mask here (`kernels.common.mask_lut`)
    from_luts: str
    options: tuple[tuple[str, str], ...] = ()  # keyword arguments of both functions


# A backend names a 16-bit kernel; an 8-bit precision runs its twin (EIGHT_BIT_TWINS), named
# "<kernel>-<precision>".
_SIXTEEN_BIT_KERNELS = {
    "reference": KernelEntry(
        "compact_search.runtime.kernels.reference",
        "reference_sparse_attention",
        "reference_lut_attention",
    ),
    "triton-portable": KernelEntry(
        "compact_search.runtime.kernels.triton_portable",
        "portable_sparse_attention",
        "portable_lut_attention",
    ),
    "triton-gluon": KernelEntry(
        "compact_search.runtime.kernels.gluon_hopper",
        "gluon_sparse_attention",
        "gluon_lut_attention",
    ),
    "flex": KernelEntry(
        "compact_search.runtime.kernels.flex", "flex_sparse_attention", "flex_lut_attention"
    ),
}
_EIGHT_BIT_KERNELS = {
    "reference": ("compact_search.runtime.kernels.reference_fp8", "reference_fp8_lut_attention"),
    "triton-portable": (
        "compact_search.runtime.kernels.triton_portable_fp8",
        "portable_fp8_lut_attention",
    ),
    "triton-gluon": (
        "compact_search.runtime.kernels.gluon_hopper_fp8",
        "gluon_fp8_lut_attention",
    ),
}
EIGHT_BIT_TWINS = {
    precision: {kernel: f"{kernel}-{precision}" for kernel in _EIGHT_BIT_KERNELS}
    for precision in EIGHT_BIT_PRECISIONS
}
KERNELS = _SIXTEEN_BIT_KERNELS | {
    EIGHT_BIT_TWINS[precision][kernel]: KernelEntry(
        module, None, from_luts, (("v_format", PRECISION_V_FORMATS[precision]),)
    )
    for precision in EIGHT_BIT_PRECISIONS
    for kernel, (module, from_luts) in _EIGHT_BIT_KERNELS.items()
}
# Each 8-bit twin's precision; every other kernel computes in bf16 (its inputs' 16-bit dtype).
_TWIN_PRECISIONS = {
    twin: precision for precision, twins in EIGHT_BIT_TWINS.items() for twin in twins.values()
}
BACKENDS = ("auto", "triton", "reference", "triton-portable", "triton-gluon", "flex")
FP8_BLOCK_SIZES = (64, 128)

_warned_fallbacks: set[str] = set()
# The lists `recorded_kernels` hands out: every operator call appends the kernel it ran.
_kernel_records: list[list[str]] = []


@contextlib.contextmanager
def recorded_kernels() -> Iterator[list[str]]:
    """The kernels (keys of KERNELS) the operators run inside the ``with`` block, in call order.

    Recorded when an operator runs, so calls inside compiled graphs count too.
    """
    record: list[str] = []
    _kernel_records.append(record)
    try:
        yield record
    finally:
        # By identity: an inner record equal to an outer one must not take the outer's place.
        _kernel_records[:] = [other for other in _kernel_records if other is not record]


def _choose_and_record(q, k, v, block_size: int, backend: str, precision: str = "bf16") -> str:
    kernel, fallback = choose_kernel(q, k, v, block_size, backend, precision)
    _warn_fallback(fallback)
    for record in _kernel_records:
        record.append(kernel)
    return kernel


def _check_arguments(q, k, v, block_mask, block_size, key_block_lengths) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("block_mask", block_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, N, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have one shape [B, H, N, D]: q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be fp16, bf16, fp32 or fp64, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device or block_mask.device != q.device:
        raise ValueError(
            f"q, k, v, block_mask must be on one device: q {q.device}, k {k.device}, "
            f"v {v.device}, block_mask {block_mask.device}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be torch.bool, got {block_mask.dtype}")
    b, h, n, _ = q.shape
    nb = math.ceil(n / block_size)
    if (
        block_mask.dim() != 3
        or block_mask.shape[0] not in (1, h)
        or block_mask.shape[1:] != (nb, nb)
    ):
        raise ValueError(
            f"block_mask must be [H or 1, nb, nb] = [{h} or 1, {nb}, {nb}] for N={n}, "
            f"block_size={block_size}; got {tuple(block_mask.shape)}"
        )
    if key_block_lengths is not None:
        if key_block_lengths.shape != (nb,):
            raise ValueError(
                f"key_block_lengths must be [nb] = [{nb}], got {tuple(key_block_lengths.shape)}"
            )
        if key_block_lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"key_block_lengths must be int32, got {key_block_lengths.dtype}")
        if key_block_lengths.device != q.device:
            raise ValueError(
                f"key_block_lengths must be on {q.device}, got {key_block_lengths.device}"
            )


def kernel_precision(kernel: str) -> str:
    """The arithmetic a kernel (a key of KERNELS) computes in: "bf16" (its inputs' 16-bit dtype),
    "fp8" or "int8"."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}: one of {', '.join(KERNELS)}")
    return _TWIN_PRECISIONS.get(kernel, "bf16")


def _kernel_module(kernel: str):
    try:
        return importlib.import_module(KERNELS[kernel].module)
    except ImportError as error:  # e.g. a Triton without the Gluon Hopper API
        raise ValueError(f"backend {kernel!r} cannot be loaded here: {error}") from error


def kernel_function(kernel: str, *, from_tables: bool = False) -> Callable[..., torch.Tensor]:
    """The function a kernel backend (a key of KERNELS) runs from a block mask, or with
    ``from_tables`` from lookup tables."""
    module = _kernel_module(kernel)
    entry = KERNELS[kernel]
    options = dict(entry.options)
    run_lut = getattr(module, entry.from_luts)
    if from_tables:
        return functools.partial(run_lut, **options) if options else run_lut
    if entry.from_mask is not None:
        run_mask = getattr(module, entry.from_mask)
        return functools.partial(run_mask, **options) if options else run_mask

    def run(q, k, v, block_mask, *, block_size, scale, key_block_lengths):
        lut = mask_lut(q, block_mask, block_size=block_size, key_block_lengths=key_block_lengths)
        return run_lut(q, k, v, lut, block_size=block_size, scale=scale, **options)

    return run


def _gluon_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> bool:
    if not q.is_cuda:
        return False
    try:
        from compact_search.runtime.kernels.gluon_hopper import gluon_supports
    except ImportError:  # a Triton without the Gluon Hopper API
        return False
    # The output buffer is allocated in q's memory order: q stands in for its layout check.
    return gluon_supports(q, k, v, block_size)


def _gluon_fp8_runs(q: torch.Tensor, block_size: int) -> bool:
    if not q.is_cuda:
        return False
    try:
        from compact_search.runtime.kernels.gluon_hopper_fp8 import gluon_fp8_supports
    except ImportError:  # a Triton without the Gluon Hopper API
        return False
    return gluon_fp8_supports(q, block_size)


def _check_backend(backend: str, precision: str = "bf16") -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision in EIGHT_BIT_PRECISIONS and backend == "flex":
        raise ValueError("backend 'flex' has no 8-bit path: use precision 'bf16' with it")


def _eight_bit_kernel(
    q: torch.Tensor, block_size: int, kernel: str, backend: str, precision: str
) -> tuple[str, str | None]:
    """The twin at 8-bit ``precision`` of the 16-bit ``kernel`` chosen for these inputs, or
    ``kernel`` itself and why (a fallback message) where no 8-bit kernel runs them."""
    twins = EIGHT_BIT_TWINS[precision]
    if block_size not in FP8_BLOCK_SIZES:
        return (
            kernel,
            f"block size {block_size} (8-bit kernels take 64 or 128); precision {precision!r} "
            "runs as 'bf16'",
        )
    if kernel == "reference":
        return twins[kernel], None
    from compact_search.runtime.kernels.triton_portable_fp8 import portable_fp8_supports

    # The pre-pass lays the 8-bit operands out itself: Gluon's TMA needs nothing of q, k, v.
    if backend in ("auto", "triton", "triton-gluon") and _gluon_fp8_runs(q, block_size):
        return twins["triton-gluon"], None
    if backend == "triton-gluon":
        raise ValueError(
            "the Gluon 8-bit kernel needs a compiled (not interpreted) Hopper GPU and "
            "block_size 128"
        )
    if portable_fp8_supports(q):
        return twins["triton-portable"], None
    return kernel, (
        f"this GPU has no FP8 tensor cores (compute capability < 8.9); precision {precision!r} "
        "runs as 'bf16'"
    )


def choose_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    backend: str = "auto",
    precision: str = "bf16",
) -> tuple[str, str | None]:
    """The kernel `sparse_attention` runs for these inputs (a key of KERNELS), and what it fell
    back from and to, as a warning's text (None when it did not)."""
    _check_backend(backend, precision)
    # The Triton kernels, 16- and 8-bit alike, take these dtypes and head dims only.
    reason = unsupported_reason(q)
    if backend in ("reference", "flex"):
        kernel = backend
    elif backend == "auto" and not q.is_cuda:
        kernel = "reference"
    elif reason is not None:
        return "reference", f"{reason}; using the reference"
    elif backend in ("auto", "triton"):
        kernel = "triton-gluon" if _gluon_runs(q, k, v, block_size) else "triton-portable"
    else:
        kernel = backend
    if precision == "bf16":
        return kernel, None
    if reason is not None:
        return kernel, f"precision {precision!r} takes no {reason}; it runs as 'bf16'"
    return _eight_bit_kernel(q, block_size, kernel, backend, precision)


def reads_lookup_tables(backend: str, device: torch.device | str) -> bool:
    """Whether what ``backend`` runs on ``device`` reads lookup tables: the Triton kernels do;
    the reference and FlexAttention run from a block mask ("auto" off CUDA is the reference).
    A Triton backend whose inputs fall back to the reference still gets tables (the reference
    rebuilds the mask from them), since the dtype is known only when it runs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend in ("reference", "flex"):
        return False
    return backend != "auto" or torch.device(device).type == "cuda"


def selected_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    backend: str = "auto",
    precision: str = "bf16",
) -> str:
    """What `sparse_attention` runs for these inputs, with the Triton kernel's launch config of
    its latest call (for benchmark logs), e.g. "triton-portable untuned (first config)"."""
    kernel, _ = choose_kernel(q, k, v, block_size, backend, precision)
    launch_config = getattr(_kernel_module(kernel), "autotuned_config", None)
    return kernel if launch_config is None else f"{kernel} {launch_config()}"


def _warn_fallback(fallback: str | None) -> None:
    if fallback is not None and fallback not in _warned_fallbacks:
        _warned_fallbacks.add(fallback)
        warnings.warn(f"sparse_attention: {fallback}", stacklevel=4)


def _in_memory_order_of(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` in ``q``'s memory order: what the operators' fake implementation promises."""
    if out.stride() == q.stride():
        return out
    return torch.empty_like(q).copy_(out)


@torch.library.custom_op("compact_search::sparse_attention", mutates_args=())
def _sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    key_block_lengths: torch.Tensor | None,
    block_size: int,
    scale: float,
    backend: str,
    precision: str,
) -> torch.Tensor:
    kernel = _choose_and_record(q, k, v, block_size, backend, precision)
    out = kernel_function(kernel)(
        q,
        k,
        v,
        block_mask,
        block_size=block_size,
        scale=scale,
        key_block_lengths=key_block_lengths,
    )
    return _in_memory_order_of(q, out)


@torch.library.custom_op("compact_search::sparse_attention_lut", mutates_args=())
def _sparse_attention_lut_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_ids: torch.Tensor,
    full_counts: torch.Tensor,
    total_counts: torch.Tensor,
    key_lengths: torch.Tensor,
    q_block_order: torch.Tensor,
    block_size: int,
    scale: float,
    density: float,
    backend: str,
    precision: str,
) -> torch.Tensor:
    kernel = _choose_and_record(q, k, v, block_size, backend, precision)
    lut = BlockLUT(kv_block_ids, full_counts, total_counts, key_lengths, q_block_order, density)
    out = kernel_function(kernel, from_tables=True)(
        q, k, v, lut, block_size=block_size, scale=scale
    )
    return _in_memory_order_of(q, out)


@_sparse_attention_op.register_fake
@_sparse_attention_lut_op.register_fake
def _output_like_q(q: torch.Tensor, *args) -> torch.Tensor:
    # [B, H, N, D] in q's memory order (token-major storage stays token-major), no data read.
    return torch.empty_like(q)


def lut_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: BlockLUT,
    *,
    block_size: int,
    scale: float | None = None,
    backend: str = "auto",
    precision: str = "bf16",
) -> torch.Tensor:
    """Block-sparse attention from lookup tables built beforehand (`runtime/lut.py`).

    Args:
        q, k, v: [B, H, N, D] as for `sparse_attention`.
        lut: the tables on q's device, for Hm in (1, H) mask heads and nb = ceil(N / block_size)
            blocks; `lut.density` keys the kernels' autotuning.
        block_size, scale, backend, precision: as for `sparse_attention`.

    Returns:
        [B, H, N, D] in q's dtype and memory order. Traceable by torch.compile without a graph
        break, and nothing in it allocates outside the output or synchronises with the GPU, so a
        CUDA graph can capture it. Under an 8-bit precision the pre-pass also allocates the
        quantized operands on every call (a capture of that is not tested).
    """
    _check_backend(backend, precision)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _sparse_attention_lut_op(
        q,
        k,
        v,
        *lut_tensors(lut),
        block_size,
        scale,
        float(lut.density),
        backend,
        precision,
    )


def mask_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    key_block_lengths: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    backend: str = "auto",
    precision: str = "bf16",
) -> torch.Tensor:
    """`sparse_attention` without its argument checks, for callers that built their inputs
    (`apply`'s runtime with the reference or FlexAttention): traceable by torch.compile without a
    graph break. key_block_lengths int32 [nb]."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _sparse_attention_op(
        q, k, v, block_mask, key_block_lengths, block_size, scale, backend, precision
    )


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    scale: float | None = None,
    backend: str = "auto",
    key_block_lengths: torch.Tensor | None = None,
    precision: str = "bf16",
) -> torch.Tensor:
    """Block-sparse attention.

    Args:
        q, k, v: [B, H, N, D], fp16, bf16, fp32 (or fp64 on the reference backend), one device.
        block_mask: bool [H, nb, nb] or [1, nb, nb], nb = ceil(N / block_size): query block i of
            head h attends key block j iff block_mask[h, i, j].
        block_size: tokens per mask block (a power of two >= 16 for the Triton kernels).
        scale: softmax scale, D ** -0.5 when None.
        backend: "auto", "reference", "triton", "triton-portable", "triton-gluon" or "flex"
            (see the module doc); the Triton kernels take fp16/bf16 and head dim 64 or 128, other
            inputs run the reference after one warning.
        key_block_lengths: optional int32 [nb]: only the first key_block_lengths[j] keys of block
            j are valid (padding of tiled layouts); default all, with the ragged last block.
        precision: "bf16" (the kernels compute in q's 16-bit dtype, fp32 accumulation), "fp8"
            (INT8 Q K^T and FP8 e4m3 P V after a quantizing pre-pass, docs/kernel.md) or "int8"
            (INT8 Q K^T and P V: the same pre-pass with V in INT8, ~15% slower than "fp8" on
            Hopper and about half its error): the Gluon 8-bit kernel on Hopper at block size
            128, the portable 8-bit kernel on other GPUs with FP8 tensor cores and under the
            interpreter, its exact torch emulation on the reference backend (and on CPU under
            "auto"); elsewhere, or for inputs the 8-bit kernels do not take, the "bf16" path
            after one warning. Not with backend "flex". At 8 bits a non-finite key or value
            anywhere in a head (kept block or not) makes that head's output non-finite: the
            pre-pass takes statistics over all its keys.

    Returns:
        [B, H, N, D] in q's dtype; a query with no valid kept key outputs zeros.
    """
    _check_arguments(q, k, v, block_mask, block_size, key_block_lengths)
    _check_backend(backend, precision)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.shape[2] == 0:
        return torch.empty_like(q)
    if key_block_lengths is not None:
        key_block_lengths = key_block_lengths.to(torch.int32)
    return _sparse_attention_op(
        q, k, v, block_mask, key_block_lengths, block_size, scale, backend, precision
    )
