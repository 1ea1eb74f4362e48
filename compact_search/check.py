"""`compact-search check`: a regression gate for configs, against a profile of (held-out) prompts.

For every (bucket, layer, head) the gate recomputes recall on the profile's samples that fall in
the bucket's steps and fails a head when

- its recall (mean over samples by default, `statistic="min"` for the worst sample) is below
  `min_recall - tolerance` (`min_recall` defaults to the threshold the config's bucket was
  searched at: `schedule.bucket_recall`, else the config's recall threshold), or
- a baseline config is given and the head's recall fell more than `tolerance` below the
  baseline's recall on the same profile;

and fails the config when its mean density is above `max_density`, or above the baseline's mean
density plus `density_tolerance`. With `kernel=True` the Triton kernel is compared with the
reference on the config's own block masks, at `kernel_precision` (default: the config's
`precision`). An 8-bit kernel is gated against the 8-bit path's exact emulation (what it must
compute); its error against the fp32 reference, the method's own, is reported beside it.

A config of several experts (Wan2.2) is gated expert by expert on the profile's steps each one
runs (`Capture.expert_view`): the report is the first expert's, with the others' in `experts`;
it passes when all of them pass. A one-transformer config on a profile of several experts is
gated on its own expert's steps, and the report notes which experts it leaves dense.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from compact_search.config import CompactConfig, check_precision
from compact_search.errors import UserInputError
from compact_search.patterns import density as mask_density


@dataclass(frozen=True)
class HeadCheck:
    bucket: int
    layer: int
    head: int
    kind: str
    density: float
    recall_mean: float
    recall_min: float
    recall_worst_tile: float
    baseline_recall: float | None
    passed: bool
    reason: str
    expert: str = "transformer"  # the pipeline attribute of the transformer the head is in


@dataclass(frozen=True)
class KernelCheck:
    bucket: int
    layer: int
    max_abs_error: float
    relative_error: float
    passed: bool
    precision: str = "bf16"
    kernel: str = ""  # what ran: a key of runtime.attention.KERNELS, e.g. "triton-portable-fp8"
    reference: str = "fp32"  # what relative_error is against: "fp32", "reference-fp8" or "-int8"
    fp32_relative_error: float | None = None  # against the fp32 reference, at any precision


@dataclass
class CheckReport:
    heads: list[HeadCheck]
    mean_density: float
    baseline_mean_density: float | None
    min_recall: float | None
    statistic: str
    samples_per_bucket: dict[int, int]
    config_failures: list[str] = field(default_factory=list)
    kernel: list[KernelCheck] = field(default_factory=list)
    bucket_recall: dict[int, float | None] = field(default_factory=dict)  # the floor per bucket
    notes: list[str] = field(default_factory=list)
    experts: dict[str, CheckReport] = field(default_factory=dict)  # the other experts' reports

    @property
    def all_heads(self) -> list[HeadCheck]:
        """Every checked head, this report's and its experts'."""
        return self.heads + [h for report in self.experts.values() for h in report.all_heads]

    @property
    def failed_heads(self) -> list[HeadCheck]:
        own = [h for h in self.heads if not h.passed]
        return own + [h for report in self.experts.values() for h in report.failed_heads]

    @property
    def passed(self) -> bool:
        return (
            not self.failed_heads
            and not self.config_failures
            and all(k.passed for k in self.kernel)
            and all(report.passed for report in self.experts.values())
        )

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "mean_density": self.mean_density,
            "baseline_mean_density": self.baseline_mean_density,
            "min_recall": self.min_recall,
            "bucket_recall": self.bucket_recall,
            "statistic": self.statistic,
            "samples_per_bucket": self.samples_per_bucket,
            "config_failures": self.config_failures,
            "failed_heads": len(self.failed_heads),
            "heads": [asdict(h) for h in self.heads],
            "kernel": [asdict(k) for k in self.kernel],
            "notes": self.notes,
            **(
                {"experts": {name: r.to_json() for name, r in self.experts.items()}}
                if self.experts
                else {}
            ),
        }


def _check_compatible(config: CompactConfig, profile, what: str) -> None:
    model = config.model
    if (profile.num_layers, profile.num_heads) != (model.num_layers, model.num_heads):
        raise UserInputError(
            f"{what} is for {model.num_layers} layers x {model.num_heads} heads, the profile has "
            f"{profile.num_layers} x {profile.num_heads}"
        )
    if profile.grid != config.geometry.grid:
        raise UserInputError(
            f"{what} grid {config.geometry.grid} differs from the profile grid {profile.grid}"
        )
    if config.geometry.tile not in list(profile.tiles):
        tiles = ", ".join(str(t) for t in profile.tiles)
        raise UserInputError(
            f"{what} tile {config.geometry.tile} is not among the profile's tiles ({tiles})"
        )


def bucket_steps(config: CompactConfig, profile) -> dict[int, list[int]]:
    """Profiled steps that fall into each of the config's buckets (warm-up steps drop out)."""
    out: dict[int, list[int]] = {b: [] for b in range(config.schedule.num_buckets)}
    for step in profile.steps:
        bucket = config.schedule.bucket_for_step(step, profile.num_steps)
        if bucket is not None:
            out[bucket].append(step)
    return out


@dataclass(frozen=True)
class HeadRecalls:
    mean: torch.Tensor  # [H] mean over samples of the per-sample mean recall
    minimum: torch.Tensor  # [H] the worst sample
    worst_tile: torch.Tensor  # [H] the worst query tile of any sample

    def measure(self, statistic: str) -> torch.Tensor:
        """[H] fp64: the recall the gate compares, mean or worst over samples."""
        return (self.mean if statistic == "mean" else self.minimum).double()


def head_recalls(tile_masks: torch.Tensor, samples: torch.Tensor) -> HeadRecalls:
    """tile_masks [H, nt, nt], samples [S, H, nt, nt]."""
    kept = (samples * tile_masks.unsqueeze(0).to(samples.dtype)).sum(dim=-1)  # [S, H, nq]
    per_sample = kept.mean(dim=-1)  # [S, H]
    return HeadRecalls(per_sample.mean(dim=0), per_sample.min(dim=0).values, kept.amin(dim=(0, 2)))


def check_config(
    config: CompactConfig,
    profile,
    **options,
) -> CheckReport:
    """Gate `config` on `profile`, expert by expert where either has several; see the module
    doc and `check_one_config` for the options."""
    profile_experts = list(getattr(profile, "experts", None) or [])
    if getattr(profile, "expert", None) is not None:
        profile_experts = []  # already one expert's view
    configs = config.expert_configs()
    if not config.experts and len(profile_experts) < 2:
        return check_one_config(config, profile, **options)
    if not profile_experts or len(profile_experts) < 2:
        raise UserInputError(
            f"the config holds patterns for {', '.join(configs)}; the profile is of one "
            "transformer: profile the pipeline with all its experts"
        )
    unknown = [name for name in configs if name not in profile_experts]
    if unknown:
        raise UserInputError(
            f"the config names experts {unknown} that the profile does not hold "
            f"({', '.join(profile_experts)})"
        )
    baseline = options.pop("baseline", None)
    base_configs = baseline.expert_configs() if baseline is not None else {}
    reports = {
        name: check_one_config(
            expert,
            profile.expert_view(name),
            baseline=base_configs.get(name),
            expert=name,
            **options,
        )
        for name, expert in configs.items()
    }
    first, *_ = reports.values()
    dense = [name for name in profile_experts if name not in configs]
    if dense:
        first.notes.append(
            f"the config holds no patterns for {', '.join(dense)}: those experts stay dense "
            "(unchecked)"
        )
    first.experts = {name: report for name, report in list(reports.items())[1:]}
    return first


def check_one_config(
    config: CompactConfig,
    profile,
    *,
    baseline: CompactConfig | None = None,
    min_recall: float | None = None,
    max_density: float | None = None,
    statistic: str = "mean",
    tolerance: float = 0.0,
    density_tolerance: float = 0.005,
    kernel: bool = False,
    kernel_layers: int | None = None,
    kernel_precision: str | None = None,
    progress=None,
    expert: str = "transformer",
) -> CheckReport:
    """Gate one transformer's `config` on `profile`; see the module doc. `progress(advance)`
    ticks per layer; `expert` names the transformer in the head rows."""
    if statistic not in ("mean", "min"):
        raise UserInputError(f"statistic must be 'mean' or 'min', got {statistic!r}")
    _check_compatible(config, profile, "config")
    if baseline is not None:
        _check_compatible(baseline, profile, "baseline config")
    if min_recall is not None and not 0.0 <= min_recall <= 1.0:
        raise UserInputError(f"min recall must be in [0, 1], got {min_recall}")
    threshold = config.provenance.get("recall_threshold")
    config_recall = float(threshold) if isinstance(threshold, (int, float)) else None

    def bucket_min_recall(bucket: int) -> float | None:
        if min_recall is not None:
            return min_recall
        return config.schedule.recall_of(bucket, config_recall)

    steps = bucket_steps(config, profile)
    tile_grid = config.layout().tile_grid
    rows: list[HeadCheck] = []
    densities = []
    baseline_densities = []
    notes = []
    samples_per_bucket = {b: 0 for b in steps}
    captured = set(getattr(profile, "layers", range(config.model.num_layers)))
    missing = [layer for layer in range(config.model.num_layers) if layer not in captured]
    if missing:
        notes.append(f"layers {missing} were not profiled: their recall is unchecked")
    for bucket in range(config.schedule.num_buckets):
        if not steps[bucket]:
            notes.append(
                f"bucket {bucket} (steps {config.schedule.bucket_range(bucket)}) has no profiled "
                f"step: its recall is unchecked"
            )
        for layer in range(config.model.num_layers):
            masks = config.tile_masks(bucket, layer)  # [H, nt, nt]
            densities.append(mask_density(masks))
            base_masks = None
            if baseline is not None:
                base_masks = baseline.tile_masks(bucket, layer)
                baseline_densities.append(mask_density(base_masks))
            if steps[bucket] and layer in captured:
                samples = profile.sample_tile_mass(
                    layer, tile=config.geometry.tile, steps=steps[bucket]
                )  # [S, H, nt, nt]
                samples_per_bucket[bucket] = samples.shape[0]
                recalls = head_recalls(masks, samples)
                base_recalls = head_recalls(base_masks, samples) if base_masks is not None else None
                value = recalls.measure(statistic)  # [H]
                base = base_recalls.measure(statistic) if base_recalls is not None else None
                floor = bucket_min_recall(bucket)
                for head in range(config.model.num_heads):
                    reasons = []
                    if floor is not None and value[head] < floor - tolerance:
                        reasons.append(f"recall {value[head]:.4f} < {floor:.4f}")
                    if base is not None and value[head] < base[head] - tolerance:
                        reasons.append(f"recall {value[head]:.4f} < baseline {base[head]:.4f}")
                    rows.append(
                        HeadCheck(
                            bucket=bucket,
                            layer=layer,
                            head=head,
                            kind=config.pattern(bucket, layer, head).kind(tile_grid),
                            density=float(densities[-1][head]),
                            recall_mean=float(recalls.mean[head]),
                            recall_min=float(recalls.minimum[head]),
                            recall_worst_tile=float(recalls.worst_tile[head]),
                            baseline_recall=None if base is None else float(base[head]),
                            passed=not reasons,
                            reason="; ".join(reasons),
                            expert=expert,
                        )
                    )
            if progress is not None:
                progress(1)

    mean_density = float(torch.cat(densities).mean())
    baseline_mean = float(torch.cat(baseline_densities).mean()) if baseline_densities else None
    failures = []
    if max_density is not None and mean_density > max_density:
        failures.append(f"mean density {mean_density:.4f} > max density {max_density:.4f}")
    if baseline_mean is not None and mean_density > baseline_mean + density_tolerance:
        failures.append(
            f"mean density {mean_density:.4f} > baseline {baseline_mean:.4f} + {density_tolerance}"
        )
    report = CheckReport(
        heads=rows,
        mean_density=mean_density,
        baseline_mean_density=baseline_mean,
        min_recall=min_recall if min_recall is not None else config_recall,
        statistic=statistic,
        samples_per_bucket=samples_per_bucket,
        config_failures=failures,
        notes=notes,
        bucket_recall={b: bucket_min_recall(b) for b in range(config.schedule.num_buckets)},
    )
    if kernel:
        report.kernel = check_kernel(config, layers=kernel_layers, precision=kernel_precision)
    return report


# Relative error allowed between the kernel and its reference (the fp32 one, or the 8-bit
# path's exact emulation for an 8-bit kernel), by input dtype.
KERNEL_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2}


def check_kernel(
    config: CompactConfig,
    *,
    layers: int | None = None,
    dtype: torch.dtype = torch.float16,
    precision: str | None = None,
) -> list[KernelCheck]:
    """Compare the Triton kernel with the reference on the config's block masks.

    On CUDA every (bucket, layer) runs; on CPU the Triton interpreter runs the first `layers`
    layers of each bucket (default 1: the interpreter costs milliseconds per block pair).
    `precision` is the kernel's arithmetic (None: the config's). A bf16 kernel is gated against
    the fp32 reference; an 8-bit one against the 8-bit emulation on the same inputs (backend
    "reference" at the same precision: the kernel's own quantization, exactly), since its distance
    to fp32 is the method's (`fp32_relative_error`, reported, not gated).
    """
    import os

    from compact_search.runtime.attention import (
        EIGHT_BIT_TWINS,
        choose_kernel,
        kernel_precision,
        sparse_attention,
    )
    from compact_search.runtime.kernels.reference import masked_reference

    precision = check_precision(config.precision if precision is None else precision, "--precision")

    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserInputError(
            "the kernel check needs a CUDA GPU or TRITON_INTERPRET=1 (set before triton loads)"
        )
    device = torch.device("cuda" if cuda else "cpu")
    if layers is None:
        layers = config.model.num_layers if cuda else 1
    layout = config.layout()
    heads, d = config.model.num_heads, config.model.head_dim
    lengths = layout.key_block_lengths(device)
    gen = torch.Generator(device=device).manual_seed(0)
    results = []
    for bucket in range(config.schedule.num_buckets):
        for layer in range(min(layers, config.model.num_layers)):
            masks = config.block_masks(bucket, layer).to(device)
            q, k, v = (
                torch.randn(1, heads, layout.padded_len, d, generator=gen, device=device).to(dtype)
                for _ in range(3)
            )
            got = sparse_attention(
                q,
                k,
                v,
                masks,
                block_size=layout.block_size,
                scale=d**-0.5,
                backend="triton",
                key_block_lengths=lengths,
                precision=precision,
            )
            # What that call ran (the choice sparse_attention makes, fallbacks included).
            kernel, _fallback = choose_kernel(q, k, v, layout.block_size, "triton", precision)
            fp32 = masked_reference(
                q.float(),
                k.float(),
                v.float(),
                masks,
                block_size=layout.block_size,
                key_block_lengths=lengths,
            )
            reference, expected = "fp32", fp32
            ran_at = kernel_precision(kernel)
            if ran_at != "bf16":
                reference = EIGHT_BIT_TWINS[ran_at]["reference"]
                expected = sparse_attention(
                    q,
                    k,
                    v,
                    masks,
                    block_size=layout.block_size,
                    scale=d**-0.5,
                    backend="reference",
                    key_block_lengths=lengths,
                    precision=ran_at,
                ).float()
            # padded query slots are never read back: compare real tokens only
            real = (layout.slot_to_token >= 0).to(device)
            diff = (got.float() - expected)[:, :, real]
            max_abs = float(diff.abs().max()) if diff.numel() else 0.0
            rel = _relative(got.float()[:, :, real], expected[:, :, real])
            ok = math.isfinite(rel) and rel <= KERNEL_TOLERANCE[dtype]
            fp32_rel = _relative(got.float()[:, :, real], fp32[:, :, real])
            results.append(
                KernelCheck(bucket, layer, max_abs, rel, ok, precision, kernel, reference, fp32_rel)
            )
    return results


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||."""
    return float((got - expected).norm() / expected.norm().clamp_min(1e-12))


def junit_xml(report: CheckReport, name: str = "compact-search check") -> str:
    """JUnit XML: one test case per (bucket, layer, head), plus config-level and kernel cases."""
    import xml.etree.ElementTree as ET

    suite = ET.Element("testsuite", name=name)
    cases = 0
    failures = 0

    def case(case_name: str, classname: str, failure: str | None) -> None:
        nonlocal cases, failures
        element = ET.SubElement(suite, "testcase", name=case_name, classname=classname)
        cases += 1
        if failure:
            ET.SubElement(element, "failure", message=failure).text = failure
            failures += 1

    # The first expert's cases keep their names; another expert's carry its name in front.
    for name, expert in {"": report, **report.experts}.items():
        where = f"{name}." if name else ""
        for h in expert.heads:
            case(
                f"{where}bucket{h.bucket}.layer{h.layer}.head{h.head}",
                "recall",
                None if h.passed else h.reason,
            )
        case(f"{where}mean_density", "density", "; ".join(expert.config_failures) or None)
        for k in expert.kernel:
            case(
                f"{where}bucket{k.bucket}.layer{k.layer}",
                "kernel",
                None if k.passed else f"{k.precision} relative error {k.relative_error:.3g}",
            )
    suite.set("tests", str(cases))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)
