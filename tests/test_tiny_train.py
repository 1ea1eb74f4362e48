"""Training the tiny model: a few CPU steps of a shrunken architecture, checkpoint and resume."""

import json
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


def _train_rank(rank: int, world_size: int, port: int, directory: str) -> None:
    import os
    from pathlib import Path

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    config = TrainConfig(seed=5, steps=3, batch_size=2, warmup_steps=1, log_every=1)
    result = train_and_save(
        config,
        Path(directory) / f"model-{rank}",
        model_config=SMALL,
        checkpoint_dir=Path(directory) / f"ckpt-{rank}",
        log=print,
    )
    # Every rank's averaged weights, to compare across ranks.
    weights = torch.cat([p.detach().flatten() for p in result.pipeline.transformer.parameters()])
    torch.save(weights, Path(directory) / f"weights-{rank}.pt")
    torch.distributed.destroy_process_group()


def test_data_parallel_ranks_stay_identical_and_rank0_alone_writes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_train_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"weights-{r}.pt") for r in (0, 1))
    assert torch.equal(first, second)  # averaged gradients: no drift between ranks
    assert (tmp_path / "model-0" / "tiny-wan.json").is_file()
    assert not (tmp_path / "model-1").exists() and not (tmp_path / "ckpt-1").exists()
    record = json.loads((tmp_path / "ckpt-0" / "checkpoint.json").read_text())
    assert record["world_size"] == 2 and record["chunks"][-1]["batch_size"] == 4


def test_model_config_refuses_odd_head_dims_and_the_cli_says_so_in_one_line():
    import pytest
    from cli_runner import run

    with pytest.raises(ValueError, match="even head_dim"):
        TinyModelConfig(head_dim=33)
    assert run("train-tiny", "--head-dim", "33", "--steps", "1") == 2
