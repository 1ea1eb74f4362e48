"""Accuracy of the 8-bit attention method on CPU (torch emulation), with its error split apart.

    python -m benchmarks.fp8_accuracy

For Gaussian q/k/v, q/k with four channels scaled x20 (head dims 128 and 64, N 2,048) and q/k/v
of every layer of the built-in model (one sampling step, N 2,048, d 64), against the fp32 dense
reference: cosine similarity and relative L2 error of

- the method (``emulate_quantize_qkv`` + ``emulate_fp8_attention``: what the kernels compute),
- the method with its row sums of the rounded P that P V multiplies (``sum_rounded_p=True``:
  the Gluon kernel's default ``mma_row_sum``) instead of P before rounding (the portable
  kernel),
- the method with V in two e4m3 terms (``v_terms=2``: V's rounding error in a second term),
- the method with INT8 P V (``v_format="int8"``: V per channel in INT8, P rounded to INT8
  against each tile's own max),
- the method without the Hadamard rotation,
- its INT8 scores alone (dequantized Q K^T, exact softmax and fp32 P V),
- the same scores with Q and K in FP8 e4m3 instead (same rotation, smoothing and scale groups),
- its FP8 P V alone (exact scores; P and V rounded to e4m3 as the method rounds them, V's mean
  corrected as the method corrects it).

Then an N sweep (Gaussian q/k/v, d 128, 2 heads, N 2,048 / 16,384 / 65,536 keys, the first 256
query rows against all of them): the method as it is (V's mean corrected by its mean rounding
error), with two V terms, with INT8 P V, with V's plain mean, and FP8 V alone (exact P) with
and without the correction.

Prints markdown tables and appends the rows to benchmarks/results/fp8_accuracy.csv.
"""

from __future__ import annotations

import torch

from benchmarks.common import RESULTS, append_rows
from compact_search.environment import environment
from compact_search.runtime.kernels.reference_fp8 import emulate_fp8_attention
from compact_search.runtime.lut import build_block_lut
from compact_search.runtime.quantize import (
    E4M3_MAX,
    emulate_quantize_qkv,
    hadamard_matrix,
    to_e4m3,
)

BLOCK = 128
OUTLIER_CHANNELS = (3, 17, 40, 61)


def _dense(q, k, v, probs_fn=None, scores=None):
    scores = (
        q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5 if scores is None else scores
    )
    probs = torch.softmax(scores, -1)
    return probs @ v.float() if probs_fn is None else probs_fn(probs)


def _measures(out, expected) -> tuple[float, float]:
    a, b = out.double().flatten(), expected.double().flatten()
    return (
        torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
        ((a - b).norm() / b.norm()).item(),
    )


def split_errors(q, k, v) -> dict[str, tuple[float, float]]:
    seq_len, head_dim = q.shape[2], q.shape[3]
    num_blocks = -(-seq_len // BLOCK)
    lut = build_block_lut(
        torch.ones(1, num_blocks, num_blocks, dtype=torch.bool), seq_len=seq_len, block_size=BLOCK
    )
    expected = _dense(q, k, v)
    results = {}
    for name, rotate, v_terms, v_format, sum_rounded_p in (
        ("method", True, 1, "e4m3", False),
        ("rounded row sums", True, 1, "e4m3", True),
        ("two V terms", True, 2, "e4m3", False),
        ("INT8 P V", True, 1, "int8", False),
        ("no rotation", False, 1, "e4m3", False),
    ):
        quantized = emulate_quantize_qkv(
            q,
            k,
            v,
            block_size=BLOCK,
            key_lengths=lut.key_lengths,
            rotate=rotate,
            v_terms=v_terms,
            v_format=v_format,
        )
        out = emulate_fp8_attention(
            quantized, lut, scale=head_dim**-0.5, sum_rounded_p=sum_rounded_p
        )
        results[name] = _measures(out, expected)
        if name == "method":
            q_back = quantized.q.float() * quantized.q_scale[..., None]
            k_scale = quantized.k_scale.repeat_interleave(BLOCK, -1)[..., None]
            k_back = quantized.k.float() * k_scale
            scores = (q_back @ k_back.transpose(-1, -2))[:, :, :seq_len, :seq_len]
            scores = scores * quantized.score_scale * head_dim**-0.5
            results["INT8 scores only"] = _measures(_dense(q, k, v, scores=scores), expected)

    hadamard = hadamard_matrix(head_dim, dtype=torch.float64)
    q_rot = (q.double() @ hadamard).float()
    k_rot = (k.double() @ hadamard).float()
    k_rot = k_rot - k_rot.mean(-2, keepdim=True)
    q_scale = q_rot.abs().amax(-1, keepdim=True) / E4M3_MAX
    k_blocks = torch.nn.functional.pad(k_rot, (0, 0, 0, num_blocks * BLOCK - seq_len))
    k_blocks = k_blocks.reshape(*k.shape[:2], num_blocks, BLOCK * head_dim)
    k_scale = (k_blocks.abs().amax(-1, keepdim=True) / E4M3_MAX).repeat_interleave(BLOCK, -2)
    k_scale = k_scale[:, :, :seq_len]
    q_back = to_e4m3(q_rot / q_scale).float() * q_scale
    k_back = to_e4m3(k_rot / k_scale).float() * k_scale
    scores = q_back @ k_back.transpose(-1, -2) / head_dim * head_dim**-0.5
    results["FP8 scores only"] = _measures(_dense(q, k, v, scores=scores), expected)

    centred = v.float() - v.float().mean(-2, keepdim=True)
    v_scale = centred.abs().amax(-2, keepdim=True) / E4M3_MAX
    rounded = to_e4m3(centred / v_scale).float()
    # V's mean less its mean rounding error, as the method adds it back.
    v_mean = (
        v.float().mean(-2, keepdim=True) - (rounded - centred / v_scale).mean(-2, True) * v_scale
    )
    v8 = rounded * v_scale + v_mean

    def fp8_pv(probs):
        p8 = to_e4m3(probs / probs.amax(-1, keepdim=True) * E4M3_MAX).float()
        return p8 @ v8 / (probs / probs.amax(-1, keepdim=True) * E4M3_MAX).sum(-1, keepdim=True)

    results["FP8 P V only"] = _measures(_dense(q, k, v, probs_fn=fp8_pv), expected)
    return results


def synthetic(kind: str, head_dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 2048, head_dim, generator=generator) for _ in range(3))
    if kind == "outliers":
        channels = torch.tensor(OUTLIER_CHANNELS)
        q[..., channels] *= 20
        k[..., channels] *= 20
    return tuple(t.bfloat16() for t in (q, k, v))


def built_in_model_layers():
    from compact_search.models.tiny import load_tiny_pipeline
    from compact_search.models.wan import install_wan_attention

    pipeline = load_tiny_pipeline("cpu")
    captured = {}

    def record(layer, q, k, v):
        captured[layer] = tuple(t.bfloat16() for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    with install_wan_attention(pipeline.transformer, record):
        pipeline(["a red ball bouncing"], num_steps=1, guidance_scale=1.0, seed=0)
    return captured


SWEEP_KEYS = (2048, 16384, 65536)
SWEEP_QUERY_ROWS = 256  # two query blocks: dense fp64 scores of every row would not fit at 64k


def n_sweep_errors(seq_len: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    """The first ``SWEEP_QUERY_ROWS`` rows of dense attention over ``seq_len`` Gaussian keys."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, seq_len, 128, generator=generator).bfloat16() for _ in range(3))
    num_blocks = -(-seq_len // BLOCK)
    lut = build_block_lut(
        torch.ones(1, num_blocks, num_blocks, dtype=torch.bool), seq_len=seq_len, block_size=BLOCK
    )
    rows = SWEEP_QUERY_ROWS
    probs = torch.softmax(q[:, :, :rows].double() @ k.double().transpose(-1, -2) / 128**0.5, -1)
    expected = probs @ v.double()  # [1, 2, rows, D]
    quantized = emulate_quantize_qkv(q, k, v, block_size=BLOCK, key_lengths=lut.key_lengths)
    out = emulate_fp8_attention(quantized, lut, scale=128**-0.5, query_blocks=rows // BLOCK)
    two_terms = emulate_quantize_qkv(
        q, k, v, block_size=BLOCK, key_lengths=lut.key_lengths, v_terms=2
    )
    two_terms_out = emulate_fp8_attention(
        two_terms, lut, scale=128**-0.5, query_blocks=rows // BLOCK
    )
    int8_v = emulate_quantize_qkv(
        q, k, v, block_size=BLOCK, key_lengths=lut.key_lengths, v_format="int8"
    )
    int8_pv_out = emulate_fp8_attention(int8_v, lut, scale=128**-0.5, query_blocks=rows // BLOCK)
    # Every row has keys, so V's plain mean (the one V was centred on) only shifts the output.
    plain_mean = v.float().mean(2)
    v8 = quantized.v_t.float()[..., :seq_len].transpose(-1, -2) * quantized.v_scale[:, :, None]
    v_only = (probs @ v8.double()).float()
    return {
        "method": _measures(out, expected),
        "two V terms": _measures(two_terms_out, expected),
        "INT8 P V": _measures(int8_pv_out, expected),
        "method, plain V mean": _measures(
            out + (plain_mean - quantized.v_mean)[:, :, None], expected
        ),
        "FP8 V only": _measures(v_only + quantized.v_mean[:, :, None], expected),
        "FP8 V only, plain V mean": _measures(v_only + plain_mean[:, :, None], expected),
    }


def main() -> None:
    torch.set_grad_enabled(False)
    env = environment()
    cases = {}
    for kind in ("gaussian", "outliers"):
        for head_dim in (128, 64):
            cases[f"{kind} d{head_dim}"] = synthetic(kind, head_dim, seed=head_dim)
    for layer, qkv in sorted(built_in_model_layers().items()):
        cases[f"built-in layer {layer} d64"] = qkv
    rows = []
    columns = (
        "method",
        "rounded row sums",
        "two V terms",
        "INT8 P V",
        "no rotation",
        "INT8 scores only",
        "FP8 scores only",
        "FP8 P V only",
    )
    print("| inputs | " + " | ".join(f"{c} cos / rel L2" for c in columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for name, (q, k, v) in cases.items():
        results = split_errors(q, k, v)
        cells = [f"{results[c][0]:.5f} / {results[c][1]:.2e}" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        for column in columns:
            cosine, rel_l2 = results[column]
            rows.append(
                {**env, "inputs": name, "variant": column, "cosine": cosine, "rel_l2": rel_l2}
            )
    columns = (
        "method",
        "two V terms",
        "INT8 P V",
        "method, plain V mean",
        "FP8 V only",
        "FP8 V only, plain V mean",
    )
    print(
        f"\n| Gaussian d128, {SWEEP_QUERY_ROWS} query rows | "
        + " | ".join(f"{c} cos / rel L2" for c in columns)
        + " |"
    )
    print("| --- |" + " ---: |" * len(columns))
    for seq_len in SWEEP_KEYS:
        results = n_sweep_errors(seq_len)
        cells = [f"{results[c][0]:.5f} / {results[c][1]:.2e}" for c in columns]
        print(f"| N {seq_len} | " + " | ".join(cells) + " |", flush=True)
        for column in columns:
            cosine, rel_l2 = results[column]
            name = f"gaussian d128 N{seq_len} first {SWEEP_QUERY_ROWS} rows"
            rows.append(
                {**env, "inputs": name, "variant": column, "cosine": cosine, "rel_l2": rel_l2}
            )
    append_rows(RESULTS / "fp8_accuracy.csv", rows)


if __name__ == "__main__":
    main()
