"""Shared fixtures: the project root and the small settings every pipeline test runs with."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A few seconds per stage on 2 cores: MNIST subsets, one short epoch, few timing rounds, one process.
SMALL = ["data.train_subset=2000", "data.test_subset=300", "baseline.epochs=1", "finetune.epochs=0.3",
         "finetune.max_drop=8", "quantize.calib_size=64", "quantize.max_drop=1.5", "profile.iters=5",
         "profile.warmup=2", "profile.batches=[1, 8]", "profile.rounds=3", "profile.processes=1",
         "profile.block_ms=5"]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT
