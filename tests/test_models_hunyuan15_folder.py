"""A saved random-weight `HunyuanVideo15Pipeline` folder through the `hunyuanvideo15` adapter.

Every part is built in code at toy size, nothing downloaded: a Qwen2.5-VL text model under a
word-level tokenizer with a Qwen-style chat template (its system prompt encodes to exactly the
108 tokens the pipeline crops), a ByT5 encoder (`ByT5Tokenizer` needs no vocabulary file) for
the quoted glyph text, the HunyuanVideo 1.5 VAE (16x in space, 4x in time), a two-block
transformer, flow-matching Euler and the classifier-free-guidance guider. The folder goes
through `profile` (training and held-out prompts) -> `optimize` -> `export` -> `check`, then
`compact_search.apply` on the pipeline loaded from it: dense patterns reproduce its denoised
latents, sparse ones change them, the exported config runs, and `revert` restores them exactly.
The prompt generated with quotes glyph text and is the longest profiled one; its unconditional
pass (the empty negative prompt) has fewer text tokens, padded and masked as keys.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import diffusers
import torch
from cli_runner import run
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import (
    extract_glyph_texts,
    format_text_input,
)
from jinja2 import Template
from test_real_pipeline_folder import (
    CASES,
    GRID,
    HEAD_DIM,
    HEADS,
    LAYERS,
    SIZE,
    STEPS,
    profile_toml,
    word_tokenizer,
)
from tokenizers import Regex, pre_tokenizers
from transformers import (
    ByT5Tokenizer,
    PreTrainedTokenizerFast,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    T5Config,
    T5EncoderModel,
)

import compact_search
from compact_search.config import StepSchedule, load_config, uniform_config
from compact_search.models.adapters import get_adapter, load_model
from compact_search.patterns import HeadPattern
from compact_search.profiling import load_profile, load_run_profile

# The second prompt of each set quotes glyph text, which the pipeline encodes with ByT5.
PROMPTS = [
    "a golden retriever runs across a sunlit meadow, slow motion",
    'a neon sign reads "OPEN" above a wet street at night',
]
HELD_OUT = ['a chalkboard that says "HELLO" in a quiet classroom']
# Qwen2's pre-tokenizer pattern (one digit a piece, unlike Llama 3's three).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen's chat format for text-only messages, the part of its template the pipeline uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CASE = CASES[2]  # HunyuanVideo's settings: guidance 6, prompt-mean store
# The system prompt the pipeline wraps every prompt in (its encoder's default argument).
SYSTEM_MESSAGE = (
    inspect.signature(diffusers.HunyuanVideo15Pipeline._get_mllm_prompt_embeds)
    .parameters["system_message"]
    .default
)


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the chats the pipeline renders for every test prompt and the
    empty negative prompt; like Qwen's, it adds no special tokens and pads with <|endoftext|>."""
    chats = format_text_input(PROMPTS + HELD_OUT + [""], SYSTEM_MESSAGE)
    tokenizer = word_tokenizer(
        [
            Template(CHAT_TEMPLATE).render(messages=chat, add_generation_prompt=True)
            for chat in chats
        ],
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"],
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        "$A",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_hunyuan15(folder: Path) -> None:
    """HunyuanVideo 1.5's parts at toy size; the transformer reads the latents, the (zero)
    image-condition latents and their mask: 4 + 4 + 1 channels."""
    tokenizer, tokenizer_2 = qwen_tokenizer(), ByT5Tokenizer()
    torch.manual_seed(0)
    diffusers.HunyuanVideo15Pipeline(
        tokenizer=tokenizer,
        # Two layers: the pipeline takes the hidden states of the third layer from the end.
        text_encoder=Qwen2_5_VLTextModel(
            Qwen2_5_VLTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=2048,  # the 108 cropped + 1,000 padded text tokens
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 1e4,
                    "mrope_section": [2, 1, 1],
                },
                bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ),
        tokenizer_2=tokenizer_2,
        text_encoder_2=T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=8,
                d_kv=4,
                d_ff=16,
                num_layers=1,
                num_heads=2,
                relative_attention_num_buckets=8,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        ),
        vae=diffusers.AutoencoderKLHunyuanVideo15(
            latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1
        ),
        transformer=diffusers.HunyuanVideo15Transformer3DModel(
            in_channels=9,
            out_channels=4,
            num_attention_heads=HEADS,
            attention_head_dim=HEAD_DIM,
            num_layers=LAYERS,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            text_embed_dim=16,
            text_embed_2_dim=8,
            image_embed_dim=8,
            rope_axes_dim=(4, 6, 6),
        ),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
        guider=ClassifierFreeGuidance(guidance_scale=CASE.guidance),
    ).save_pretrained(folder)


def real_text_tokens(pipe, prompt: str) -> tuple[list[str], list[str]]:
    """The text tokens of a prompt the transformer attends to, recomputed from the folder's
    tokenizers: the Qwen tokens after the crop, and ByT5's bytes of the quoted text and </s>."""
    chat = format_text_input([prompt], SYSTEM_MESSAGE)
    ids = pipe.tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True
    ).input_ids[0]
    glyph = extract_glyph_texts(prompt)
    glyph_ids = [] if glyph is None else pipe.tokenizer_2(glyph).input_ids
    return (
        pipe.tokenizer.convert_ids_to_tokens(ids[pipe.prompt_template_encode_start_idx :]),
        pipe.tokenizer_2.convert_ids_to_tokens(glyph_ids),
    )


def generate(pipe) -> torch.Tensor:
    """The denoised latents of the glyph prompt, [1, 4, 3, 8, 8] (what the transformer makes;
    the VAE decode after it is left out to keep the test short)."""
    return pipe(
        PROMPTS[1],
        height=SIZE["height"],
        width=SIZE["width"],
        num_frames=SIZE["frames"],
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).frames


def test_hunyuan15_folder_is_profiled_searched_checked_and_applied(tmp_path):
    folder = tmp_path / "pipe"
    build_hunyuan15(folder)
    for name, prompts, seed in (("model", PROMPTS, 0), ("heldout", HELD_OUT, 100)):
        (tmp_path / f"{name}.txt").write_text("\n".join(prompts) + "\n")
        toml = profile_toml(CASE, folder, f"hv15-{name}", f"{name}.txt", seed)
        (tmp_path / f"{name}.toml").write_text(
            toml.replace('adapter = "hunyuanvideo"', 'adapter = "hunyuanvideo15"')
        )
        out = tmp_path / f"runs/{name}/profile"
        assert run("profile", tmp_path / f"{name}.toml", "--out", out) == 0

    pipe = diffusers.HunyuanVideo15Pipeline.from_pretrained(str(folder))  # float32
    pipe.set_progress_bar_config(disable=True)
    qwen, byt5 = real_text_tokens(pipe, PROMPTS[1])
    assert pipe.prompt_template_encode_start_idx == 108  # the template's tokens, all cropped
    assert "".join(qwen[:-5]) == PROMPTS[1] and "<unk>" not in qwen
    assert qwen[-5:] == ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    assert "".join(byt5[:-1]) == 'Text "OPEN". ' and byt5[-1] == "</s>"
    profile = load_profile(tmp_path / "runs/model/profile")
    assert profile.adapter == "hunyuanvideo15" and profile.grid.as_tuple() == GRID
    assert (profile.num_layers, profile.num_heads, profile.head_dim) == (LAYERS, HEADS, HEAD_DIM)
    # The glyph prompt is the longest; the empty negative prompt is shorter (padded at apply).
    lengths = [sum(map(len, real_text_tokens(pipe, p))) for p in [*PROMPTS, ""]]
    assert profile.prefix_tokens == max(lengths) == lengths[1] > lengths[2]
    mass = profile.sample_tile_mass(1, tile=(1, 4, 4))  # [S, H, 12, 12]: tile grid 3x2x2
    assert mass.shape == (3, HEADS, 12, 12) and torch.isfinite(mass).all()
    torch.testing.assert_close(mass.sum(-1), torch.ones(mass.shape[:-1]))

    search = ("--trials", "6", "--workers", "1", "--block-size", "16")
    run_dir, config_path = tmp_path / "runs/model/run", tmp_path / "config.json"
    assert (
        run(
            "optimize",
            tmp_path / "runs/model/profile",
            "--out",
            run_dir,
            "--recall",
            "0.9",
            *search,
        )
        == 0
    )
    assert run("export", run_dir, "--out", config_path) == 0
    config = load_config(config_path)
    assert config.model.adapter == "hunyuanvideo15" and config.geometry.prefix_at == "end"
    assert config.geometry.prefix_tokens == profile.prefix_tokens
    held_out = tmp_path / "runs/heldout/profile"
    assert run("check", "--config", config_path, "--profile", held_out) == 0

    attention = get_adapter("hunyuanvideo15").attention_modules
    originals = [m.processor for m in attention(pipe.transformer)]
    reference = generate(pipe)
    # What `profile` sampled: the loader's run on its own copy of the folder, following the
    # steps through the scheduler and the guidance through the guider (the pipeline takes
    # neither a step callback nor a guidance_scale).
    model = load_model(load_run_profile(tmp_path / "model.toml"), torch.device("cpu"))
    assert model.adapter is get_adapter("hunyuanvideo15") and model.grid.as_tuple() == GRID
    guider, steps, scales = model.pipeline.guider, [], []

    def on_step(step: int) -> None:
        steps.append(step)
        scales.append(model.pipeline.guider.guidance_scale)

    model.pipeline.guider = guider.new(guidance_scale=1.5)
    sampled = model.run(
        PROMPTS[1:], seed=0, num_steps=STEPS, guidance_scale=CASE.guidance, on_step=on_step
    )
    assert steps == list(range(STEPS + 1)) and scales == [1.5] + [CASE.guidance] * STEPS
    assert model.pipeline.guider.guidance_scale == 1.5
    assert torch.equal(sampled, reference)
    every_step = StepSchedule(STEPS, 0, (0,))
    outputs = {}
    for name, pattern in (("dense", HeadPattern.dense()), ("local", HeadPattern.local(0, 0, 0))):
        uniform = uniform_config(config.model, config.geometry, every_step, pattern)
        handle = compact_search.apply(pipe, uniform)
        outputs[name] = generate(pipe)
        handle.revert()
        # Guidance through the guider: a conditional and an unconditional call each step.
        assert handle.calls == {"dense": 0, "sparse": STEPS * 2 * LAYERS}
    handle = compact_search.apply(pipe, str(config_path))
    outputs["exported"] = generate(pipe)
    handle.revert()
    assert sum(handle.calls.values()) == STEPS * 2 * LAYERS and handle.calls["sparse"] > 0
    assert [m.processor for m in attention(pipe.transformer)] == originals

    assert reference.shape == (1, 4, *GRID) and torch.isfinite(reference).all()
    torch.testing.assert_close(outputs["dense"], reference, atol=1e-4, rtol=0)  # fp32 rounding
    for name in ("local", "exported"):
        assert torch.isfinite(outputs[name]).all()
    assert (outputs["local"] - reference).abs().max() > 1e-3
    assert torch.equal(generate(pipe), reference)
