"""Token geometry: the latent grid, 3D tiles, and the tile-contiguous slot layout of the kernel.

Models order video tokens frame-major, (f, h, w). The kernel wants every tile's tokens contiguous,
so the runtime permutes tokens into *slots*:

    [prefix slots][tile 0 slots][tile 1 slots] ... [tile nt-1 slots]

- Prefix tokens (text tokens of MM-DiT models) come first, padded to whole blocks. They stay outside
  the tiling: always attended and always attending.
- Tiles are numbered frame-major over the tile grid: tile id = (tf_i * Ht + th_i) * Wt + tw_i.
- Every tile gets the same number of slots, its volume rounded up to whole blocks, so a block never
  straddles two tiles and a tile mask maps to a block mask exactly.
- Inside a tile the real tokens come first, in (f, h, w) order; padding fills the rest. Border
  tiles that the grid cuts short hold fewer real tokens. So in every block the valid slots are a
  prefix, and one number per block (`key_block_lengths`) describes the padding to the kernel.

Padded keys get no attention (the kernel masks slots past a block's length); padded queries
compute garbage that `from_slots` drops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from compact_search.errors import UserInputError

# Tokens per mask block when nothing says otherwise: the kernel's query tile on Hopper.
DEFAULT_BLOCK_SIZE = 128
# The Triton kernels tile a mask block into power-of-two query and key tiles of at least 16 rows.
MIN_KERNEL_BLOCK_SIZE = 16


def check_block_size(block_size: int, name: str = "block_size") -> None:
    """Raise UserInputError (a ValueError) unless the Triton kernels take this block size."""
    if block_size < MIN_KERNEL_BLOCK_SIZE or block_size & (block_size - 1):
        raise UserInputError(
            f"{name} must be a power of two >= {MIN_KERNEL_BLOCK_SIZE}, got {block_size}"
        )


def valid_block_lengths(
    num_valid: int | torch.Tensor,
    block_size: int,
    num_blocks: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """int32 ``[..., num_blocks]``: valid tokens per block when the first ``num_valid`` tokens of
    a run of blocks are real and the rest is padding, i.e. ``clamp(num_valid - i * bs, 0, bs)``.

    ``num_valid`` is a count or an int tensor of counts (one run of blocks each). ``num_blocks``
    defaults to ``ceil(num_valid / block_size)``: full blocks and the ragged last one (none for
    ``num_valid == 0``), the key lengths of an untiled sequence of N tokens.
    """
    if num_blocks is None:
        num_blocks = -(-int(num_valid) // block_size)
    counts = torch.as_tensor(num_valid, device=device).to(torch.int64)
    starts = torch.arange(num_blocks, device=counts.device) * block_size  # [num_blocks]
    return (counts[..., None] - starts).clamp(0, block_size).to(torch.int32)


def _positive_ints(name: str, values: tuple[int, ...]) -> None:
    for field, value in zip(("frames", "height", "width"), values, strict=True):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"{name}.{field} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Grid:
    """A latent token grid (F, H, W) after patchifying."""

    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        _positive_ints("grid", self.as_tuple())

    @classmethod
    def of(cls, value: Grid | tuple[int, int, int] | list[int]) -> Grid:
        if isinstance(value, Grid):
            return value
        if len(value) != 3:
            raise UserInputError(f"grid needs 3 sizes (frames, height, width), got {value!r}")
        return cls(*value)

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width

    def __str__(self) -> str:
        return "x".join(map(str, self.as_tuple()))


@dataclass(frozen=True)
class TileShape:
    """A (tf, th, tw) box of tokens."""

    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        _positive_ints("tile", self.as_tuple())

    @classmethod
    def of(cls, value: TileShape | tuple[int, int, int] | list[int]) -> TileShape:
        if isinstance(value, TileShape):
            return value
        if len(value) != 3:
            raise UserInputError(f"tile needs 3 sizes (frames, height, width), got {value!r}")
        return cls(*value)

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def volume(self) -> int:
        return self.frames * self.height * self.width

    def __str__(self) -> str:
        return "x".join(map(str, self.as_tuple()))


def tile_grid_of(grid: Grid, tile: TileShape) -> Grid:
    """The tile grid (Ft, Ht, Wt) = ceil(grid / tile)."""
    return Grid(*(math.ceil(g / t) for g, t in zip(grid.as_tuple(), tile.as_tuple(), strict=True)))


def tile_coordinates(tile_grid: Grid) -> torch.Tensor:
    """[nt, 3] int64 (f, h, w) coordinates of every tile, frame-major order."""
    f, h, w = torch.meshgrid(
        torch.arange(tile_grid.frames),
        torch.arange(tile_grid.height),
        torch.arange(tile_grid.width),
        indexing="ij",
    )
    return torch.stack([f.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1)


def video_token_tiles(grid: Grid, tile: TileShape) -> torch.Tensor:
    """[F*H*W] int64: the tile id of every video token, in model (frame-major) order."""
    tg = tile_grid_of(grid, tile)
    tf = torch.arange(grid.frames) // tile.frames  # [F]
    th = torch.arange(grid.height) // tile.height  # [H]
    tw = torch.arange(grid.width) // tile.width  # [W]
    ids = (tf[:, None, None] * tg.height + th[None, :, None]) * tg.width + tw[None, None, :]
    return ids.reshape(-1)


def scatter_to_slots(
    x: torch.Tensor,
    token_to_slot: torch.Tensor,
    padding_slots: torch.Tensor,
    padded_len: int,
    dim: int,
) -> torch.Tensor:
    """`TileLayout.to_slots` with the layout's index tensors given (on x's device): tensor
    operations only, so it traces into a compiled graph."""
    shape = list(x.shape)
    shape[dim] = padded_len
    # One scatter of the real tokens and a small fill of the padding: no full memset pass.
    out = x.new_empty(shape).index_copy_(dim, token_to_slot, x)
    return out.index_fill_(dim, padding_slots, 0)


@dataclass(frozen=True)
class TileLayout:
    """The slot layout for one (grid, tile, block size, prefix) combination. See the module doc."""

    grid: Grid
    tile: TileShape
    block_size: int = DEFAULT_BLOCK_SIZE
    prefix_tokens: int = 0
    prefix_at: str = "start"  # where the prefix sits in the model's own token order: start | end

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", Grid.of(self.grid))
        object.__setattr__(self, "tile", TileShape.of(self.tile))
        if isinstance(self.block_size, bool) or self.block_size < 1:
            raise UserInputError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.prefix_tokens < 0:
            raise UserInputError(f"prefix_tokens must be >= 0, got {self.prefix_tokens}")
        if self.prefix_at not in ("start", "end"):
            raise UserInputError(f"prefix_at must be 'start' or 'end', got {self.prefix_at!r}")

    # --- sizes -------------------------------------------------------------------------------

    @cached_property
    def tile_grid(self) -> Grid:
        return tile_grid_of(self.grid, self.tile)

    @property
    def num_tiles(self) -> int:
        return self.tile_grid.num_tokens

    @property
    def blocks_per_tile(self) -> int:
        return math.ceil(self.tile.volume / self.block_size)

    @property
    def tile_slots(self) -> int:
        return self.blocks_per_tile * self.block_size

    @property
    def prefix_blocks(self) -> int:
        return math.ceil(self.prefix_tokens / self.block_size)

    @property
    def prefix_slots(self) -> int:
        return self.prefix_blocks * self.block_size

    @property
    def num_tokens(self) -> int:
        """Sequence length in the model's own order: prefix plus video tokens."""
        return self.prefix_tokens + self.grid.num_tokens

    @property
    def padded_len(self) -> int:
        return self.prefix_slots + self.num_tiles * self.tile_slots

    @property
    def num_blocks(self) -> int:
        return self.padded_len // self.block_size

    @property
    def dense_blocks(self) -> int:
        """Blocks a dense kernel computes on the unpermuted, unpadded sequence."""
        return math.ceil(self.num_tokens / self.block_size) ** 2

    @property
    def padding_waste(self) -> float:
        """Share of slots that hold padding."""
        return 1.0 - self.num_tokens / self.padded_len

    # --- permutation -------------------------------------------------------------------------

    @cached_property
    def tile_token_counts(self) -> torch.Tensor:
        """[nt] int64: real tokens in every tile (border tiles hold fewer)."""
        return torch.bincount(video_token_tiles(self.grid, self.tile), minlength=self.num_tiles)

    @cached_property
    def token_to_slot(self) -> torch.Tensor:
        """[num_tokens] int64: the slot of every token, tokens in the model's own order."""
        grid, tile, tg = self.grid, self.tile, self.tile_grid

        def axis(size: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            pos = torch.arange(size)
            tile_idx = pos // step
            extent = torch.clamp(size - tile_idx * step, max=step)  # the tile's real extent
            return tile_idx, pos % step, extent

        f_tile, f_local, _ = axis(grid.frames, tile.frames)
        h_tile, h_local, h_extent = axis(grid.height, tile.height)
        w_tile, w_local, w_extent = axis(grid.width, tile.width)
        tile_id = (f_tile[:, None, None] * tg.height + h_tile[None, :, None]) * tg.width + w_tile[
            None, None, :
        ]  # [F, H, W]
        # Rank inside the tile, over the tile's real (clipped) extents, so real tokens pack first.
        rank = (f_local[:, None, None] * h_extent[None, :, None] + h_local[None, :, None]) * (
            w_extent[None, None, :]
        ) + w_local[None, None, :]  # [F, H, W]
        video_slots = (self.prefix_slots + tile_id * self.tile_slots + rank).reshape(-1)
        prefix_slots = torch.arange(self.prefix_tokens)
        if self.prefix_at == "start":
            return torch.cat([prefix_slots, video_slots])
        return torch.cat([video_slots, prefix_slots])

    @cached_property
    def slot_to_token(self) -> torch.Tensor:
        """[padded_len] int64: the model-order token held by every slot, -1 for padding."""
        out = torch.full((self.padded_len,), -1, dtype=torch.int64)
        out[self.token_to_slot] = torch.arange(self.num_tokens)
        return out

    def to_slots(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Model order -> slot order along `dim` (num_tokens -> padded_len); padding is zero."""
        dim = dim % x.ndim
        if x.shape[dim] != self.num_tokens:
            raise ValueError(
                f"to_slots: dim {dim} of x has {x.shape[dim]} tokens, layout has {self.num_tokens}"
            )
        return scatter_to_slots(
            x,
            self._on(x.device, "token_to_slot"),
            self._on(x.device, "padding_slots"),
            self.padded_len,
            dim,
        )

    def from_slots(self, y: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Slot order -> model order along `dim`; padded slots are dropped."""
        dim = dim % y.ndim
        if y.shape[dim] != self.padded_len:
            raise ValueError(
                f"from_slots: dim {dim} of y has {y.shape[dim]} slots, layout has {self.padded_len}"
            )
        return y.index_select(dim, self._on(y.device, "token_to_slot"))

    @cached_property
    def padding_slots(self) -> torch.Tensor:
        """[padded_len - num_tokens] int64: the slots that hold padding."""
        return torch.nonzero(self.slot_to_token < 0).flatten()

    def _on(self, device: torch.device, name: str) -> torch.Tensor:
        """An index tensor of this layout on `device`, copied there once."""
        cache = self.__dict__.setdefault("_device_indices", {})
        key = (name, str(device))
        if key not in cache:
            cache[key] = getattr(self, name).to(device)
        return cache[key]

    # --- blocks ------------------------------------------------------------------------------

    @cached_property
    def block_lengths(self) -> torch.Tensor:
        """[nb] int32: valid (non-padding) slots at the start of every block."""
        # Real tokens come first in the prefix and in every tile (see the module doc).
        prefix = valid_block_lengths(self.prefix_tokens, self.block_size, self.prefix_blocks)
        tiles = valid_block_lengths(self.tile_token_counts, self.block_size, self.blocks_per_tile)
        return torch.cat([prefix, tiles.flatten()])

    def key_block_lengths(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[nb] int32 for the kernel: keys past this count in a block are padding."""
        return self.block_lengths.to(device) if device is not None else self.block_lengths

    @cached_property
    def tile_block_counts(self) -> torch.Tensor:
        """[nt] int64: non-empty blocks of every tile (all-padding blocks are never computed)."""
        lengths = self.block_lengths[self.prefix_blocks :].view(
            self.num_tiles, self.blocks_per_tile
        )
        return (lengths > 0).sum(dim=1)

    def block_mask(self, tile_mask: torch.Tensor) -> torch.Tensor:
        """Tile mask [..., nt, nt] -> block mask [..., nb, nb] over slots.

        Prefix rows and columns are kept; blocks holding only padding are dropped (never computed).
        """
        nt, pb = self.num_tiles, self.prefix_blocks
        if tile_mask.shape[-2:] != (nt, nt):
            raise ValueError(
                f"tile_mask must end in ({nt}, {nt}) for tile grid {self.tile_grid}, "
                f"got {tuple(tile_mask.shape)}"
            )
        bpt = self.blocks_per_tile
        video = tile_mask.bool().repeat_interleave(bpt, dim=-1).repeat_interleave(bpt, dim=-2)
        out = torch.ones(
            (*tile_mask.shape[:-2], self.num_blocks, self.num_blocks),
            dtype=torch.bool,
            device=tile_mask.device,
        )
        out[..., pb:, pb:] = video
        nonempty = (self.block_lengths > 0).to(tile_mask.device)
        return out & nonempty[:, None] & nonempty[None, :]

    def computed_blocks(self, tile_mask: torch.Tensor) -> torch.Tensor:
        """Blocks the kernel computes for tile_mask [..., nt, nt], prefix and padding included.

        Equal to block_mask(tile_mask).sum((-2, -1)) without building the block mask.
        """
        counts = self.tile_block_counts.to(tile_mask.device, torch.float64)  # [nt]
        video = torch.einsum("i,...ij,j->...", counts, tile_mask.to(torch.float64), counts)
        pb = self.prefix_blocks
        video_blocks = counts.sum()
        prefix = pb * pb + 2 * pb * video_blocks
        return video + prefix

    def cost(self, tile_mask: torch.Tensor) -> torch.Tensor:
        """Computed blocks over the blocks of dense attention on the unpadded sequence."""
        return self.computed_blocks(tile_mask) / self.dense_blocks

    def describe(self) -> dict[str, object]:
        return {
            "grid": list(self.grid.as_tuple()),
            "tile": list(self.tile.as_tuple()),
            "tile_grid": list(self.tile_grid.as_tuple()),
            "block_size": self.block_size,
            "prefix_tokens": self.prefix_tokens,
            "num_tokens": self.num_tokens,
            "padded_len": self.padded_len,
            "padding_waste": round(self.padding_waste, 6),
        }
