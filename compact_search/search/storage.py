"""Where a study lives, and the trial loop every worker on it runs.

Storages: sqlite in the run folder by default (one process; a killed run resumes), `journal:PATH`
(a file several processes on one host can share), or an RDB URL. A database server URL
(`postgresql://user:password@host/db`) makes the study *shared*: several `optimize` processes,
on one host or many, add trials to it. Shared studies run with Optuna heartbeats, so a worker
that dies mid-trial (SIGKILL, a lost host) leaves a trial that the others fail after the grace
period and run again with the same parameters (`RetryFailedTrialCallback`); no finished trial
is ever lost, because every trial is committed to the server when it finishes.

The trial count is the study's: workers stop when it has `target` finished trials. Before it
starts, a trial counts the live trials (finished, running or waiting) created before it; a trial
beyond the target is pruned at once (marked `surplus`) instead of run, so racing workers never
overshoot. Trial creation is serialised by the server (Optuna locks the study row), which makes
that count exact.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import optuna

from compact_search.errors import UserInputError
from compact_search.io import ensure_folder

# A live worker records a heartbeat this often (seconds); a running trial whose heartbeat is
# older than GRACE_FACTOR intervals belongs to a dead worker and is retried by the others.
DEFAULT_HEARTBEAT = 10
GRACE_FACTOR = 3
MAX_RETRIES = 3  # runs of one trial's parameters after its workers died
TARGET_ATTR = "n_trials"  # study user attribute: the trial count every worker stops at
LIVE = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.RUNNING,
    optuna.trial.TrialState.WAITING,
)


@dataclass(frozen=True)
class StudyStorage:
    """An Optuna storage and what the trial loop needs to know about it."""

    storage: str | optuna.storages.BaseStorage
    shown: str  # the URL without its password, for messages
    shared: bool  # a database server: other workers may run trials at the same time


def worker_name() -> str:
    """Who ran a trial (the `worker` user attribute): host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def hide_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _with_driver(url: str) -> str:
    """postgresql://... -> postgresql+psycopg://... when psycopg 3 is what is installed
    (SQLAlchemy's default PostgreSQL driver is psycopg2)."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    try:
        import psycopg  # noqa: F401
    except ImportError:
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            raise UserInputError(
                "a PostgreSQL storage needs the psycopg driver: pip install 'psycopg[binary]' "
                "(or the extra: pip install 'compact-search[postgres]')"
            ) from None
        return f"postgresql{sep}{rest}"
    return f"postgresql+psycopg{sep}{rest}"


def resolve_storage(
    storage: str | None, run_dir: Path, heartbeat: int = DEFAULT_HEARTBEAT
) -> StudyStorage:
    """None -> sqlite in the run directory; 'journal:PATH' -> a journal file (several processes
    on a host); sqlite:///FILE; any other RDB URL (postgresql://...) is a shared study on a
    database server, connected here so that a wrong password or an unreachable server fails at
    once, in one line."""
    if storage is None:
        ensure_folder(run_dir)
        url = f"sqlite:///{(run_dir / 'study.db').resolve()}"
        return StudyStorage(url, url, shared=False)
    if storage.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(storage.removeprefix("journal:"))
        ensure_folder(path.parent)
        return StudyStorage(JournalStorage(JournalFileBackend(str(path))), storage, shared=False)
    if "://" not in storage:
        raise UserInputError(
            f"storage {storage!r}: expected an RDB URL (sqlite:///file.db, postgresql://...) "
            "or journal:PATH"
        )
    if storage.startswith("sqlite:"):
        return StudyStorage(storage, storage, shared=False)
    if heartbeat < 1:
        raise UserInputError(f"heartbeat must be >= 1 second, got {heartbeat}")
    shown = hide_password(storage)
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    engine_kwargs = {}
    if storage.startswith(("postgresql", "postgres")):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(
                _with_driver(storage),
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat,
                grace_period=GRACE_FACTOR * heartbeat,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(MAX_RETRIES),
            )
    except UserInputError:
        raise
    except Exception as exc:  # SQLAlchemy / driver errors: bad URL, password, host, database
        raise UserInputError(f"storage {shown}: cannot connect ({_reason(exc)})") from exc
    return StudyStorage(rdb, shown, shared=True)


def _reason(exc: BaseException) -> str:
    """The database's own words, one line: 'password authentication failed for user "x"'."""
    original = getattr(exc, "orig", None) or exc
    text = " ".join(str(original).split())
    if "FATAL:" in text:
        text = text[text.rindex("FATAL:") + len("FATAL:") :].strip()
    return text.split(" (Background on this error")[0] or type(exc).__name__


def claim_or_prune(trial: optuna.Trial, target: int) -> None:
    """Prune a trial created after the study already had `target` live trials (a worker raced
    another one for the last trial): it never runs its objective."""
    earlier = [
        t for t in trial.study.get_trials(deepcopy=False, states=LIVE) if t.number < trial.number
    ]
    if len(earlier) >= target:
        trial.set_user_attr("surplus", True)
        raise optuna.TrialPruned(f"the study already has {target} trials")


def fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def run_trials(
    study: optuna.Study,
    objective,
    target: int,
    *,
    shared: bool,
    wait_for_others: bool,
    poll_seconds: float = 0.5,
    callbacks=None,
) -> list[int]:
    """Run trials until the study has `target` finished ones; -> the numbers this worker ran.

    On a shared study a worker that finds every remaining trial running elsewhere either waits
    for them (`wait_for_others`: the worker that writes the result) or stops (a joining one).
    """
    me = worker_name()
    ran: list[int] = []
    optuna_logger = logging.getLogger("optuna")
    level = optuna_logger.level

    def mine(trial: optuna.Trial) -> float:
        if shared:
            claim_or_prune(trial, target)
        trial.set_user_attr("worker", me)
        ran.append(trial.number)
        try:
            return objective(trial)
        except KeyboardInterrupt:
            # Optuna marks the trial failed, logs it with a traceback and re-raises: the trial
            # is unfinished (a rerun runs it again), so only the CLI's one line is said.
            optuna_logger.setLevel(max(optuna_logger.level, logging.ERROR))
            raise

    try:
        while True:
            if shared:
                fail_stale(study)
            trials = study.get_trials(deepcopy=False)
            states = [t.state for t in trials]
            if states.count(optuna.trial.TrialState.COMPLETE) >= target:
                return ran
            if shared:
                live = sum(s in LIVE for s in states)
                if live >= target and optuna.trial.TrialState.WAITING not in states:
                    if not wait_for_others:
                        return ran
                    time.sleep(poll_seconds)
                    continue
            study.optimize(mine, n_trials=1, callbacks=callbacks)
    finally:
        optuna_logger.setLevel(level)
