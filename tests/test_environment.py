"""The facts every benchmark row carries and the one CSV append they go through."""

import csv
import importlib.metadata

import compact_search
from compact_search.environment import append_rows, environment, git_sha


def _read(path):
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def test_append_keeps_old_rows_when_a_column_is_added(tmp_path):
    path = tmp_path / "results" / "bench.csv"
    append_rows(path, [{"shape": "a", "p50_ms": 1.5}])
    append_rows(path, [{"shape": "b", "p50_ms": 2.0, "gpu": "card, with a comma"}])
    append_rows(path, [{"gpu": "other", "shape": "c"}])
    header, rows = _read(path)
    assert header == ["shape", "p50_ms", "gpu"]
    assert rows == [
        {"shape": "a", "p50_ms": "1.5", "gpu": ""},
        {"shape": "b", "p50_ms": "2.0", "gpu": "card, with a comma"},
        {"shape": "c", "p50_ms": "", "gpu": "other"},
    ]


def test_environment_names_device_versions_sha_and_date(monkeypatch):
    monkeypatch.setenv("COMPACT_SEARCH_GIT_SHA", "abc1234")
    facts = environment()
    assert git_sha() == "abc1234" and facts["git_sha"] == "abc1234"
    assert set(facts) == {"device", "torch", "triton", "git_sha", "date"}
    assert len(facts["date"]) == 10 and facts["date"][4] == "-"


def test_one_version_string():
    """pyproject.toml reads its version from compact_search.__version__ (setuptools dynamic)."""
    assert importlib.metadata.version("compact-search") == compact_search.__version__
