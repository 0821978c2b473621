"""The parts of moving models between hosts that need no server: the cache's atomic downloads, its per-host lock
and its least-recently-used eviction, and the checkpoint uploader's queue of one (tests/test_multihost.py runs
the whole thing against a real MLflow server)."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from app.config import Settings
from app.service import model_store
from app.tracking import models_travel_through_mlflow
from app.tracking.mlflow_tracker import LatestOnlyUploader


def make_run_folder(folder: Path, size: int, last_used: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("{}")
    (folder / "weights").write_bytes(b"w" * size)
    os.utime(folder, (last_used, last_used))
    return folder


def test_models_travel_through_mlflow_only_with_an_mlflow_tracker_and_a_server_uri():
    settings = Settings()
    assert models_travel_through_mlflow(settings.model_copy(update={"mlflow_tracking_uri": "http://mlflow:5000"}))
    assert not models_travel_through_mlflow(settings.model_copy(update={"mlflow_tracking_uri": ""}))
    assert not models_travel_through_mlflow(settings.model_copy(update={"mlflow_tracking_uri": "sqlite:///x.db"}))
    off = settings.model_copy(update={"mlflow_tracking_uri": "http://mlflow:5000", "tracker": "none"})
    assert not models_travel_through_mlflow(off)


def test_without_a_tracking_server_nothing_is_fetched(tmp_path):
    settings = Settings(artifacts_dir=tmp_path, mlflow_tracking_uri="")
    assert model_store.fetched_run_folder("some-job", settings) is None
    assert model_store.fetch_checkpoint("some-job", tmp_path / "some-job", settings) is False
    assert not (tmp_path / ".model-cache").exists()


def test_a_download_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "cache" / "job-1"

    def broken(folder: Path) -> None:
        (folder / "metrics.json").write_text("{}")
        raise ConnectionError("server went away")

    with pytest.raises(ConnectionError):
        model_store.download_into(target, broken)
    assert not target.exists() and list((tmp_path / "cache").iterdir()) == []  # no partial folder left

    model_store.download_into(target, lambda folder: (folder / "metrics.json").write_text("{}"))
    assert (target / "metrics.json").is_file() and [p.name for p in (tmp_path / "cache").iterdir()] == ["job-1"]


def test_the_download_lock_is_held_per_host_while_one_downloads(tmp_path):
    lock_file = tmp_path / model_store.LOCK_FILE
    with model_store.download_lock(tmp_path), open(lock_file) as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what another process of this host meets
    with open(lock_file) as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again


def test_the_cache_evicts_the_least_recently_used_run_folders_above_its_cap_but_never_the_new_one(tmp_path):
    oldest = make_run_folder(tmp_path / "oldest", 400, 1_000)
    older = make_run_folder(tmp_path / "older", 400, 2_000)
    recent = make_run_folder(tmp_path / "recent", 400, 3_000)
    new = make_run_folder(tmp_path / "new", 400, 500)  # just downloaded, but with an old mtime of its files
    model_store.evict_least_recently_used(tmp_path, max_bytes=900, keep=new)
    assert not oldest.exists() and not older.exists()
    assert recent.exists() and new.exists()


def test_a_used_folder_counts_as_recent(tmp_path):
    folder = make_run_folder(tmp_path / "job", 1, 1_000)
    model_store.mark_used(folder)
    assert folder.stat().st_mtime > 1_000


def test_the_checkpoint_uploader_keeps_only_the_newest_waiting_file():
    started, release = threading.Event(), threading.Event()
    uploaded = []

    def upload(path: Path) -> None:
        uploaded.append(path)
        started.set()
        release.wait()

    uploader = LatestOnlyUploader(upload)
    uploader.submit(Path("step-10"))
    started.wait()  # the first upload is under way and blocks
    uploader.submit(Path("step-20"))
    uploader.submit(Path("step-30"))  # replaces step-20, which never started
    release.set()
    uploader.close()  # waits for the pending upload: what the end of training does
    assert uploaded == [Path("step-10"), Path("step-30")] and uploader.uploaded == 2
