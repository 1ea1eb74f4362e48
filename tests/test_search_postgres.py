"""One study shared by several `optimize` processes on a real PostgreSQL server.

The server is a throw-away one: `initdb` into a temporary folder, listening on a Unix socket in
that folder only, stopped and deleted at the end. As root (CI runs as root) the server runs as
the `postgres` user (or `nobody`), which initdb insists on. The tests skip only where no
PostgreSQL binaries are installed.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest

import cli
from compact_search.errors import UserInputError
from compact_search.search import SearchConfig, join_study, optimize_profile
from compact_search.search.storage import TARGET_ATTR, resolve_storage
from compact_search.search.synthetic import SyntheticProfile

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "compact-secret"
COMPLETE = optuna.trial.TrialState.COMPLETE


def postgres_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: Debian's versioned one, else the PATH's."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


def as_server_user(command: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as an unprivileged user then."""
    if os.geteuid() != 0:
        return command
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return ["runuser", "-u", name, "--", *command]
    pytest.fail("running as root with neither a 'postgres' nor a 'nobody' user for the server")


@pytest.fixture(scope="module")
def postgres():
    """A running server; yields the URL of its `postgres` database (user `compact`)."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    root = Path(tempfile.mkdtemp(prefix="cs-pg-"))  # short: a socket path has ~100 bytes
    password_file = root / "password"
    password_file.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        user = as_server_user(["true"])[2]
        uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
        for path in (root, password_file):
            os.chown(path, uid, gid)
    data = root / "data"
    run = {"check": True, "capture_output": True, "text": True}
    subprocess.run(
        as_server_user(
            [str(bindir / "initdb"), "-D", str(data), "-U", "compact", "--auth=scram-sha-256",
             f"--pwfile={password_file}", "-E", "UTF8", "--no-sync"]
        ),
        **run,
    )  # fmt: skip
    options = f"-k {root} -c listen_addresses='' -c fsync=off -c synchronous_commit=off"
    subprocess.run(
        as_server_user(
            [str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"),
             "-w", "start"]
        ),
        **run,
    )  # fmt: skip
    try:
        yield f"postgresql://compact:{PASSWORD}@/postgres?host={root}"
    finally:
        subprocess.run(
            as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


PROFILE = dict(
    grid=(16, 24, 32),
    tiles=[(2, 6, 8)],
    num_layers=2,
    num_heads=3,
    num_steps=20,
    steps=(10, 14, 18),
    diffuse_until=0.0,
)
# One tile, one bucket, no warm-up: the warm start (the finest frame groups, trial 0 of every
# run) is this problem's cheapest choice, which makes the parallel result comparable below.
CONFIG = dict(num_buckets=1, dense_steps=0, workers=1, max_options=200)

WORKER = textwrap.dedent(
    """
    import os, sys, time
    import compact_search.search.study as study
    from compact_search.search import SearchConfig, join_study, optimize_profile
    from compact_search.search.synthetic import SyntheticProfile

    role, storage, run_dir, trials, seed, pause, go = sys.argv[1:8]
    while go != "-" and not os.path.exists(go):  # hold back until the test says go
        time.sleep(0.02)
    profile = SyntheticProfile(**{profile})
    config = SearchConfig(n_trials=int(trials), seed=int(seed), **{config})
    if float(pause):  # slow every trial down, so that a test can kill this worker inside one
        make = study.make_objective

        def slow(*args):
            objective = make(*args)
            return lambda trial: (objective(trial), time.sleep(float(pause)))[0]

        study.make_objective = slow
    if role == "join":
        joined = join_study(profile, config, storage, heartbeat=1)
        print("ran", joined.trials_run)
    else:
        optimize_profile(profile, run_dir, config, storage=storage, heartbeat=1)
    """
).format(profile=repr(PROFILE), config=repr(CONFIG))


def start_worker(tmp_path, role, storage, trials, seed, pause=0.0, go=None) -> subprocess.Popen:
    """A worker process; with `go` (a path) it imports everything, then waits for that file."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [role, storage, str(tmp_path / f"run-{role}"), str(trials), str(seed), str(pause),
            str(go) if go is not None else "-"]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE, text=True
    )


def create_study(storage: str, trials: int, seed: int) -> str:
    """The study both workers meet in, made before either starts so that both start at once."""
    config = SearchConfig(n_trials=trials, seed=seed, **CONFIG)
    name = config.study_name(SyntheticProfile(**PROFILE).fingerprint)
    study = optuna.create_study(
        study_name=name, storage=resolve_storage(storage, Path(".")).storage, load_if_exists=True
    )
    study.set_user_attr(TARGET_ATTR, trials)
    return name


def trials_of(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(
        study_name=name, storage=resolve_storage(storage, Path(".")).storage
    ).get_trials()


@pytest.fixture(scope="module")
def shared_run(postgres, tmp_path_factory):
    """A study of 12 trials run by two workers at once: one that writes the result, one that
    joins. -> (storage URL, study name, result)."""
    tmp_path = tmp_path_factory.mktemp("shared")
    name = create_study(postgres, trials=12, seed=3)
    # a third of a second a trial: both workers are sure to be up before the study is done
    workers = [
        start_worker(tmp_path, role, postgres, 12, 3, pause=0.3) for role in ("start", "join")
    ]
    for worker in workers:
        assert worker.wait(timeout=300) == 0
    from compact_search.search import load_search_result

    return postgres, name, load_search_result(tmp_path / "run-start")


def test_two_workers_finish_the_study_without_losing_or_repeating_a_trial(shared_run):
    storage, name, result = shared_run
    trials = trials_of(storage, name)
    complete = [t for t in trials if t.state == COMPLETE]
    assert len(complete) == 12 and result.study["trials_completed"] == 12
    # Every trial number once; nothing but finished trials and (rare) surplus ones.
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert all(t.state == COMPLETE or t.user_attrs.get("surplus") for t in trials)
    assert len({t.user_attrs["worker"] for t in complete}) == 2, "both workers ran trials"
    # The result uses every finished trial, whichever worker ran it.
    best = min(complete, key=lambda t: t.value)
    assert result.study["best_trial"] == best.number
    assert result.study["best_value"] == pytest.approx(best.value)
    assert "compact-secret" not in json.dumps(result.study)


def test_parallel_result_is_at_least_as_cheap_as_one_process(shared_run, tmp_path):
    """Parallel TPE is not deterministic: each worker samples from the trials finished so far,
    which depends on timing, so the two runs try different parameters after the warm start.
    What holds: the same parameters give the same value on any worker, and since the warm start
    (trial 0 of both runs) is this problem's best choice, the parallel result is at least as
    cheap as the seeded single-process one, and equal to it when its best trial has the same
    parameters (ties between parameters of equal cost can go either way)."""
    storage, name, parallel = shared_run
    single = optimize_profile(
        SyntheticProfile(**PROFILE), tmp_path, SearchConfig(n_trials=12, seed=3, **CONFIG)
    )
    assert single.study["best_trial"] == 0  # the premise above, deterministic (seeded)
    assert parallel.objective <= single.objective + 1e-12
    one = optuna.load_study(
        study_name=single.study["name"], storage=f"sqlite:///{tmp_path / 'study.db'}"
    )
    values = {json.dumps(t.params, sort_keys=True): t.value for t in one.trials}
    shared = [t for t in trials_of(storage, name) if t.state == COMPLETE]
    common = [t for t in shared if json.dumps(t.params, sort_keys=True) in values]
    assert common, "the runs share no parameters (the warm start at least)"
    for trial in common:
        assert trial.value == values[json.dumps(trial.params, sort_keys=True)]
    parallel_best = next(t for t in shared if t.number == parallel.study["best_trial"])
    if parallel_best.params == one.trials[single.study["best_trial"]].params:
        assert [h.to_json() for h in parallel.heads] == [h.to_json() for h in single.heads]


def test_a_killed_worker_loses_no_finished_trial_and_the_other_completes(postgres, tmp_path):
    name = create_study(postgres, trials=10, seed=5)
    go = tmp_path / "go"
    joiner = start_worker(tmp_path, "join", postgres, 10, 5, pause=1.0)
    # The starter imports meanwhile but runs no trial before the joiner is inside its second
    # one: however loaded the machine, the starter cannot finish the study first.
    starter = start_worker(tmp_path, "start", postgres, 10, 5, pause=0.05, go=go)
    victim = f"{socket.gethostname()}:{joiner.pid}"
    study = optuna.load_study(study_name=name, storage=resolve_storage(postgres, tmp_path).storage)

    def victims(state):
        return [t for t in study.get_trials() if t.user_attrs.get("worker") == victim and
                t.state == state]  # fmt: skip

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and joiner.poll() is None:
        running = victims(optuna.trial.TrialState.RUNNING)
        # a trial started under half a second ago still has over half a second of its pause
        fresh = [t for t in running if datetime.now() - t.datetime_start < timedelta(seconds=0.5)]
        if victims(COMPLETE) and fresh:
            joiner.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    go.touch()
    joiner.wait()
    assert joiner.returncode == -signal.SIGKILL, "the joining worker ended before the kill"
    killed = victims(optuna.trial.TrialState.RUNNING)
    assert len(killed) == 1, "the joining worker was not killed inside a trial"
    finished_before = {t.number for t in study.get_trials() if t.state == COMPLETE}
    assert starter.wait(timeout=180) == 0
    trials = study.get_trials()
    by_number = {t.number: t for t in trials}
    complete = {t.number for t in trials if t.state == COMPLETE}
    assert finished_before <= complete  # no finished trial lost
    assert len(complete) == 10
    assert by_number[killed[0].number].state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed[0].number]
    assert retried and retried[0].state == COMPLETE
    # the retry keeps every parameter the dead worker had drawn (it may die inside suggest)
    assert by_number[killed[0].number].params.items() <= retried[0].params.items()


@pytest.mark.parametrize("problem", ["password", "unreachable"])
def test_a_bad_server_is_one_line_and_exit_2(postgres, tmp_path, capsys, problem):
    if problem == "password":
        url = postgres.replace(PASSWORD, "wrong")
    else:
        url = f"postgresql://compact:{PASSWORD}@/postgres?host={tmp_path}"  # no server there
    with pytest.raises(SystemExit) as info:
        cli.main(["optimize", str(tmp_path / "profile"), "--out", str(tmp_path / "run"),
                  "--storage", url])  # fmt: skip
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot connect" in err, err
    assert PASSWORD not in err and "wrong" not in err
    if problem == "password":
        assert "password authentication failed" in err


def test_join_needs_an_existing_study_and_a_server(postgres, tmp_path, capsys):
    other_options = SearchConfig(seed=99, **CONFIG)
    with pytest.raises(UserInputError, match="holds no study"):
        join_study(SyntheticProfile(**PROFILE), other_options, postgres)
    with pytest.raises(UserInputError, match="needs a database server"):
        join_study(SyntheticProfile(**PROFILE), other_options, f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(SystemExit) as info:
        cli.main(["optimize", str(tmp_path / "profile"), "--join"])
    assert info.value.code == 2 and "--join needs --storage" in capsys.readouterr().err


def test_optuna_dashboard_opens_the_study(shared_run, tmp_path):
    """`optuna-dashboard URL` (docs/search.md) lists the shared study."""
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    if dashboard is None:
        pytest.skip("optuna-dashboard is not installed")
    storage, name, _ = shared_run
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = storage.replace("postgresql://", "postgresql+psycopg://")
    server = subprocess.Popen(
        [dashboard, url, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as reply:
                    studies = json.load(reply)["study_summaries"]
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.3)
        assert name in [s["study_name"] for s in studies]
    finally:
        server.terminate()
        server.wait(timeout=10)
