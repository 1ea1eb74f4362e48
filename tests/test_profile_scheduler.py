"""`sampling.scheduler` and `sampling.flow_shift` of a run profile: the pipeline samples with them.

The saved Wan folder samples with UniPC at flow shift 3 (as Wan2.1's checkpoints do); a profile
may name another diffusers scheduler class and shift. Profiles that set neither keep the folder's
scheduler and their fingerprints (the JSON form leaves unset options out).
"""

from __future__ import annotations

import diffusers
import pytest
import torch

from compact_search.errors import UserInputError
from compact_search.models.adapters import load_model
from compact_search.profiling.settings import RunProfile, load_run_profile
from tests.test_real_pipeline_folder import CASES, build_wan, profile_toml

WAN = next(case for case in CASES if case.name == "wan")


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan-scheduler") / "pipeline"
    build_wan(folder)
    return folder


def write_profile(tmp_path, folder, extra: str = "", name: str = "sched"):
    (tmp_path / "prompts.txt").write_text("a red fox\n")
    text = profile_toml(WAN, folder, name, "prompts.txt", 0)
    text = text.replace("[capture]", f"{extra}\n[capture]")
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_without_the_options_the_folder_scheduler_and_the_fingerprint_stay(tmp_path, wan_folder):
    profile = load_run_profile(write_profile(tmp_path, wan_folder))
    assert profile.scheduler is None and profile.flow_shift is None
    values = profile.to_json()
    assert "scheduler" not in values and "flow_shift" not in values
    assert RunProfile.from_json(values) == profile
    model = load_model(profile, torch.device("cpu"))
    scheduler = model.pipeline.scheduler
    assert type(scheduler) is diffusers.UniPCMultistepScheduler
    assert scheduler.config.flow_shift == 3.0


def test_a_named_scheduler_and_shift_are_what_the_pipeline_samples_with(tmp_path, wan_folder):
    extra = 'scheduler = "FlowMatchEulerDiscreteScheduler"\nflow_shift = 5.0'
    profile = load_run_profile(write_profile(tmp_path, wan_folder, extra))
    assert (profile.scheduler, profile.flow_shift) == ("FlowMatchEulerDiscreteScheduler", 5.0)
    assert RunProfile.from_json(profile.to_json()) == profile
    plain = load_run_profile(write_profile(tmp_path, wan_folder, name="plain"))
    assert profile.fingerprint() != plain.fingerprint()  # a resume never mixes the two
    scheduler = load_model(profile, torch.device("cpu")).pipeline.scheduler
    assert type(scheduler) is diffusers.FlowMatchEulerDiscreteScheduler
    assert scheduler.config.shift == 5.0


def test_a_shift_alone_changes_the_folder_scheduler_shift(tmp_path, wan_folder):
    profile = load_run_profile(write_profile(tmp_path, wan_folder, "flow_shift = 8"))
    scheduler = load_model(profile, torch.device("cpu")).pipeline.scheduler
    assert type(scheduler) is diffusers.UniPCMultistepScheduler
    assert scheduler.config.flow_shift == 8.0
    assert scheduler.config.use_flow_sigmas  # the rest of the folder's configuration stays


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('scheduler = "NoSuchScheduler"', "is not a diffusers scheduler class"),
        ('scheduler = "WanPipeline"', "is not a diffusers scheduler class"),
        ('scheduler = "DDIMScheduler"\nflow_shift = 2.0', "DDIMScheduler has no flow shift"),
    ],
)
def test_a_scheduler_the_loader_cannot_use_is_one_line(tmp_path, wan_folder, extra, message):
    profile = load_run_profile(write_profile(tmp_path, wan_folder, extra))
    with pytest.raises(UserInputError, match=message):
        load_model(profile, torch.device("cpu"))


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("flow_shift = 0", "sampling.flow_shift"),
        ('flow_shift = "3"', "sampling.flow_shift"),
        ("scheduler = 3", "sampling.scheduler"),
        ('scheduler = "not a name"', "sampling.scheduler"),
        ('shceduler = "UniPCMultistepScheduler"', "did you mean 'scheduler'"),
    ],
)
def test_bad_scheduler_values_name_the_field(tmp_path, wan_folder, extra, field):
    with pytest.raises(UserInputError, match=field):
        load_run_profile(write_profile(tmp_path, wan_folder, extra))
