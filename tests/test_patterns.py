"""The pattern family against its per-pair definition; recall and density on hand-made inputs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compact_search.errors import UserInputError
from compact_search.geometry import Grid, tile_coordinates
from compact_search.patterns import FrameGroup, HeadPattern, Rect, density, recall


def brute_force_mask(pattern: HeadPattern, tile_grid: Grid) -> torch.Tensor:
    coords = tile_coordinates(tile_grid).tolist()
    nt = len(coords)
    out = torch.zeros(nt, nt, dtype=torch.bool)
    for i, (fi, hi, wi) in enumerate(coords):
        for j, (fj, hj, wj) in enumerate(coords):
            df, dh, dw = abs(fi - fj), abs(hi - hj), abs(wi - wj)
            if pattern.groups is None:
                out[i, j] = True
                continue
            for group in pattern.groups:
                if group.start <= df < group.stop:
                    out[i, j] = any(keeps(r, dh, dw, tile_grid) for r in group.rects)
    return out


def keeps(rect: Rect, dh: int, dw: int, tile_grid: Grid) -> bool:
    """The window's definition, one tile pair at a time."""
    if "h" in rect.wrap:
        dh = min(dh, tile_grid.height - dh)
    if "w" in rect.wrap:
        dw = min(dw, tile_grid.width - dw)
    return rect.h_from <= dh <= rect.height and rect.w_from <= dw <= rect.width


@st.composite
def rects(draw):
    height, width = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    h_from = draw(st.integers(0, height)) if draw(st.booleans()) else 0
    w_from = draw(st.integers(0, width)) if draw(st.booleans()) else 0
    wrap = draw(st.sampled_from([(), (), ("h",), ("w",), ("h", "w")]))
    return Rect(height, width, h_from, w_from, wrap)


@st.composite
def patterns(draw):
    if draw(st.booleans()) and draw(st.booleans()):
        return HeadPattern.dense()
    bounds = sorted(set(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))))
    starts = [0, *bounds[:-1]]
    groups = tuple(
        FrameGroup(a, b, tuple(draw(st.lists(rects(), max_size=2))))
        for a, b in zip(starts, bounds, strict=True)
    )
    return HeadPattern(groups)


@settings(max_examples=120, deadline=None)
@given(patterns(), st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 5)))
def test_tile_mask_matches_per_pair_definition(pattern, tile_grid):
    tg = Grid(*tile_grid)
    assert torch.equal(pattern.tile_mask(tg), brute_force_mask(pattern, tg))


@settings(max_examples=60, deadline=None)
@given(patterns())
def test_json_round_trip(pattern):
    assert HeadPattern.from_json(pattern.to_json()) == pattern


def test_border_rule_clips_windows():
    # a 1-tile window on a 1 x 1 x 5 tile grid: the corner query keeps 2 keys, the middle one 3
    mask = HeadPattern.local(0, 0, 1).tile_mask(Grid(1, 1, 5))
    assert mask.sum(dim=1).tolist() == [2, 3, 3, 3, 2]
    assert mask[0].tolist() == [True, True, False, False, False]


def test_kinds():
    tg = Grid(4, 6, 6)
    assert HeadPattern.dense().kind(tg) == "dense"
    assert HeadPattern.local(1, 1, 1).kind(tg) == "local"
    assert HeadPattern.cross(1, 0, tg).kind(tg) == "cross"
    assert HeadPattern.global_(tg).kind(tg) == "global"
    skip = HeadPattern((FrameGroup(0, 2), FrameGroup(2, 4, (Rect(1, 1),))))
    assert skip.kind(tg) == "skip-near"
    # frames at distance 0 and 1 are skipped, 2 and 3 kept
    mask = skip.tile_mask(tg).view(4, 36, 4, 36)
    assert not mask[0, :, 1].any() and mask[0, :, 3].any()


def test_bands_and_wrapped_windows():
    tg = Grid(1, 4, 4)
    # the far-edge band: only keys 3 columns away (column 0 <-> column 3)
    far = HeadPattern((FrameGroup(0, 1, (Rect(0, 3, 0, 3),)),)).tile_mask(tg).view(4, 4, 4, 4)
    assert far[1, 0].nonzero().tolist() == [[1, 3]]
    assert not far[1, 1].any()
    # a window wrapped on w keeps the near column and the opposite edge, 1 ~ {0, 1, 3}
    wrapped = HeadPattern((FrameGroup(0, 1, (Rect(0, 1, wrap="w"),)),)).tile_mask(tg)
    assert wrapped.view(4, 4, 4, 4)[2, 0, 2].tolist() == [True, True, False, True]
    # a ring: two bands around the query tile, the query tile itself not kept
    ring = HeadPattern((FrameGroup(0, 1, (Rect(2, 2, 1, 0), Rect(2, 2, 0, 1))),))
    kept = ring.tile_mask(Grid(1, 5, 5)).view(5, 5, 5, 5)[2, 2]
    assert not kept[2, 2] and int(kept.sum()) == 24
    assert ring.kind(tg) == "far" and ring.uses_far_windows
    assert not HeadPattern.local(0, 1, 1).uses_far_windows


def test_window_json():
    assert Rect(2, 3).to_json() == [2, 3]
    band = Rect(2, 3, 1, 0, ("w",))
    assert band.to_json() == {"dh": [1, 2], "dw": [0, 3], "wrap": ["w"]}
    assert Rect.from_json(band.to_json()) == band
    assert Rect(2, 3, wrap="w") == Rect(2, 3, wrap=("w",))


def test_cross_pattern_is_rows_and_columns():
    tg = Grid(1, 5, 5)
    mask = HeadPattern.cross(0, 0, tg).tile_mask(tg).view(5, 5, 5, 5)
    # the query at (2, 2) sees its whole row and column, nothing else
    kept = mask[2, 2]
    assert kept[2].all() and kept[:, 2].all()
    assert int(kept.sum()) == 9


def test_recall_on_hand_made_matrix():
    mass = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.8, 0.1], [0.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    r = recall(mask, mass)
    assert float(r.mean) == pytest.approx((0.5 + 0.9 + 1.0) / 3)
    assert float(r.worst) == pytest.approx(0.5)
    # several samples at once
    r2 = recall(mask, torch.stack([mass, torch.eye(3)]))
    assert r2.mean.tolist() == pytest.approx([(0.5 + 0.9 + 1.0) / 3, 1.0])
    assert float(density(mask)) == pytest.approx(4 / 9)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: FrameGroup(1, 3), None),
        (lambda: FrameGroup(2, 2), "start < stop"),
        (lambda: FrameGroup(0, 2, (Rect(1, 1),) * 3), "at most 2"),
        (lambda: Rect(-1, 0), "height"),
        (lambda: Rect(1, 1, 2, 0), "must not pass their ends"),
        (lambda: Rect(1, 1, wrap=("f",)), "wrap names axes"),
        (lambda: Rect.from_json({"dh": [0, 1], "dw": [0, 1], "shift": 1}), "unknown window"),
        (lambda: Rect.from_json({"dh": [0, 1]}), "band window looks like"),
        (lambda: HeadPattern((FrameGroup(1, 3),)), "contiguous from 0"),
        (lambda: HeadPattern(()), "at least one"),
    ],
)
def test_invalid_patterns(build, message):
    if message is None:
        build()
        return
    with pytest.raises(UserInputError, match=message):
        build()


def test_oversize_window_is_rejected_for_a_grid():
    with pytest.raises(UserInputError, match="exceeds"):
        HeadPattern.local(0, 6, 0).validate_for(Grid(2, 6, 6))
    wrapped = HeadPattern((FrameGroup(0, 1, (Rect(0, 4, wrap="w"),)),))
    wrapped.validate_for(Grid(2, 6, 8))
    with pytest.raises(UserInputError, match="largest wrapped tile distance 3"):
        wrapped.validate_for(Grid(2, 6, 6))
    with pytest.raises(UserInputError, match="unknown pattern kind"):
        HeadPattern.from_json({"kind": "diagonal"})
