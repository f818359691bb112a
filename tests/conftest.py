"""Shared fixtures: the real nanochat d4 checkpoint (written by nanochat's own base_train) and its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-d4"
BASE_DIR = FIXTURE / "base_dir"


@pytest.fixture(scope="session")
def reference():
    return np.load(FIXTURE / "reference.npz")


@pytest.fixture(scope="session")
def tok_info(reference):
    return json.loads(str(reference["tok.info_json"]))


@pytest.fixture(scope="session")
def d4():
    """(model, tokenizer, meta) of the fixture checkpoint, fp32 on CPU. Shared: tests must not modify it."""
    from nanosae import load_model

    return load_model(BASE_DIR)
