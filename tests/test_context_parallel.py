"""`apply` with diffusers' context parallelism (`enable_parallelism`): Ulysses over two CPU
processes equals one process; ring attention, HunyuanVideo and CogVideoX are refused in one line."""

import json
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_adapters import cogvideox_case

from compact_search.config import GeometrySpec, ModelSpec, StepSchedule, uniform_config
from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileShape
from compact_search.models.cogvideox import CogVideoXJointAttnProcessor
from compact_search.models.hunyuan import HunyuanJointAttnProcessor
from compact_search.models.wan import WanSelfAttnProcessor
from compact_search.patterns import HeadPattern
from compact_search.runtime.apply import apply

WORKER = Path(__file__).resolve().parent / "context_parallel_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cp") / "result.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(WORKER),
        str(out),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["apply_first", "parallel_first", "compiled"])
def test_ulysses_on_two_ranks_equals_one_process_at_dense_and_sparse_steps(two_ranks, case):
    assert two_ranks["tokens_per_rank"] == [30]  # each rank holds half of the 60 tokens
    for step, difference in two_ranks[case].items():
        assert difference <= 1e-5, (case, step, difference)


@pytest.mark.slow
def test_revert_under_context_parallelism_restores_the_model(two_ranks):
    # apply, then enable_parallelism: the originals get the config back at revert
    assert two_ranks["reverted"] <= 1e-5


@pytest.mark.slow
def test_ring_attention_is_refused_in_one_line_in_either_order(two_ranks):
    assert len(two_ranks["refusals"]) == 2
    for message in two_ranks["refusals"]:
        assert "Ulysses only" in message and "ring_degree 2" in message and "\n" not in message


def context_parallel(ring=1, ulysses=2, anything=False):
    cp = SimpleNamespace(ring_degree=ring, ulysses_degree=ulysses, ulysses_anything=anything)
    return SimpleNamespace(context_parallel_config=cp)


@pytest.mark.parametrize(
    "processor", [HunyuanJointAttnProcessor, CogVideoXJointAttnProcessor], ids=lambda p: p.family
)
def test_hunyuanvideo_and_cogvideox_refuse_context_parallelism(processor):
    instance = processor(0, lambda *a: None)
    instance._parallel_config = SimpleNamespace(context_parallel_config=None)  # tensor parallel
    with pytest.raises(UserInputError, match=f"runs {processor.family} without context"):
        instance._parallel_config = context_parallel()


def test_ulysses_anything_is_refused():
    with pytest.raises(UserInputError, match="ulysses_anything is not supported"):
        WanSelfAttnProcessor(0, lambda *a: None)._parallel_config = context_parallel(anything=True)


def test_apply_after_enable_parallelism_refuses_processors_without_it():
    model = cogvideox_case()[0]
    before = [block.attn1.processor for block in model.transformer_blocks]
    model._parallel_config = context_parallel()
    cfg = model.config
    layers, heads = cfg.num_layers, cfg.num_attention_heads
    config = uniform_config(
        ModelSpec("cog", "cogvideox", layers, heads, cfg.attention_head_dim),
        GeometrySpec(Grid(3, 4, 4), TileShape(1, 2, 2), 16, prefix_tokens=6),
        StepSchedule(4, 1, (1,)),
        HeadPattern.dense(),
    )
    with pytest.raises(UserInputError, match="runs CogVideoX without context parallelism"):
        apply(model, config)
    assert [block.attn1.processor for block in model.transformer_blocks] == before
