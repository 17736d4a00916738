"""Runtime decisions (runtime.py): the torchrun environment, the device, the per-slide seeds."""

import json
import os

import pytest
import torch

from conftest import cli
from gigassl_fast import runtime
from gigassl_fast.errors import GigasslError


def test_launch_reads_torchrun_environment(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert runtime.launch() == runtime.Launch(1, 0, 0)
    monkeypatch.setenv("RANK", "3")  # left by a scheduler, without torchrun: not a launch
    assert runtime.launch() == runtime.Launch(1, 0, 0)
    assert runtime.launch().per_rank("encode_summary.json") == "encode_summary.json"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    here = runtime.launch()
    assert here.distributed and (here.world, here.rank, here.local_rank) == (4, 3, 1)
    assert here.per_rank("encode_summary.shard0of2.json") == "encode_summary.shard0of2.rank3.json"
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(GigasslError, match="out of range"):
        runtime.launch()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(GigasslError, match="RANK='one' is not a whole number"):
        runtime.launch()


def test_device_names_are_checked_here(monkeypatch):
    for bad in ("gpu", "cuda:x", "cuda1", ""):
        with pytest.raises(GigasslError, match="--device must be auto, cpu, cuda or cuda:N"):
            runtime.check_device(bad)
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:0"):
            with pytest.raises(GigasslError, match="no CUDA device is available here; use --device cpu"):
                runtime.resolve_device(name)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert runtime.resolve_device("auto") == torch.device("cpu")
    assert runtime.resolve_device("cpu") == torch.device("cpu")


def test_seeds_depend_on_the_slide_not_on_its_place():
    assert runtime.slide_seed(0, "a") == runtime.slide_seed(0, "a") != runtime.slide_seed(0, "b")
    assert runtime.slide_seed(1, "a") != runtime.slide_seed(0, "a")
    assert 0 <= runtime.slide_seed(2**62, "x" * 300) < 2**63
    assert runtime.rank_seed(5, 0) != runtime.rank_seed(5, 1)


def test_encode_under_torchrun_takes_its_share(small_cohort, tmp_path):
    """Rank 1 of 2 encodes every second slide, writes a summary of its own, and a slide's features are
    those of a run without torchrun (seeds follow the slide, not the rank)."""
    args = ["encode", small_cohort, "--naug", "1", "--nt", "4", "--mpp", "4", "--tile-size", "64", "--batch-size", "32"]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0"}
    ranked = cli(*args, "--out", tmp_path / "rank", env=env)
    assert ranked.returncode == 0, ranked.stderr
    assert sorted(os.listdir(tmp_path / "rank" / "features")) == ["s1.h5"]
    with open(tmp_path / "rank" / "encode_summary.rank1.json", encoding="utf-8") as fh:
        assert [s["slide_id"] for s in json.load(fh)["slides"]] == ["s1"]
    alone = cli(*args[:1], small_cohort / "s1.tif", *args[2:], "--out", tmp_path / "alone")
    assert alone.returncode == 0, alone.stderr
    from gigassl_fast.features import FeatureFile

    with FeatureFile(tmp_path / "rank" / "features" / "s1.h5") as a, FeatureFile(tmp_path / "alone" / "features" / "s1.h5") as b:
        assert (a.aug_indices() == b.aug_indices()).all() and (a.aug_features() == b.aug_features()).all()
