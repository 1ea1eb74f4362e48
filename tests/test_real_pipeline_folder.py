"""A diffusers pipeline folder on disk, driven through every command of docs/real-models.md.

Tiny random-weight Wan2.1, CogVideoX and HunyuanVideo pipelines are built in code (transformer,
VAE, text encoders, the scheduler the published checkpoints use, and tokenizers made offline) and
saved with `save_pretrained`. On each folder: `profile` (for Wan also under torchrun) ->
`optimize` -> `export` (and `--recall 0.85`) -> `check` on a profile of held-out prompts, then
step 4's Python: `from_pretrained`, `compact_search.apply(pipe, "config.json")`, a generation,
`handle.revert()`, the one-line error at another resolution and `apply(..., rescale=True,
grid=...)`. HunyuanVideo's prompts differ in real text length: step 4 runs a prompt shorter
than the longest profiled one (its missing text tokens are padded and masked as keys).

Random weights attend almost uniformly, so the search keeps most tiles (mean density ~0.9): the
tests pin the plumbing between a real pipeline folder and every stage, not sparsity.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from cli_runner import run
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import compact_search
from compact_search.config import load_config
from compact_search.errors import UserInputError
from compact_search.models import diffusers_folder
from compact_search.models.adapters import get_adapter
from compact_search.profiling import load_profile

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "a golden retriever runs across a sunlit meadow, slow motion",
    "a busy city street at night in the rain, the camera tracks forward",
]
HELD_OUT = [
    "waves crash against black rocks at sunset, aerial shot",
    "an astronaut floats inside a space station, soft light",
]
# 128x128 pixels, 9 frames: VAE 4x in time and 8x in space, patch (1, 2, 2) -> grid 3x8x8 = 192.
SIZE = {"height": 128, "width": 128, "frames": 9}
GRID = (3, 8, 8)
OTHER_WIDTH, OTHER_GRID = 160, (3, 8, 10)
STEPS = 6
LAYERS, HEADS, HEAD_DIM = 2, 2, 16


def word_tokenizer(
    texts: list[str], specials: list[str], split, single: str, lowercase: bool = False, **roles
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in code: `specials` first (ids 0, 1, ...), then every piece
    `split` (a pre-tokenizer) cuts `texts` into; `single` is the post-processing template."""
    normalizer = normalizers.Lowercase() if lowercase else None
    pieces = set()
    for text in texts:
        for part in re.split("|".join(map(re.escape, specials)), text):
            part = normalizer.normalize_str(part) if normalizer else part
            pieces |= {piece for piece, _ in split.pre_tokenize_str(part)}
    vocab = {token: i for i, token in enumerate(specials)}
    vocab |= {piece: i + len(specials) for i, piece in enumerate(sorted(pieces))}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=roles["unk_token"]))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = split
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, vocab[t]) for t in specials if t in single.split()]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **roles)


def offline_tokenizer() -> PreTrainedTokenizerFast:
    """A T5-style word tokenizer (pad 0, eos 1, unk 2) over the test prompts; T5 ends every
    prompt with eos."""
    return word_tokenizer(
        PROMPTS + HELD_OUT,
        ["<pad>", "</s>", "<unk>"],
        pre_tokenizers.Whitespace(),
        "$A </s>",
        lowercase=True,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def t5_config(config_class, vocab_size: int):
    return config_class(
        vocab_size=vocab_size,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def build_wan(folder: Path) -> None:
    """Wan2.1's parts at toy size: UMT5 text encoder, Wan VAE (4x time, 8x space), UniPC."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = offline_tokenizer()
    torch.manual_seed(0)
    pipeline = diffusers.WanPipeline(
        tokenizer=tokenizer,
        text_encoder=UMT5EncoderModel(t5_config(UMT5Config, len(tokenizer))),
        vae=diffusers.AutoencoderKLWan(
            base_dim=4,
            z_dim=4,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
        ),
        transformer=diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=HEADS,
            attention_head_dim=HEAD_DIM,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=32,
            ffn_dim=32,
            num_layers=LAYERS,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ),
        # What Wan2.1's diffusers checkpoints sample with: UniPC on flow-matching sigmas.
        scheduler=diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
    )
    pipeline.save_pretrained(folder)


def build_cogvideox(folder: Path, patch_size_t: int | None = None) -> None:
    """CogVideoX's parts at toy size: T5 text encoder, CogVideoX VAE (4x time, 8x space), the
    v-prediction DPM scheduler of CogVideoX-5B. patch_size_t=2 is CogVideoX 1.5's layout."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = offline_tokenizer()
    torch.manual_seed(0)
    pipeline = diffusers.CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=T5EncoderModel(t5_config(T5Config, len(tokenizer))),
        vae=diffusers.AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
        ),
        transformer=diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=HEADS,
            attention_head_dim=HEAD_DIM,
            in_channels=4,
            out_channels=4,
            time_embed_dim=16,
            text_embed_dim=16,
            num_layers=LAYERS,
            sample_width=16,  # latent size: the RoPE grid needs no crop at 128x128
            sample_height=16,
            sample_frames=SIZE["frames"],
            patch_size=2,
            patch_size_t=patch_size_t,
            patch_bias=patch_size_t is None,
            use_rotary_positional_embeddings=True,
        ),
        scheduler=diffusers.CogVideoXDPMScheduler(
            beta_schedule="scaled_linear",
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
            snr_shift_scale=1.0,
            clip_sample=False,
            set_alpha_to_one=True,
        ),
    )
    pipeline.save_pretrained(folder)


# Llama 3's pre-tokenizer pattern. With one token per piece, the part of HunyuanVideo's prompt
# template before the prompt encodes to 95 tokens, the `crop_start` the pipeline cuts off; a
# whitespace split would cut into the prompt or leave template tokens in the text.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_hunyuan(folder: Path) -> None:
    """HunyuanVideo's parts at toy size: a Llama text encoder under the pipeline's default prompt
    template, a CLIP text encoder for the pooled projection, the HunyuanVideo VAE (4x time, 8x
    space), one dual-stream and one single-stream block, flow-matching Euler with shift 7."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    template = DEFAULT_PROMPT_TEMPLATE["template"]
    tokenizer = word_tokenizer(
        [template.format(p) for p in PROMPTS + HELD_OUT],
        ["<|begin_of_text|>", "<|end_of_text|>", "<unk>"]
        + ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        "<|begin_of_text|> $A",
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        unk_token="<unk>",
    )
    tokenizer_2 = word_tokenizer(
        PROMPTS + HELD_OUT,
        ["<|startoftext|>", "<|endoftext|>", "<unk>"],
        pre_tokenizers.Whitespace(),
        "<|startoftext|> $A <|endoftext|>",
        lowercase=True,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    special_ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    torch.manual_seed(0)
    pipeline = diffusers.HunyuanVideoPipeline(
        tokenizer=tokenizer,
        # Two layers: the pipeline takes the hidden states of the third layer from the end.
        text_encoder=LlamaModel(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=512,  # the 95 cropped + 256 text tokens
                **special_ids,
            )
        ),
        tokenizer_2=tokenizer_2,
        text_encoder_2=CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer_2),
                hidden_size=8,
                intermediate_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=8,
                **special_ids,  # the pooled output is read at the first eos
            )
        ),
        vae=diffusers.AutoencoderKLHunyuanVideo(
            latent_channels=4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=2,
        ),
        transformer=diffusers.HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=HEADS,
            attention_head_dim=HEAD_DIM,
            num_layers=LAYERS // 2,  # dual-stream blocks
            num_single_layers=LAYERS - LAYERS // 2,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=2,
            patch_size_t=1,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(4, 6, 6),
        ),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    pipeline.save_pretrained(folder)


@dataclass(frozen=True)
class Case:
    name: str
    adapter: str
    pipeline: str  # the diffusers class step 4 loads the folder with
    build: Callable[[Path], None]
    guidance: float
    store: str
    # Text tokens inside self-attention: CogVideoX's 226 padded T5 tokens; HunyuanVideo's real
    # (unpadded) Llama tokens of the longest prompt, 14 and <|eot_id|>.
    prefix_tokens: int
    # Transformer calls per step with guidance: Wan 2, CogVideoX 1 (batched), HunyuanVideo 1
    # (guidance distilled into the model: an input, not a second pass).
    calls_per_step: int
    text_end: str  # the last text-encoder token the pipeline keeps of a prompt


CASES = [
    Case("wan", "wan", "WanPipeline", build_wan, 5.0, "per-prompt", 0, 2, "</s>"),
    Case(
        "cogvideox",
        "cogvideox",
        "CogVideoXPipeline",
        build_cogvideox,
        6.0,
        "prompt-mean",
        226,
        1,
        "</s>",
    ),
    Case(
        "hunyuanvideo",
        "hunyuanvideo",
        "HunyuanVideoPipeline",
        build_hunyuan,
        6.0,
        "prompt-mean",
        15,
        1,
        "<|eot_id|>",
    ),
]


def profile_toml(case: Case, folder: Path, name: str, prompts_file: str, seed: int, **size) -> str:
    """A profile shaped like profiles/wan2.1-t2v-1.3b.toml, at toy size."""
    size = SIZE | size
    return f"""# {case.name} pipeline folder built by the test: {size["height"]}x{size["width"]}, \
{size["frames"]} frames.
name = "{name}"

[model]
source = {json.dumps(str(folder))}
adapter = "{case.adapter}"
dtype = "float32"

[sampling]
height = {size["height"]}
width = {size["width"]}
frames = {size["frames"]}
steps = {STEPS}
guidance = {case.guidance}
prompts_file = "{prompts_file}"
seeds = [{seed}]

[capture]
steps = [0, 2, 4]
layers = "all"
tiles = [[1, 4, 4], [3, 4, 4], [1, 8, 8]]
store = "{case.store}"
"""


def error_line(stderr: str) -> str:
    """The CLI's one error line; diffusers' loading progress bars share stderr."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@dataclass(frozen=True)
class Workspace:
    case: Case
    root: Path
    folder: Path

    def path(self, name: str) -> Path:
        return self.root / name


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def workspace(request, tmp_path_factory) -> Workspace:
    """The folder saved, profiled (training and held-out prompts), searched and exported with the
    commands of docs/real-models.md steps 2 and 3."""
    case = request.param
    root = tmp_path_factory.mktemp(case.name)
    folder = root / "pipe"
    case.build(folder)
    (root / "prompts.txt").write_text("# one a line\n" + "\n".join(PROMPTS) + "\n")
    (root / "heldout.txt").write_text("\n".join(HELD_OUT) + "\n")
    (root / "model.toml").write_text(profile_toml(case, folder, case.name, "prompts.txt", 0))
    (root / "heldout.toml").write_text(
        profile_toml(case, folder, f"{case.name}-heldout", "heldout.txt", 100)
    )
    assert run("profile", root / "model.toml", "--out", root / "runs/model/profile") == 0
    assert run("profile", root / "heldout.toml", "--out", root / "runs/heldout/profile") == 0
    # Tiles of 16 tokens: at the default block size of 128 each would be padded eightfold and the
    # search could only keep heads dense. One worker and a few trials keep the test short.
    search = ("--trials", "6", "--workers", "1", "--block-size", "16")
    assert (
        run(
            "optimize",
            root / "runs/model/profile",
            "--out",
            root / "runs/model/run",
            "--recall",
            "0.9",
            *search,
        )
        == 0
    )
    assert run("export", root / "runs/model/run", "--out", root / "config.json") == 0
    return Workspace(case, root, folder)


def test_profile_reads_the_pipeline_folder(workspace):
    profile = load_profile(workspace.path("runs/model/profile"))
    case = workspace.case
    assert profile.model == str(workspace.folder) and profile.adapter == case.adapter
    assert profile.grid.as_tuple() == GRID
    assert (profile.num_layers, profile.num_heads, profile.head_dim) == (LAYERS, HEADS, HEAD_DIM)
    assert profile.prefix_tokens == case.prefix_tokens
    assert profile.steps == [0, 2, 4] and profile.prompts == PROMPTS
    mass = profile.sample_tile_mass(1, tile=(1, 4, 4))  # [S, H, 12, 12]: tile grid 3x2x2
    groups = len(PROMPTS) if case.store == "per-prompt" else 1
    assert mass.shape == (3 * groups, HEADS, 12, 12)
    assert torch.isfinite(mass).all()
    torch.testing.assert_close(mass.sum(-1), torch.ones(mass.shape[:-1]))


def test_the_folder_loader_runs_the_pipeline_to_latents(workspace):
    """The loader every diffusers family shares: the folder's own transformer, the run
    profile's grid, steps reported before each step and after the last, latents out."""
    from compact_search.models.adapters import load_model
    from compact_search.profiling import load_run_profile

    model = load_model(load_run_profile(workspace.path("model.toml")), torch.device("cpu"))
    assert model.adapter is get_adapter(workspace.case.adapter) and model.output == "latent"
    assert model.transformers == (model.pipeline.transformer,)
    assert model.grid.as_tuple() == GRID
    steps = []
    latents = model.run(PROMPTS[:1], seed=0, num_steps=2, guidance_scale=1.0, on_step=steps.append)
    assert steps == [0, 1, 2]
    assert latents.shape[0] == 1 and torch.isfinite(latents).all()


@pytest.mark.parametrize("workspace", CASES[:1], indirect=True, ids=["wan"])
def test_torchrun_profile_matches_one_process(workspace):
    """docs step 2's `torchrun ... -m cli profile`: prompts sharded over 2 ranks, same result.
    Once, on the Wan folder: sharding does not depend on the pipeline."""
    out = workspace.path("runs/torchrun/profile")
    result = subprocess.run(
        # `python -m torch.distributed.run` is what the torchrun script runs; --standalone picks a
        # free rendezvous port so parallel test runs do not collide.
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "cli",
            "profile",
            str(workspace.path("model.toml")),
            "--out",
            str(out),
        ],
        cwd=workspace.root,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = load_profile(out)
    single = load_profile(workspace.path("runs/model/profile"))
    assert sharded.fingerprint == single.fingerprint  # settings and every tile-mass byte


def test_export_and_check_on_held_out_prompts(workspace):
    config = load_config(workspace.path("config.json"))
    assert config.model.adapter == workspace.case.adapter
    assert (config.model.num_layers, config.model.num_heads) == (LAYERS, HEADS)
    assert config.geometry.grid.as_tuple() == GRID
    assert config.geometry.prefix_tokens == workspace.case.prefix_tokens
    entries = [e for bucket in config.heads for layer in bucket for e in layer]
    assert all(e.stats["recall_min"] >= 0.9 - 1e-6 for e in entries)
    assert not workspace.path("config.luts.safetensors").exists()  # no lookup-table file
    held_out = workspace.path("runs/heldout/profile")
    assert run("check", "--config", workspace.path("config.json"), "--profile", held_out) == 0
    c85 = workspace.path("c85.json")
    assert run("export", workspace.path("runs/model/run"), "--out", c85, "--recall", "0.85") == 0
    lower = load_config(c85)
    assert lower.provenance["recall_threshold"] == 0.85
    assert lower.summary()["mean_density"] <= config.summary()["mean_density"] + 1e-9


def load_pipeline(workspace):
    """docs step 4: `WanPipeline.from_pretrained(folder, torch_dtype=...)`, then `.to(device)`."""
    pipeline_class = getattr(diffusers, workspace.case.pipeline)
    pipe = pipeline_class.from_pretrained(str(workspace.folder), torch_dtype=torch.float32)
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_tokens(pipe, prompt: str) -> list[str]:
    """The text-encoder tokens the pipeline keeps of a prompt: for HunyuanVideo those after the
    `crop_start` tokens of its template."""
    if isinstance(pipe, diffusers.HunyuanVideoPipeline):
        text = DEFAULT_PROMPT_TEMPLATE["template"].format(prompt)
        ids = pipe.tokenizer(text).input_ids[DEFAULT_PROMPT_TEMPLATE["crop_start"] :]
    else:
        ids = pipe.tokenizer(prompt).input_ids
    return pipe.tokenizer.convert_ids_to_tokens(ids)


def generate(pipe, case: Case, width: int = SIZE["width"]) -> np.ndarray:
    """[frames, height, width, 3] in [0, 1]."""
    return pipe(
        PROMPTS[0],
        height=SIZE["height"],
        width=width,
        num_frames=SIZE["frames"],
        num_inference_steps=STEPS,
        guidance_scale=case.guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames[0]


def test_step4_generates_with_the_config_and_reverts_exactly(workspace):
    case = workspace.case
    pipe = load_pipeline(workspace)
    tokens = prompt_tokens(pipe, PROMPTS[0])
    assert tokens[0] == "a" and tokens[-1] == case.text_end and "<unk>" not in tokens
    attention = get_adapter(case.adapter).attention_modules
    originals = [m.processor for m in attention(pipe.transformer)]
    dense = generate(pipe, case)

    handle = compact_search.apply(pipe, str(workspace.path("config.json")))
    steps = []  # the step the handle assigns to every transformer call
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _module, _args: steps.append(handle.tracker.step)
    )  # runs after apply's own hook, which reads the call's timestep
    video = generate(pipe, case)
    hook.remove()
    handle.revert()

    assert steps == [s for s in range(STEPS) for _ in range(case.calls_per_step)]
    schedule = handle.config.schedule
    dense_calls = sum(schedule.bucket_for_step(s, STEPS) is None for s in steps)
    assert handle.calls == {
        "dense": dense_calls * LAYERS,
        "sparse": (len(steps) - dense_calls) * LAYERS,
    }
    assert handle.calls["sparse"] > 0
    assert video.shape == dense.shape == (SIZE["frames"], SIZE["height"], SIZE["width"], 3)
    assert np.isfinite(video).all() and np.abs(video - dense).max() > 1e-3  # sparsity acted
    assert [m.processor for m in attention(pipe.transformer)] == originals
    assert np.array_equal(generate(pipe, case), dense)


def test_other_resolution_fails_in_one_line_and_rescale_runs(workspace):
    case = workspace.case
    pipe = load_pipeline(workspace)
    config = str(workspace.path("config.json"))

    handle = compact_search.apply(pipe, config)  # no grid given: the first call notices
    with pytest.raises(UserInputError, match="does not fit the model input") as info:
        generate(pipe, case, width=OTHER_WIDTH)
    handle.revert()
    message = str(info.value)
    assert "\n" not in message and "rescale=True" in message
    with pytest.raises(UserInputError, match="does not fit the model grid"):
        compact_search.apply(pipe, config, grid=OTHER_GRID)

    handle = compact_search.apply(pipe, config, rescale=True, grid=OTHER_GRID)
    assert handle.config.geometry.grid.as_tuple() == OTHER_GRID
    assert len(handle.notes) == 1 and "no longer guaranteed" in handle.notes[0]
    video = generate(pipe, case, width=OTHER_WIDTH)
    handle.revert()
    assert video.shape == (SIZE["frames"], SIZE["height"], OTHER_WIDTH, 3)
    assert np.isfinite(video).all() and handle.calls["sparse"] > 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("frames", 12), ("height", 120)],
    ids=["frames-not-4k+1", "height-not-multiple-of-16"],
)
def test_sizes_the_pipeline_would_change_are_refused_in_one_line(workspace, field, value, capsys):
    """Wan would sample 13 frames for 12 (a latent frame the profile would count as text
    tokens), CogVideoX decodes 9; at 120 pixels Wan raises and CogVideoX fails inside its
    transformer. The profile says so before sampling, in one line, with exit code 2."""
    toml = workspace.path(f"bad-{field}.toml")
    toml.write_text(
        profile_toml(workspace.case, workspace.folder, "bad", "prompts.txt", 0, **{field: value})
    )
    capsys.readouterr()
    assert run("profile", toml, "--out", workspace.path(f"runs/bad-{field}")) == 2
    line = error_line(capsys.readouterr().err)
    assert f"sampling.{field}" in line and str(value) in line


def test_missing_transformers_or_accelerate_is_one_line(workspace, monkeypatch, capsys):
    real_find_spec = diffusers_folder.find_spec
    monkeypatch.setattr(
        diffusers_folder,
        "find_spec",
        lambda name: None if name == "accelerate" else real_find_spec(name),
    )
    capsys.readouterr()
    out = workspace.path("runs/no-accelerate")
    assert run("profile", workspace.path("model.toml"), "--out", out) == 2
    line = error_line(capsys.readouterr().err)
    assert "needs accelerate: pip install accelerate" in line and str(workspace.folder) in line


@pytest.mark.parametrize("workspace", CASES[2:], indirect=True, ids=["hunyuanvideo"])
def test_hunyuan_template_crop_leaves_exactly_the_prompt(workspace):
    """The pipeline wraps every prompt in its Llama chat template and cuts the template's
    `crop_start` (95) tokens off: the folder's tokenizer leaves each prompt's words and
    <|eot_id|>, the longest of them the profile's prefix."""
    tokenizer = AutoTokenizer.from_pretrained(workspace.folder / "tokenizer")
    template, crop = DEFAULT_PROMPT_TEMPLATE["template"], DEFAULT_PROMPT_TEMPLATE["crop_start"]
    lengths = []
    for prompt in PROMPTS + HELD_OUT:
        ids = tokenizer(template.format(prompt)).input_ids
        kept = tokenizer.convert_ids_to_tokens(ids[crop:])
        assert "".join(kept[:-1]) == prompt and kept[-1] == "<|eot_id|>"
        lengths.append(len(kept))
    assert load_profile(workspace.path("runs/model/profile")).prefix_tokens == max(lengths[:2])
    assert len(set(lengths)) > 1  # prompts of different text lengths


def test_cogvideox_15_temporal_patches_pad_the_latent_frames(tmp_path):
    """CogVideoX 1.5 (patch_size_t 2) pads 3 latent frames to 4: grid 2x8x8, 226 text tokens."""
    case = CASES[1]
    folder = tmp_path / "pipe"
    build_cogvideox(folder, patch_size_t=2)
    (tmp_path / "prompts.txt").write_text(PROMPTS[0] + "\n")
    (tmp_path / "model.toml").write_text(profile_toml(case, folder, "cog15", "prompts.txt", 0))
    assert run("profile", tmp_path / "model.toml", "--out", tmp_path / "profile") == 0
    profile = load_profile(tmp_path / "profile")
    assert profile.grid.as_tuple() == (2, 8, 8) and profile.prefix_tokens == 226
