"""A whole Wan2.1-1.3B text-to-video pipeline, dense vs compact, on a GPU: where the time goes.

The pipeline is built in code with random weights: the Wan2.1-1.3B transformer at full size
(30 layers x 12 heads x 128, bf16), the real AutoencoderKLWan architecture (float32, as Wan's
examples load it), UniPC on flow-matching sigmas (shift 3, Wan's 480p setting), and a small
random UMT5 text encoder (1 layer, d_model 4096 so its embeddings have the shape the transformer
reads, [1, 512, 4096]) with a word-level tokenizer made offline. The text-encoding figure is
therefore that small encoder's, far below the real 5.7B UMT5-XXL's: read it as "not the
bottleneck here", not as Wan's cost.

It runs 480p x 81 frames (grid 21x30x52 = 32,760 tokens), 4 steps, guidance 5 (two transformer
calls a step), one prompt: dense self-attention through cuDNN SDPA, then
`compact_search.apply` with a config of pattern-family masks at mean density ~0.3
(`benchmarks.bench_e2e.random_config`: local, cross, temporal, decaying and peaking heads),
the first step dense. Both go through `compact_search.evaluate.evaluate_configs`, the code
`compact-search evaluate` runs, after one untimed warm-up sample per mode (kernel autotuning):
per-video and per-step time, text encoding / denoising / VAE decoding, self-attention time and
share (timed with a CUDA sync around every call), peak GPU memory; then one more sample per
mode without the attention timer, the end-to-end time without those syncs.

Usage (GPU): python -m benchmarks.bench_pipeline_e2e
CPU smoke test (tiny shapes, same code path): python -m benchmarks.bench_pipeline_e2e --smoke
Appends to benchmarks/results/pipeline_e2e.csv, or $OUT/pipeline_e2e.csv when OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch

from benchmarks.bench_e2e import WAN_COMMON, random_config
from benchmarks.common import RESULTS, append_rows, environment
from compact_search.config import StepSchedule
from compact_search.evaluate import Sample, _sample_once, evaluate_configs
from compact_search.geometry import Grid, TileShape
from compact_search.models.adapters import get_adapter
from compact_search.models.plugin import LoadedModel
from compact_search.models.wan import install_wan_attention

PROMPT = "a red fox runs through fresh snow in a pine forest, the camera tracks it from the side"

FULL = dict(
    transformer=dict(num_attention_heads=12, ffn_dim=8960, num_layers=30, **WAN_COMMON),
    vae=dict(),  # AutoencoderKLWan's defaults are Wan2.1's VAE
    text=dict(d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=2),
    size=dict(height=480, width=832, frames=81),
    tile=(2, 16, 4),
    block_size=128,
    steps=4,
    dtype=torch.bfloat16,
)
SMOKE = dict(
    transformer=dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ),
    vae=dict(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ),
    text=dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2),
    size=dict(height=64, width=64, frames=9),
    tile=(1, 2, 2),
    block_size=16,
    steps=2,
    dtype=torch.float32,
)
DENSITY = 0.3
GUIDANCE = 5.0


def offline_tokenizer(texts: list[str]):
    """A T5-style word-level tokenizer over `texts` (pad 0, eos 1, unk 2), built without files."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t.lower())})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = split
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def build_pipeline(spec: dict, device: torch.device):
    """The random-weight Wan pipeline of `spec` on `device`."""
    import diffusers
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = offline_tokenizer([PROMPT, ""])
    torch.manual_seed(0)
    text = spec["text"]
    encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            **text,
        )
    )
    with torch.device(device):
        transformer = diffusers.WanTransformer3DModel(**spec["transformer"])
        vae = diffusers.AutoencoderKLWan(**spec["vae"])
    if spec["dtype"] != torch.float32:
        # What from_pretrained(torch_dtype=bf16) does: the modules Wan names stay in float32.
        keep = set(transformer._keep_in_fp32_modules or [])
        for name, param in transformer.named_parameters():
            if not keep & set(name.split(".")):
                param.data = param.data.to(spec["dtype"])
    pipe = diffusers.WanPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder.to(device, spec["dtype"]),
        vae=vae,
        transformer=transformer.eval(),
        scheduler=diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def loaded_model(pipe, spec: dict, device: torch.device) -> LoadedModel:
    """The pipeline as `compact-search evaluate` holds a loaded folder: `run` returns latents."""
    size = spec["size"]
    grid = Grid((size["frames"] - 1) // 4 + 1, size["height"] // 16, size["width"] // 16)

    def run(prompts, *, seed, num_steps, guidance_scale, on_step=None):
        def after_step(_pipe, step, _timestep, callback_kwargs):
            if on_step is not None:
                on_step(step + 1)
            return callback_kwargs

        if on_step is not None:
            on_step(0)
        return pipe(
            prompt=list(prompts),
            height=size["height"],
            width=size["width"],
            num_frames=size["frames"],
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator(device=device).manual_seed(seed),
            output_type="latent",
            callback_on_step_end=after_step,
        ).frames

    return LoadedModel(get_adapter("wan"), pipe, (pipe.transformer,), grid, run, "latent")


def cudnn_sdpa(layer, q, k, v):
    """Dense self-attention through cuDNN's SDPA on CUDA (PyTorch's choice elsewhere)."""
    if not q.is_cuda:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny shapes on the CPU.")
    parser.add_argument("--out", type=Path, default=None, help="CSV folder (default $OUT).")
    args = parser.parse_args(argv)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS)
    spec = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke else "cuda")
    env = environment()

    start = time.perf_counter()
    pipe = build_pipeline(spec, device)
    model = loaded_model(pipe, spec, device)
    print(f"pipeline built in {time.perf_counter() - start:.1f} s; grid {model.grid}", flush=True)
    steps = spec["steps"]
    config = random_config(
        "wan2.1-1.3b-random",
        model.num_layers,
        model.num_heads,
        model.grid,
        TileShape(*spec["tile"]),
        DENSITY,
    )
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, head_dim=model.head_dim),
        geometry=dataclasses.replace(config.geometry, block_size=spec["block_size"]),
        schedule=StepSchedule(num_steps=steps, dense_steps=1, bucket_starts=(1,)),
    )
    sample = Sample((PROMPT,), 0)
    run = dict(num_steps=steps, guidance_scale=GUIDANCE, on_step=None, on_progress=None)

    from compact_search import apply

    warm = time.perf_counter()
    with install_wan_attention(pipe.transformer, cudnn_sdpa):
        _sample_once(model, sample, attention=None, **run)
    handle = apply(pipe, config, grid=model.grid)
    _sample_once(model, sample, attention=None, **{**run, "on_step": handle_step(handle, steps)})
    handle.revert()
    print(f"warm-up (dense + compact sample): {time.perf_counter() - warm:.1f} s", flush=True)

    reports, _notes = evaluate_configs(
        model,
        [("compact", config)],
        [sample],
        num_steps=steps,
        guidance_scale=GUIDANCE,
        frames=spec["size"]["frames"],
        dense_attention_fn=cudnn_sdpa,
    )
    report = reports[0]

    untimed = {}
    with install_wan_attention(pipe.transformer, cudnn_sdpa):
        untimed["dense"] = _sample_once(model, sample, attention=None, **run)[1]["total_s"]
    handle = apply(pipe, config, grid=model.grid)
    untimed["compact"] = _sample_once(
        model, sample, attention=None, **{**run, "on_step": handle_step(handle, steps)}
    )[1]["total_s"]
    handle.revert()

    size = spec["size"]
    shape = f"wan1.3b-{size['height']}x{size['width']}x{size['frames']}f"
    rows = []
    for mode, timing in (("dense", report.dense_timing), ("compact", report.compact_timing)):
        memory = timing["peak_memory_bytes"]
        rows.append(
            {
                "benchmark": "pipeline_e2e",
                "shape": shape + ("-smoke" if args.smoke else ""),
                "provider": "cudnn-sdpa" if mode == "dense" else "compact",
                "mode": mode,
                "density": 1.0 if mode == "dense" else round(report.mean_density, 4),
                "steps": steps,
                "dense_steps": 0 if mode == "dense" else config.schedule.dense_steps,
                "per_video_s": round(timing["per_video_s"], 4),
                "per_step_s": round(timing["per_step_s"], 4),
                "text_encode_s": round(timing["text_encode_s"], 4),
                "denoise_s": round(timing["denoise_s"], 4),
                "decode_s": round(timing["decode_s"], 4),
                "attention_s": round(timing["attention_s"], 4),
                "attention_share": round(timing["attention_share"], 4),
                "peak_memory_gib": None if memory is None else round(memory / 2**30, 2),
                "untimed_sample_s": round(untimed[mode], 4),
                "psnr_db_vs_dense": None if mode == "dense" else round(report.mean_psnr_db, 2),
                **env,
            }
        )
    dense_row, compact_row = rows
    for row in rows:
        row["speedup_per_video"] = round(dense_row["per_video_s"] / row["per_video_s"], 3)
        row["speedup_denoise"] = round(dense_row["denoise_s"] / row["denoise_s"], 3)
        row["speedup_untimed"] = round(dense_row["untimed_sample_s"] / row["untimed_sample_s"], 3)
    append_rows(out / "pipeline_e2e.csv", rows)

    keys = (
        "per_video_s",
        "per_step_s",
        "text_encode_s",
        "denoise_s",
        "decode_s",
        "attention_s",
        "attention_share",
        "peak_memory_gib",
        "untimed_sample_s",
        "speedup_per_video",
        "speedup_denoise",
        "speedup_untimed",
    )
    print(f"\n{shape}, {steps} steps, guidance {GUIDANCE}, mean density {report.mean_density:.3f}")
    print(f"{'':22} {'dense':>10} {'compact':>10}")
    for key in keys:
        print(f"{key:22} {dense_row[key]!s:>10} {compact_row[key]!s:>10}")
    print(f"PSNR compact vs dense (random weights): {report.mean_psnr_db:.2f} dB")
    print(f"rows appended to {out / 'pipeline_e2e.csv'}")
    return rows


def handle_step(handle, num_steps: int):
    return lambda step: handle.set_step(step, num_steps)


if __name__ == "__main__":
    main()
