"""One rank of tests/test_context_parallel.py, run under torchrun (gloo, CPU): `apply` with
diffusers' Ulysses context parallelism on a small Wan, against the one-process output.

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/context_parallel_worker.py OUT
Rank 0 writes OUT (JSON): max abs differences per case and step, tokens per rank, the refusals.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_compile import GRID, forward, small_wan, two_bucket_config  # noqa: E402

from compact_search.errors import UserInputError  # noqa: E402
from compact_search.runtime.apply import apply  # noqa: E402

STEPS = (0, 1, 3)  # dense warm-up, bucket 0, bucket 1


def outputs(model, handle) -> dict[int, torch.Tensor]:
    out = {}
    for step in STEPS:
        handle.set_step(step)
        out[step] = forward(model)
    return out


def differences(got: dict, expected: dict) -> dict[str, float]:
    return {str(step): float((got[step] - expected[step]).abs().max()) for step in STEPS}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    # diffusers' enable_parallelism picks a device as rank % torch.accelerator.device_count(),
    # which is 0 on CPU-only torch: one "device" (the CPU) keeps the test on the CPU.
    torch.accelerator.device_count = lambda: 1
    from diffusers import ContextParallelConfig

    world = dist.get_world_size()
    config = two_bucket_config()
    result: dict[str, object] = {"world": world}

    reference = small_wan()
    stock = forward(reference)  # diffusers' own processors, one process
    handle = apply(reference, config, grid=GRID)
    expected = outputs(reference, handle)

    apply_first = small_wan()
    handle = apply(apply_first, config, grid=GRID)
    apply_first.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    seen = []
    hook = apply_first.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    result["apply_first"] = differences(outputs(apply_first, handle), expected)
    hook.remove()
    result["tokens_per_rank"] = sorted(set(seen))
    apply_first.compile_repeated_blocks(fullgraph=True, backend="eager")  # traced collectives
    result["compiled"] = differences(outputs(apply_first, handle), expected)
    handle.revert()  # the original processors take over the context-parallel config
    result["reverted"] = float((forward(apply_first) - stock).abs().max())

    parallel_first = small_wan()
    parallel_first.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    handle = apply(parallel_first, config, grid=GRID)
    result["parallel_first"] = differences(outputs(parallel_first, handle), expected)
    handle.revert()

    refusals = []
    ring = small_wan()
    ring.enable_parallelism(config=ContextParallelConfig(ring_degree=world))
    try:
        apply(ring, config, grid=GRID)
    except UserInputError as error:
        refusals.append(str(error))
    ring = small_wan()
    apply(ring, config, grid=GRID)
    try:
        ring.enable_parallelism(config=ContextParallelConfig(ring_degree=world))
    except UserInputError as error:
        refusals.append(str(error))
    result["refusals"] = refusals

    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
