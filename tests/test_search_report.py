"""The search report: pattern names by what they keep, the head gallery (tile mass by offset
beside the kept offsets), integer axes on kinds.png, and the files written."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from compact_search.geometry import Grid
from compact_search.patterns import FrameGroup, HeadPattern, Rect, recall
from compact_search.search.offsets import offset_index
from compact_search.search.report import (
    gallery_figure,
    gallery_path,
    heads_frame,
    kept_offsets,
    kinds_figure,
    offset_mass,
    offset_strips,
    pattern_name,
    write_report,
)
from compact_search.search.result import BucketBounds, HeadResult, SearchResult
from compact_search.search.synthetic import planted_pattern, planted_tile_mass

TILE_GRID = Grid(5, 4, 6)  # odd sizes: no axis mistaken for another
TILE = (2, 3, 2)
GRID = (10, 12, 12)


def local():
    return HeadPattern.local(1, 1, 1)


def cross():
    return HeadPattern.cross(1, 0, TILE_GRID)


def temporal():
    return HeadPattern.global_(TILE_GRID, frames=1)


def far():
    return planted_pattern("far-edge", TILE_GRID)


def global_then_local():
    whole = Rect(TILE_GRID.height - 1, TILE_GRID.width - 1)
    return HeadPattern((FrameGroup(0, 1, (whole,)), FrameGroup(1, 5, (Rect(1, 2),))))


PLANTED = {"local": local, "cross": cross, "temporal": temporal, "far": far}


@pytest.mark.parametrize(
    "make, name",
    [
        (local, "local"),
        (cross, "cross"),
        (temporal, "temporal"),
        (far, "far"),
        (lambda: planted_pattern("ring", TILE_GRID), "far"),
        (lambda: HeadPattern.global_(TILE_GRID), "global"),
        (HeadPattern.dense, "dense"),
        (lambda: HeadPattern((FrameGroup(0, 5),)), "empty"),
        # windows that shrink with frame distance are still one local window per group
        (lambda: planted_pattern("decaying", TILE_GRID), "local"),
        (lambda: planted_pattern("peaking", TILE_GRID), "none>local"),
        (global_then_local, "global>local"),
        # a skipped group after the last kept one, and groups past the tile frames, do not count
        (
            lambda: HeadPattern(
                (
                    FrameGroup(0, 2, (Rect(1, 1),)),
                    FrameGroup(2, 3),
                    FrameGroup(3, 5, (Rect(0, 0),)),
                    FrameGroup(5, 9, (Rect(3, 5),)),
                )
            ),
            "local>none>local",
        ),
        (
            lambda: HeadPattern(
                (FrameGroup(0, 2, (Rect(3, 5),)), FrameGroup(2, 5), FrameGroup(5, 8, (Rect(1, 1),)))
            ),
            "temporal",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_patterns_are_named_by_what_they_keep(make, name):
    assert pattern_name(make(), TILE_GRID) == name


def test_no_planted_head_is_called_mixed_any_more():
    # the old label, HeadPattern.kind, calls whole-frames-near + window-further "mixed"
    assert global_then_local().kind(TILE_GRID) == "mixed"
    assert pattern_name(global_then_local(), TILE_GRID) == "global>local"


def offset_reference(pattern: HeadPattern, tile_grid: Grid) -> torch.Tensor:
    """[Ft, Ht, Wt]: which offsets the tile mask keeps, read off the mask itself."""
    mask = pattern.tile_mask(tile_grid).reshape(-1)
    index = offset_index(tile_grid).reshape(-1)
    kept = torch.zeros(tile_grid.num_tokens, dtype=torch.bool)
    kept[index[mask]] = True
    seen = torch.zeros(tile_grid.num_tokens, dtype=torch.bool)
    seen[index] = True
    assert seen.all()
    return kept.reshape(tile_grid.as_tuple())


@pytest.mark.parametrize(
    "make",
    [
        *PLANTED.values(),
        global_then_local,
        HeadPattern.dense,
        lambda: planted_pattern("ring", TILE_GRID),
        # nothing near in time, then a window wrapped around the width, then a band
        lambda: HeadPattern(
            (
                FrameGroup(0, 1),
                FrameGroup(1, 3, (Rect(1, 3, wrap=("w",)),)),
                FrameGroup(3, 5, (Rect(3, 5, 2, 0),)),
            )
        ),
    ],
)
def test_kept_offsets_are_the_offsets_of_the_tile_mask(make):
    pattern = make()
    assert torch.equal(kept_offsets(pattern, TILE_GRID), offset_reference(pattern, TILE_GRID))


def planted_mass(patterns, samples=3, seed=0) -> torch.Tensor:
    """[S, H, nq, nk] planted tile mass, rows summing to 1."""
    gen = torch.Generator().manual_seed(seed)
    inside = torch.linspace(0.7, 0.95, samples)
    return planted_tile_mass(patterns, TILE_GRID, inside, generator=gen)


def test_offset_mass_summed_over_kept_offsets_is_the_mean_recall():
    patterns = [f() for f in PLANTED.values()]
    mass = planted_mass(patterns)
    tables = offset_mass(mass, TILE_GRID)  # [H, Ft, Ht, Wt]
    assert tables.shape == (len(patterns), *TILE_GRID.as_tuple())
    np.testing.assert_allclose(tables.sum(axis=(1, 2, 3)), 1.0, atol=1e-5)
    for h, pattern in enumerate(patterns):
        expected = recall(pattern.tile_mask(TILE_GRID), mass[:, h]).mean.mean()
        kept = kept_offsets(pattern, TILE_GRID).numpy()
        assert tables[h][kept].sum() == pytest.approx(float(expected), abs=1e-5)


def test_offset_strips_put_heads_in_rows_and_frame_distances_side_by_side():
    heads, (ft, ht, wt) = 2, TILE_GRID.as_tuple()
    tables = np.arange(heads * ft * ht * wt, dtype=float).reshape(heads, ft, ht, wt)
    strips = offset_strips(tables)
    assert strips.shape == (heads * (ht + 1) - 1, ft * (wt + 1) - 1)
    for h, f, dh, dw in [(0, 0, 0, 0), (1, 4, 3, 5), (1, 2, 1, 0), (0, 3, 2, 4)]:
        assert strips[h * (ht + 1) + dh, f * (wt + 1) + dw] == tables[h, f, dh, dw]
    assert np.isnan(strips[ht]).all()  # the row between the two heads
    assert np.isnan(strips[:, wt]).all()  # the column between |df| = 0 and 1
    assert np.isfinite(strips).sum() == tables.size


def head_result(bucket, layer, head, pattern, recall_min=0.9, cost=0.5) -> HeadResult:
    return HeadResult(
        bucket=bucket,
        layer=layer,
        head=head,
        kind=pattern.kind(TILE_GRID),
        pattern=pattern,
        recall_mean=recall_min + 0.01,
        recall_min=recall_min,
        recall_worst_tile=recall_min - 0.1,
        density=0.3,
        cost=cost,
        greedy_pattern=HeadPattern.dense(),
        greedy_cost=1.0,
    )


def search_result(patterns_of, layers=(0, 3), num_heads=4) -> SearchResult:
    """Two buckets; patterns_of(bucket, layer) -> the layer's head patterns."""
    buckets = (BucketBounds(2, 5, (3,)), BucketBounds(5, 10, (6, 8)))
    heads = tuple(
        head_result(b, layer, h, p, recall_min=0.9 + 0.01 * h, cost=0.2 + 0.1 * h)
        for b in range(len(buckets))
        for layer in layers
        for h, p in enumerate(patterns_of(b, layer))
    )
    return SearchResult(
        model="planted",
        fingerprint="test",
        grid=GRID,
        prefix_tokens=0,
        num_layers=max(layers) + 1,
        layers=tuple(layers),
        num_heads=num_heads,
        num_steps=10,
        tile=TILE,
        tile_grid=TILE_GRID.as_tuple(),
        block_size=16,
        recall=0.9,
        mean_over_samples=False,
        dense_steps=2,
        buckets=buckets,
        frame_cuts=(1,),
        objective=0.5,
        study={"name": "s", "best_trial": 0, "trials_completed": 1},
        heads=heads,
    )


def planted_order(bucket, layer):
    """Every layer and bucket holds the four planted kinds, rotated, so heads differ."""
    makers = list(PLANTED.values())
    shift = bucket + layer
    return [makers[(h + shift) % 4]() for h in range(4)]


class PlantedSource:
    """The profile interface the gallery reads: tile mass of the planted heads per layer."""

    def __init__(self):
        self.calls = []

    def sample_tile_mass(self, layer, tile=None, steps=None):
        self.calls.append((layer, tuple(tile.as_tuple()), tuple(steps)))
        bucket = 0 if steps == [3] else 1
        return planted_mass(planted_order(bucket, layer), samples=len(steps), seed=layer)


def test_write_report_writes_every_file_and_a_gallery_page_per_bucket_and_layer(tmp_path):
    result = search_result(planted_order)
    source = PlantedSource()
    paths = write_report(result, tmp_path, source)
    for key in ("csv", "markdown", "pareto", "kinds"):
        assert paths[key].stat().st_size > 0, key
    pages = sorted((tmp_path / "gallery").iterdir())
    expected = sorted(gallery_path(tmp_path, b, layer) for b in (0, 1) for layer in (0, 3))
    assert paths["gallery"] == tmp_path / "gallery" and pages == expected
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pages)
    # the tile mass of each bucket's own profiled steps, at the chosen tile
    assert sorted(source.calls) == sorted(
        (layer, TILE, steps) for layer in (0, 3) for steps in ((3,), (6, 8))
    )
    table = pd.read_csv(paths["csv"])
    assert set(table["kind"]) == set(PLANTED)
    assert "mixed" not in paths["markdown"].read_text()


def test_without_a_profile_there_is_no_gallery(tmp_path):
    paths = write_report(search_result(planted_order), tmp_path)
    assert "gallery" not in paths and not (tmp_path / "gallery").exists()


def test_gallery_draws_each_heads_mass_beside_the_offsets_its_pattern_keeps():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = search_result(planted_order)
    patterns = planted_order(1, 3)
    tables = offset_mass(planted_mass(patterns), TILE_GRID)
    fig = gallery_figure(result, 1, 3, tables)
    mass_panel, kept_panel = fig.axes[0], fig.axes[1]
    shown = np.asarray(mass_panel.images[0].get_array().filled(np.nan))
    strips = offset_strips(tables)
    top = np.nanmax(strips)
    np.testing.assert_allclose(shown, np.clip(strips, top * 1e-4, top), equal_nan=True)
    kept_shown = np.asarray(kept_panel.images[0].get_array().filled(np.nan))
    kept = np.stack([kept_offsets(p, TILE_GRID).numpy() for p in patterns]).astype(float)
    np.testing.assert_array_equal(kept_shown > 0, offset_strips(kept) > 0)
    labels = [t.get_text() for t in kept_panel.get_yticklabels()]
    for h, (label, pattern) in enumerate(zip(labels, patterns, strict=True)):
        head = result.head(1, 3, h)
        assert label.startswith(pattern_name(pattern, TILE_GRID) + " ")
        assert f"recall {head.recall_min:.3f}" in label and f"cost {head.cost:.3f}" in label
    assert [t.get_text() for t in mass_panel.get_xticklabels()] == ["0", "1", "2", "3", "4"]
    plt.close(fig)


def tick_texts(labels) -> list[str]:
    return [t.get_text() for t in labels]


def test_kinds_axes_carry_the_profiled_layers_and_heads_as_integers():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = search_result(planted_order, layers=(0, 3))
    fig = kinds_figure(result, heads_frame(result))
    for ax in fig.axes[:2]:
        assert tick_texts(ax.get_yticklabels()) == ["0", "3"]  # layer numbers, not rows 0, 1
        assert tick_texts(ax.get_xticklabels()) == ["0", "1", "2", "3"]
        assert [float(t) for t in ax.get_xticks()] == [0, 1, 2, 3]
    plt.close(fig)


def test_kinds_axes_of_many_heads_label_every_kth_head():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = 45
    result = search_result(lambda b, layer: [local()] * heads, layers=(1,), num_heads=heads)
    fig = kinds_figure(result, heads_frame(result))
    step = math.ceil(heads / 20)
    assert tick_texts(fig.axes[0].get_xticklabels()) == [str(h) for h in range(0, heads, step)]
    plt.close(fig)


def test_optimize_writes_the_gallery_of_the_profile_it_searched(tmp_path):
    from compact_search.search import SearchConfig, optimize_profile
    from compact_search.search.synthetic import SyntheticProfile

    profile = SyntheticProfile(
        grid=(8, 6, 6),
        tiles=[(2, 2, 2)],
        num_layers=2,
        num_heads=2,
        num_steps=6,
        steps=(1, 4),
        kinds=("local", "cross"),
    )
    result = optimize_profile(profile, tmp_path, SearchConfig(n_trials=2, workers=1, seed=0))
    pages = sorted((tmp_path / "gallery").iterdir())
    assert pages == sorted(
        gallery_path(tmp_path, b, layer) for b in range(len(result.buckets)) for layer in (0, 1)
    )
