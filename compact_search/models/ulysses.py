"""Ulysses context parallelism inside the attention processors (diffusers' `enable_parallelism`).

Under `transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))` diffusers
splits the token sequence over P ranks and sets `processor._parallel_config` on every processor
that has the attribute. A processor here then does Ulysses itself, around its attention call:

    [B, N/P, H, D] on each rank --all-to-all--> [B, N, H/P, D]: the whole sequence, H/P heads
    attention_fn(layer, q, k, v, heads=(start, stop)) over those heads (global head numbers)
    [B, N, H/P, D] --all-to-all--> [B, N/P, H, D]

The all-to-alls are functional collectives, so torch.compile traces them. Ring attention
(`ring_degree > 1`) and `ulysses_anything` are refused in one line when the config is set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compact_search.errors import UserInputError

SUPPORTED = "compact-search runs context parallelism as Ulysses only"


@dataclass(frozen=True)
class UlyssesGroup:
    """This rank's place in the Ulysses mesh: ranks, own index, and the process group's name."""

    degree: int
    rank: int
    group_name: str


def ulysses_group(parallel_config) -> UlyssesGroup | None:
    """The Ulysses group of a diffusers `ParallelConfig` (None without context parallelism).

    Raises UserInputError, one line, for what the processors cannot run: ring attention and
    `ulysses_anything` (uneven splits).
    """
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return None
    if cp.ring_degree > 1 or getattr(cp, "ring_anything", False):
        raise UserInputError(
            f"{SUPPORTED} (ContextParallelConfig(ulysses_degree=N)); ring_degree "
            f"{cp.ring_degree} is not supported"
        )
    if getattr(cp, "ulysses_anything", False):
        raise UserInputError(
            f"{SUPPORTED} (ContextParallelConfig(ulysses_degree=N)); ulysses_anything is not "
            "supported: the sequence and the heads must divide by ulysses_degree"
        )
    group = cp._ulysses_mesh.get_group()
    return UlyssesGroup(cp.ulysses_degree, cp._ulysses_local_rank, group.group_name)


def _all_to_all(x: torch.Tensor, group: UlyssesGroup) -> torch.Tensor:
    """Chunk i of dim 0 goes to rank i; chunk j of the result came from rank j."""
    import torch.distributed._functional_collectives as funcol

    out = funcol.all_to_all_single(x.contiguous(), None, None, group.group_name)
    return funcol.wait_tensor(out)


def sequence_to_heads(x: torch.Tensor, group: UlyssesGroup) -> torch.Tensor:
    """[B, N/P, H, D] (this rank's tokens, every head) -> [B, N, H/P, D] (every token, this
    rank's heads), token-major."""
    batch, tokens, heads, dim = x.shape
    chunks = x.reshape(batch, tokens, group.degree, heads // group.degree, dim)
    received = _all_to_all(chunks.permute(2, 0, 1, 3, 4), group)  # [P, B, N/P, H/P, D]
    return received.permute(1, 0, 2, 3, 4).reshape(batch, group.degree * tokens, -1, dim)


def heads_to_sequence(x: torch.Tensor, group: UlyssesGroup) -> torch.Tensor:
    """[B, N, H/P, D] (every token, this rank's heads) -> [B, N/P, H, D] (this rank's tokens,
    every head), contiguous."""
    batch, tokens, heads, dim = x.shape
    chunks = x.reshape(batch, group.degree, tokens // group.degree, heads, dim)
    received = _all_to_all(chunks.permute(1, 0, 2, 3, 4), group)  # [P, B, N/P, H/P, D]
    return received.permute(1, 2, 0, 3, 4).reshape(batch, tokens // group.degree, -1, dim)


class UlyssesProcessor:
    """Mixin for a processor that runs Ulysses: diffusers' `_parallel_config` attribute, checked
    when it is set, and `ulysses` (the group, or None)."""

    ulysses: UlyssesGroup | None = None
    _config = None

    @property
    def _parallel_config(self):
        return self._config

    @_parallel_config.setter
    def _parallel_config(self, config) -> None:
        self.ulysses = ulysses_group(config)
        self._config = config

    def attend(self, attention_fn, layer, query, key, value, heads: int) -> torch.Tensor:
        """attention_fn over q, k, v token-major [B, S, H, D] -> [B, S, H, D] (with Ulysses: over
        the whole sequence for this rank's heads)."""
        group = self.ulysses
        if group is None:
            out = attention_fn(
                layer, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            )
            return out.transpose(1, 2)
        if heads % group.degree:
            raise UserInputError(
                f"Ulysses needs the heads ({heads}) divisible by ulysses_degree ({group.degree})"
            )
        local = heads // group.degree
        q, k, v = (sequence_to_heads(t, group).transpose(1, 2) for t in (query, key, value))
        start = group.rank * local
        out = attention_fn(layer, q, k, v, heads=(start, start + local))  # [B, H/P, N, D]
        return heads_to_sequence(out.transpose(1, 2), group)


class NoContextParallel:
    """Mixin for a processor that cannot run context parallelism: refuses a config in one line."""

    family = "this model"

    @property
    def _parallel_config(self):
        return None

    @_parallel_config.setter
    def _parallel_config(self, config) -> None:
        if getattr(config, "context_parallel_config", None) is not None:
            raise UserInputError(
                f"compact-search runs {self.family} without context parallelism (diffusers ships "
                "no context-parallel plan for it); Wan supports Ulysses"
            )
