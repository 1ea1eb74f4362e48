"""`compact-search export`: a search run -> the versioned config the runtime loads.

Per (bucket, layer, head) the chosen pattern, or with `recall=` the cheapest point of the head's
Pareto front that reaches it; layers the profile did not capture stay dense. Every exported head's
recall is re-measured on the profile (the same samples the search used) and written into the
config's stats; a head below the threshold stops the export. Writes are atomic. The runtime
builds block masks and lookup tables from the config itself (docs/config.md says why there is no
precomputed-table file); `--format flex` also writes FlexAttention block masks for other runtimes
(`<config>.flex.safetensors`, read back by `runtime.kernels.flex.load_flex_masks`).

A run of several experts (`optimize` on a Wan2.2 profile) exports one config: the first expert's
patterns at the top level and every other expert's under `experts` (docs/config.md), each built
and re-measured on that expert's own steps of the profile.

`precision=` ("bf16", "fp8" or "int8", docs/config.md "Precision") sets the config's attention
arithmetic, for every expert; None and "bf16" write the same bytes (a bf16 config has no
`precision` field). The FlexAttention masks do not depend on it: at 8 bits they are written as for
"bf16", with a warning that FlexAttention runs them at its own 16-bit precision; an 8-bit
precision at a block size the 8-bit kernels do not take warns that the runtime runs the config as
bf16.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compact_search.check import head_recalls
from compact_search.config import (
    CompactConfig,
    GeometrySpec,
    HeadEntry,
    ModelSpec,
    StepSchedule,
    check_precision,
    default_provenance,
    save_config,
)
from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileShape
from compact_search.io import atomic_write_bytes, written_together
from compact_search.patterns import HeadPattern, density
from compact_search.search.run import waste_warnings

FLEX_SUFFIX = ".flex.safetensors"


@dataclass(frozen=True)
class ExportResult:
    config: CompactConfig
    path: Path
    sidecar: Path | None  # the FlexAttention masks of --format flex
    recall: float
    below_threshold: list[tuple[int, int, int, float]]  # (bucket, layer, head, recall)
    mean_density: float
    mean_cost: float
    # a wasteful block size, a cost above dense, 8 bits at a block size or format that runs 16-bit
    warnings: tuple[str, ...] = ()


def _pattern_for(head_result, recall: float | None) -> HeadPattern:
    if recall is None:
        return head_result.pattern
    reaching = [e for e in head_result.front if e.level >= recall - 1e-9]
    if not reaching:
        return HeadPattern.dense()
    return min(reaching, key=lambda e: e.cost).pattern


def build_config(result, profile, *, recall: float | None = None) -> CompactConfig:
    """The config for a search result (and optionally another point of each head's front)."""
    from compact_search.models.adapters import ADAPTERS

    adapter = profile.adapter
    prefix_at = ADAPTERS[adapter].prefix_at if adapter in ADAPTERS else "start"
    geometry = GeometrySpec(
        Grid(*result.grid),
        TileShape(*result.tile),
        result.block_size,
        result.prefix_tokens,
        prefix_at,
    )
    # A bucket searched at its own threshold (a sparse warm-up) keeps it; `recall` moves the rest.
    overall = recall if recall is not None else result.recall
    own = [bucket.recall is not None for bucket in result.buckets]
    schedule = StepSchedule(
        result.num_steps,
        result.dense_steps,
        tuple(b.start for b in result.buckets),
        tuple(result.bucket_recall(b) if own[b] else overall for b in range(len(own)))
        if any(own)
        else (),
    )
    heads = []
    for b in range(len(result.buckets)):
        pick = None if own[b] else recall
        layers = []
        for layer in range(result.num_layers):
            if layer not in result.layers:
                layers.append(
                    tuple(HeadEntry(HeadPattern.dense()) for _ in range(result.num_heads))
                )
                continue
            layers.append(
                tuple(
                    HeadEntry(_pattern_for(result.head(b, layer, h), pick))
                    for h in range(result.num_heads)
                )
            )
        heads.append(tuple(layers))
    # The model's name is the run profile's ("wan2.1-t2v-1.3b"), not a folder path of one
    # machine; the path stays in the provenance.
    name = getattr(profile, "metadata", {}).get("name") or result.model
    model = ModelSpec(name, adapter, result.num_layers, result.num_heads, profile.head_dim)
    provenance = default_provenance(
        recall_threshold=overall,
        recall_measure="min over samples" if not result.mean_over_samples else "mean over samples",
        profile_fingerprint=result.fingerprint,
        search_objective=result.objective,
        model_source=result.model,
    )
    return CompactConfig(model, geometry, schedule, tuple(heads), provenance)


def measure(config: CompactConfig, result, profile) -> tuple[CompactConfig, list]:
    """Re-measure recall of every head on the profile; returns the config with stats filled in
    and the heads below their bucket's threshold (by the measure the search constrained)."""
    overall = float(config.provenance["recall_threshold"])
    layout = config.layout()
    below = []
    new_heads = []
    for b, bounds in enumerate(result.buckets):
        threshold = config.schedule.recall_of(b, overall)
        layers = []
        for layer in range(config.model.num_layers):
            entries = config.heads[b][layer]
            masks = config.tile_masks(b, layer)  # [H, nt, nt]
            costs = layout.cost(masks)  # [H]
            dens = density(masks)  # [H]
            if layer not in result.layers or not bounds.steps:
                layers.append(
                    tuple(
                        HeadEntry(e.pattern, {"density": float(dens[h]), "cost": float(costs[h])})
                        for h, e in enumerate(entries)
                    )
                )
                continue
            samples = profile.sample_tile_mass(
                layer, tile=config.geometry.tile, steps=list(bounds.steps)
            )
            recalls = head_recalls(masks, samples)
            row = []
            for h, entry in enumerate(entries):
                stats = {
                    "recall_mean": float(recalls.mean[h]),
                    "recall_min": float(recalls.minimum[h]),
                    "recall_worst_tile": float(recalls.worst_tile[h]),
                    "density": float(dens[h]),
                    "cost": float(costs[h]),
                }
                measured = stats["recall_mean"] if result.mean_over_samples else stats["recall_min"]
                if measured < threshold - 1e-6:
                    below.append((b, layer, h, measured))
                row.append(HeadEntry(entry.pattern, stats))
            layers.append(tuple(row))
        new_heads.append(tuple(layers))
    measured = CompactConfig(
        config.model, config.geometry, config.schedule, tuple(new_heads), config.provenance
    )
    return measured, below


def write_flex_masks(config: CompactConfig, path: Path) -> Path:
    """FlexAttention block masks (block level) for every (bucket, layer) as safetensors.

    Per (bucket, layer): `kv_num_blocks`, `kv_indices` (partial blocks: they hold padded keys),
    `full_kv_num_blocks`, `full_kv_indices`; plus `key_block_lengths`.
    `runtime.kernels.flex.load_flex_masks` turns them back into BlockMasks.
    """
    from safetensors.torch import save

    from compact_search.runtime.kernels.flex import flex_block_mask

    layout = config.layout()
    lengths = layout.key_block_lengths()
    tensors = {"key_block_lengths": lengths.contiguous()}
    for b in range(config.schedule.num_buckets):
        for layer in range(config.model.num_layers):
            mask = flex_block_mask(
                config.block_masks(b, layer), layout.padded_len, layout.block_size, lengths
            )
            for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
                tensors[f"b{b}.l{layer}.{name}"] = getattr(mask, name).contiguous()
    metadata = {
        "format": "compact-search/flex",
        "version": "1",
        "block_size": str(layout.block_size),
        "seq_len": str(layout.padded_len),
    }
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    profile: str | Path | None = None,
    recall: float | None = None,
    output_format: str = "json",
    allow_below: bool = False,
    precision: str | None = None,
) -> ExportResult:
    """Export a search run to `out` (see the module doc)."""
    from compact_search.profiling import load_profile
    from compact_search.search.result import load_search_result

    if precision is not None:
        check_precision(precision, "--precision")
    if recall is not None and not 0.0 < recall <= 1.0:
        raise UserInputError(f"--recall must be in (0, 1], got {recall}")
    if output_format not in ("json", "flex"):
        raise UserInputError(f"--format must be json or flex, got {output_format!r}")
    result = load_search_result(run_dir)
    expert_runs = {
        name: load_search_result(Path(run_dir) / folder)
        for name, folder in result.study.get("experts", {}).items()
    }
    recorded = result.study.get("profile")  # `optimize` records the capture it searched
    profile_path = profile if profile is not None else recorded
    if profile_path is None:
        sibling = Path(run_dir).parent / "profile"  # the runs/<name>/{profile,run} convention
        if not (sibling / "profile.json").exists():
            raise UserInputError(f"{run_dir}: no profile recorded in the run; pass --profile")
        profile_path = sibling
    if profile is None and recorded is not None and not Path(recorded).exists():
        raise UserInputError(
            f"{run_dir}: the profile the run searched, {recorded}, is gone; pass --profile"
        )
    capture = load_profile(profile_path)
    measured = {}
    below = []
    for name, searched in {result.study.get("expert"): result, **expert_runs}.items():
        prof = capture if name is None else capture.expert_view(name)
        if prof.fingerprint != searched.fingerprint:
            changed = "is not the one"
            if profile is None:
                changed = "has changed since the run searched it"
            raise UserInputError(
                f"profile {profile_path} (fingerprint {prof.fingerprint}) {changed} "
                f"(the run searched {searched.fingerprint}); optimize again or pass --profile"
            )
        measured[name], expert_below = measure(
            build_config(searched, prof, recall=recall), searched, prof
        )
        below += [(name, *entry) for entry in expert_below]
    config, *others = measured.values()
    config = config.with_experts(dict(zip(list(measured)[1:], others, strict=True)))
    if precision is not None:
        config = config.with_precision(precision)
    if output_format == "flex" and config.experts:
        raise UserInputError(
            "--format flex writes the masks of one transformer; export a run of several "
            "experts as json"
        )
    if below and not allow_below:
        name, b, layer, h, value = below[0]
        where = config if name is None else config.expert_configs()[name]
        expert = "" if name is None else f"{name} "
        raise UserInputError(
            f"{len(below)} heads are below the recall threshold on the profile, e.g. {expert}"
            f"bucket {b} layer {layer} head {h}: {value:.4f} < "
            f"{where.schedule.recall_of(b, where.provenance['recall_threshold'])} "
            f"(--allow-below writes the config anyway)"
        )
    out = Path(out)
    sidecar = None
    # The config and its FlexAttention masks are committed together: both are written in full
    # before either replaces an older file, so a full disk never pairs a new one with an old one.
    flex_path = out.with_name(out.name.removesuffix(".json") + FLEX_SUFFIX)
    with written_together():
        save_config(config, out)
        if output_format == "flex":
            sidecar = write_flex_masks(config, flex_path)
    if output_format == "json":
        flex_path.unlink(missing_ok=True)  # an older export's masks would disagree with it
    summary = config.summary()
    warnings = waste_warnings(result, cost=summary["mean_cost"])
    eight_bit = config.precision != "bf16"
    if eight_bit:
        from compact_search.runtime.attention import FP8_BLOCK_SIZES

        block_size = config.geometry.block_size
        if block_size not in FP8_BLOCK_SIZES:
            sizes = " or ".join(map(str, FP8_BLOCK_SIZES))
            warnings.append(
                f"precision {config.precision} at block size {block_size}: the 8-bit kernels "
                f"take {sizes}, so the runtime runs this config as bf16 (optimize --block-size "
                f"{sizes} for 8 bits)"
            )
    if sidecar is not None and eight_bit:
        # The masks are the same at any precision; only their reader's arithmetic differs.
        warnings.append(
            f"{sidecar.name}: FlexAttention has no 8-bit path and runs these masks at its own "
            f"16-bit precision; precision {config.precision} is the compact-search runtime's "
            "(apply, evaluate)"
        )
    return ExportResult(
        config,
        out,
        sidecar,
        float(config.provenance["recall_threshold"]),
        [entry[1:] for entry in below],
        summary["mean_density"],
        summary["mean_cost"],
        tuple(warnings),
    )
