"""Layer shards: worker processes that each own the offset tables of some layers.

Building the tables reads every tile mass once (the expensive part of reading a profile), so
each worker builds and keeps the tables of its layers (`layer % workers == rank`) for every
candidate tile shape, then answers solve requests for them. Only small arrays cross process
boundaries: per-head costs for a trial, head solutions for the final pass.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from compact_search.geometry import DEFAULT_BLOCK_SIZE, Grid, TileLayout, TileShape, tile_grid_of
from compact_search.patterns import recall
from compact_search.search.offsets import DEFAULT_MAX_OPTIONS, CostModel, recall_tables
from compact_search.search.solver import HeadSolution, LayerSolver, SolverConfig


class TileMassSource(Protocol):
    """What the search reads from a profile (`compact_search.profiling.load_profile`)."""

    grid: Grid
    prefix_tokens: int
    num_layers: int
    num_heads: int
    num_steps: int
    steps: Any  # captured step indices
    prompts: Any
    tiles: Any  # candidate TileShape list

    def sample_tile_mass(
        self, layer: int, tile: TileShape | None = None, steps: list[int] | None = None
    ) -> torch.Tensor: ...


def profiled_layers(source: TileMassSource) -> list[int]:
    """The layers with tile mass (a profile may capture a subset of the model's layers)."""
    return list(getattr(source, "layers", None) or range(source.num_layers))


def samples_per_step(source: TileMassSource) -> int:
    """Samples per captured step: one per prompt, or one for a store that keeps the prompt mean."""
    index = getattr(source, "sample_index", None)
    if index is not None:
        return len(index) // len(source.steps)
    return len(source.prompts)


def open_source(source: TileMassSource | str | Path) -> TileMassSource:
    """A profile directory is loaded; anything else is used as it is."""
    if isinstance(source, str | Path):
        from compact_search.profiling import load_profile

        return load_profile(source)
    return source


@dataclass(frozen=True)
class Geometry:
    """One candidate tile shape: its tile grid and cost model."""

    tile: TileShape
    tile_grid: Grid
    cost_model: CostModel


def geometry_of(source: TileMassSource, tile: TileShape, block_size: int) -> Geometry:
    layout = TileLayout(
        source.grid, tile, block_size=block_size, prefix_tokens=source.prefix_tokens
    )
    return Geometry(tile, tile_grid_of(source.grid, tile), CostModel.from_layout(layout))


@dataclass(frozen=True)
class BucketRequest:
    """Solve every owned layer for one step bucket: sample indices into the captured samples
    (step-major: sample t * samples_per_step + p for captured step t)."""

    samples: tuple[int, ...]
    recall: float | None = None  # this bucket's threshold; None: the request's config's

    def solver_config(self, config: SolverConfig) -> SolverConfig:
        return config if self.recall is None else replace(config, recall=self.recall)


class _Shard:
    """The tables of the layers one worker owns: tables[tile][layer] [H, S, Ft, Ht, Wt]."""

    def __init__(
        self,
        source: TileMassSource | str | Path,
        tiles: list[TileShape],
        layers: list[int],
        block_size: int,
        max_options: int = DEFAULT_MAX_OPTIONS,
    ):
        self.source = open_source(source)
        self.max_options = max_options
        self.layers = list(layers)
        self.tiles = [TileShape.of(t) for t in tiles]
        self.geometries = [geometry_of(self.source, t, block_size) for t in self.tiles]
        steps = list(self.source.steps)
        self.tables: list[dict[int, np.ndarray]] = [{} for _ in self.geometries]
        # Layer, then step, then tile: a profile stores all tile shapes of one (step, layer) in
        # one file, so each file is read once.
        for layer in self.layers:
            per_step: list[list[np.ndarray]] = [[] for _ in self.geometries]
            for step in steps:
                for index, geometry in enumerate(self.geometries):
                    mass = self.source.sample_tile_mass(layer, geometry.tile, [step])
                    per_step[index].append(recall_tables(mass, geometry.tile_grid))  # [P, H, ...]
            for index in range(len(self.geometries)):
                # step-major samples (t * P + p), as the profile orders them -> [H, S, ...]
                stacked = np.concatenate(per_step[index], axis=0)
                self.tables[index][layer] = np.ascontiguousarray(np.moveaxis(stacked, 0, 1))
        self.solvers: dict[tuple[int, tuple[int, ...]], LayerSolver] = {}

    def solver(self, tile_index: int, cuts: tuple[int, ...]) -> LayerSolver:
        key = (tile_index, cuts)
        if key not in self.solvers:
            self.solvers[key] = LayerSolver(
                self.geometries[tile_index].cost_model, cuts, self.max_options
            )
        return self.solvers[key]

    def costs(self, tile_index, cuts, buckets, config) -> dict[int, np.ndarray]:
        """-> {layer: [B, H] cost of every head per bucket}."""
        solver = self.solver(tile_index, cuts)
        out = {}
        for layer in self.layers:
            table = self.tables[tile_index][layer]
            out[layer] = np.stack(
                [
                    solver.head_costs(table[:, list(b.samples)], b.solver_config(config))
                    for b in buckets
                ]
            )
        return out

    def solve(self, tile_index, cuts, buckets, config) -> dict[int, list[list[tuple]]]:
        """-> {layer: [bucket][head] (HeadSolution, worst query-tile recall over samples)}."""
        solver = self.solver(tile_index, cuts)
        geometry = self.geometries[tile_index]
        steps = list(self.source.steps)
        out = {}
        for layer in self.layers:
            table = self.tables[tile_index][layer]
            masses = torch.cat(
                [self.source.sample_tile_mass(layer, geometry.tile, [s]) for s in steps]
            )  # [S, H, nq, nk] step-major
            per_bucket = []
            for bucket in buckets:
                solutions = solver.solve(
                    table[:, list(bucket.samples)], bucket.solver_config(config)
                )
                per_bucket.append(
                    [
                        (sol, _worst_tile(sol, geometry.tile_grid, masses[list(bucket.samples), h]))
                        for h, sol in enumerate(solutions)
                    ]
                )
            out[layer] = per_bucket
        return out


def _worst_tile(solution: HeadSolution, tile_grid: Grid, mass: torch.Tensor) -> float:
    """The smallest kept mass of any query tile on any sample: mass [S, nq, nk]."""
    return float(recall(solution.pattern.tile_mask(tile_grid), mass).worst.min())


def _serve(connection, source, tiles, layers, block_size, max_options) -> None:
    torch.set_num_threads(1)
    try:
        shard = _Shard(source, tiles, layers, block_size, max_options)
    except Exception as exc:  # e.g. an unreadable profile: the parent re-raises it
        connection.send(("error", exc))
        return
    connection.send(("ready", None))
    while True:
        try:
            message = connection.recv()
        except EOFError:  # the parent is gone (killed): nothing left to answer
            return
        if message is None:
            return
        method, args = message
        try:
            connection.send(("ok", getattr(shard, method)(*args)))
        except Exception as exc:  # hand the error to the parent, which re-raises it
            connection.send(("error", exc))


class LayerShards:
    """Shards the layers of a source over `workers` processes (in-process when workers == 1)."""

    def __init__(
        self,
        source,
        tiles,
        block_size: int = DEFAULT_BLOCK_SIZE,
        workers: int = 1,
        max_options: int = DEFAULT_MAX_OPTIONS,
    ):
        src = open_source(source)
        self.layers = profiled_layers(src)
        self.tiles = [TileShape.of(t) for t in tiles]
        self.geometries = [geometry_of(src, t, block_size) for t in self.tiles]
        workers = max(1, min(workers, len(self.layers)))
        shards = [self.layers[rank::workers] for rank in range(workers)]
        self._local: _Shard | None = None
        self._pipes = []
        self._processes = []
        if workers == 1:
            self._local = _Shard(src, self.tiles, shards[0], block_size, max_options)
            return
        context = mp.get_context("spawn")
        # A profile travels as its path when it came as one; a synthetic source is pickled.
        for layers in shards:
            parent, child = context.Pipe()
            process = context.Process(
                target=_serve,
                args=(child, source, self.tiles, layers, block_size, max_options),
                daemon=True,
            )
            with _children_ignore_sigint():
                process.start()
            self._pipes.append(parent)
            self._processes.append(process)
        for pipe in self._pipes:
            self._receive(pipe)

    @staticmethod
    def _receive(pipe):
        status, value = pipe.recv()
        if status == "error":
            raise value
        return value

    def _call(self, method: str, *args) -> dict:
        if self._local is not None:
            return getattr(self._local, method)(*args)
        for pipe in self._pipes:
            pipe.send((method, args))
        merged: dict = {}
        for pipe in self._pipes:
            merged.update(self._receive(pipe))
        return merged

    def costs(self, tile_index, cuts, buckets, config: SolverConfig) -> np.ndarray:
        """[B, L, H] cost of every head's pattern."""
        per_layer = self._call("costs", tile_index, tuple(cuts), buckets, config)
        return np.stack([per_layer[layer] for layer in self.layers], axis=1)

    def solve(self, tile_index, cuts, buckets, config: SolverConfig) -> list[list[list[tuple]]]:
        """[bucket][profiled layer][head] (HeadSolution, worst query-tile recall)."""
        per_layer = self._call("solve", tile_index, tuple(cuts), buckets, config)
        return [[per_layer[layer][b] for layer in self.layers] for b in range(len(buckets))]

    def close(self) -> None:
        for pipe in self._pipes:
            pipe.send(None)
        for process in self._processes:
            process.join(timeout=10)
        self._pipes, self._processes = [], []

    def __enter__(self) -> LayerShards:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
            return
        # Interrupted or failed: the workers may be busy with a request nobody will read.
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            process.join(timeout=10)
        self._pipes, self._processes = [], []


@contextlib.contextmanager
def _children_ignore_sigint():
    """Start worker processes with SIGINT ignored (an ignored signal survives exec, and Python
    then installs no KeyboardInterrupt handler): Ctrl-C reaches the whole process group, and
    the parent alone reports it and stops the workers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
