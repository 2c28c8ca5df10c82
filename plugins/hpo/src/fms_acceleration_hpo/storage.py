"""Where a study lives, and the one lock its workers take to create it and to start trials.

- `sqlite:///study.db`: one host; optuna's RDBStorage with a connect timeout, so that workers
  wait for each other's writes instead of failing with "database is locked".
- `journal://study.log`: one host, many processes: JournalStorage over JournalFileBackend.
- `postgresql://user@host/db` (or any SQLAlchemy URL): several hosts; RDBStorage with optuna's
  heartbeat, so trials of a host that died are failed after the grace period.

The study lock is a file lock beside a sqlite or journal file, and a PostgreSQL advisory lock
on a server; other servers get no lock (a warning says so: the trial total may then overshoot
by up to one trial per extra worker).
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna

from .errors import SearchError

SQLITE_TIMEOUT_S = 120.0
HEARTBEAT_INTERVAL_S = 60
HEARTBEAT_GRACE_S = 300
_SERVER_SCHEMES = ("postgresql", "mysql", "oracle", "mssql")


@dataclass(frozen=True)
class StudyStorage:
    """A parsed `--storage` URL."""

    url: str
    kind: str  # "sqlite", "journal" or "server"
    path: Path | None  # the file of a sqlite or journal storage

    @staticmethod
    def parse(url: str) -> StudyStorage:
        """Accept sqlite:///FILE, journal://FILE and SQLAlchemy server URLs."""
        if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
            return StudyStorage(url, "sqlite", Path(url[len("sqlite:///") :]))
        if url.startswith("journal://") and len(url) > len("journal://"):
            return StudyStorage(url, "journal", Path(url[len("journal://") :]))
        scheme = url.split("://", 1)[0].split("+", 1)[0]
        if "://" in url and scheme in _SERVER_SCHEMES:
            return StudyStorage(url, "server", None)
        raise SearchError(
            f"--storage: {url!r} is not a storage URL; use sqlite:///FILE (one host), "
            "journal://FILE (one host, many processes) or postgresql://USER@HOST/DB (several "
            "hosts)"
        )

    @property
    def display(self) -> str:
        """The URL without a password."""
        if self.kind != "server" or "@" not in self.url:
            return self.url
        scheme, rest = self.url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"

    def open(self) -> optuna.storages.BaseStorage:
        """The optuna storage object (creates the file or the tables if needed)."""
        if self.kind == "journal":
            from optuna.storages.journal import JournalFileBackend

            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(self.path)))
        if self.kind == "sqlite":
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.RDBStorage(
                self.url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                self.url,
                engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=HEARTBEAT_INTERVAL_S,
                grace_period=HEARTBEAT_GRACE_S,
            )

    @contextlib.contextmanager
    def lock(self, study_name: str) -> Iterator[None]:
        """Hold the study lock (shared by every worker of this study) for the block."""
        if self.path is not None:
            from filelock import FileLock

            self.path.parent.mkdir(parents=True, exist_ok=True)
            # not `<file>.lock`: that name is the journal backend's own lock
            with FileLock(f"{self.path}.study-lock"):
                yield
            return
        if self.url.startswith("postgresql"):
            with _advisory_lock(self.url, study_name):
                yield
            return
        warnings.warn(
            f"--storage {self.display}: no lock across workers for this database; with several "
            "workers the trial total may overshoot by up to one trial per extra worker",
            stacklevel=3,
        )
        yield

    def backup(self) -> Path | None:
        """Copy a sqlite study file (live-safe, through sqlite3's backup API) beside it, as
        `<name>.backup-<UTC time>.db`; None when there is nothing to back up."""
        if self.kind != "sqlite" or self.path is None or not self.path.is_file():
            return None
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.path.with_name(f"{self.path.stem}.backup-{stamp}{self.path.suffix or '.db'}")
        source = sqlite3.connect(self.path, timeout=SQLITE_TIMEOUT_S)
        try:
            copy = sqlite3.connect(target)
            try:
                source.backup(copy)
            finally:
                copy.close()
        finally:
            source.close()
        return target

    def sampler_root(self, study_name: str, output_dir: str | Path) -> Path:
        """Folder of the sampler checkpoints: beside the study file, else in the output dir."""
        base = self.path.parent if self.path is not None else Path(output_dir)
        return base / f"{study_name}.samplers"


@contextlib.contextmanager
def _advisory_lock(url: str, study_name: str) -> Iterator[None]:
    """A PostgreSQL session advisory lock keyed by the study name."""
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            connection.commit()
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()
    finally:
        engine.dispose()


def create_or_load_study(
    storage: StudyStorage,
    study_name: str,
    direction: str,
    sampler: Any,
    pruner: Any,
) -> optuna.Study:
    """Create the study, or load it when it exists (call under the study lock)."""
    study = optuna.create_study(
        storage=storage.open(),
        study_name=study_name,
        direction=direction,
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    if study.direction.name.lower() != direction:
        raise SearchError(
            f"study '{study_name}' in {storage.display} was created to "
            f"{study.direction.name.lower()} its objective; the configuration asks to "
            f"{direction} (plugins.training.hpo.direction): use another --study-name"
        )
    return study
