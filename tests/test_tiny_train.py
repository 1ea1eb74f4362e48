"""Training the tiny model: a few CPU steps of a shrunken architecture, checkpoint and resume."""

import math

import torch

from compact_search.models.tiny.pipeline import TinyModelConfig, load_tiny_pipeline
from compact_search.models.tiny.train import TrainConfig, train_and_save

# Same data and interfaces as the shipped model, one narrow layer so CPU steps are quick.
SMALL = TinyModelConfig(num_layers=1, num_heads=2, head_dim=16, ffn_dim=64)


def test_train_checkpoint_resume_and_load(tmp_path):
    config = TrainConfig(seed=3, steps=3, batch_size=2, warmup_steps=2, log_every=1)
    first = train_and_save(
        config, tmp_path / "a", model_config=SMALL, checkpoint_dir=tmp_path / "ckpt", log=print
    )
    assert first.steps_done == 3 and math.isfinite(first.final_loss)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir())[0] == "checkpoint-00.safetensors"

    longer = TrainConfig(seed=3, steps=5, batch_size=2, warmup_steps=2, log_every=1)
    second = train_and_save(
        longer, tmp_path / "b", model_config=SMALL, resume_from=tmp_path / "ckpt", log=print
    )
    assert second.steps_done == 5
    assert [chunk["steps"] for chunk in second.record["chunks"]] == [3, 2]

    pipeline = load_tiny_pipeline(weights_dir=tmp_path / "b")
    assert pipeline.config == SMALL
    video = pipeline("a red circle moves left slowly over a plain grey background", num_steps=1)
    assert video.videos.shape == (1, 3, 8, 32, 32)
    assert torch.isfinite(video.videos).all()
