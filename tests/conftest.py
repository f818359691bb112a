"""Shared fixtures: the real nanochat d4 checkpoint (written by nanochat's own base_train) and its outputs."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

# Tests use tiny shapes, where a second thread only adds synchronisation (5-7x slower on a busy 2-core box);
# subprocess tests (torchrun, CLI) inherit it through the environment.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-d4"
BASE_DIR = FIXTURE / "base_dir"


# what nanosae reads from the environment: torchrun's variables (a test launched inside a distributed job would
# wait for ranks that never come), API keys, the cache home (never the user's warm cache), how run.sh was called
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NANOSAE_HOME",
              "NANOSAE_COMMAND", "OPENAI_API_KEY", "NEURONPEDIA_API_KEY")  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def _environment_of_its_own(tmp_path_factory):
    """Every test sees the same environment, whatever shell started the suite."""
    with pytest.MonkeyPatch.context() as mp:
        for name in LAUNCH_ENV:
            mp.delenv(name, raising=False)
        mp.setenv("NANOSAE_HOME", str(tmp_path_factory.mktemp("nanosae_home")))
        yield


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    """Every test starts from the same global RNG state, whatever ran before it (order-independent draws)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


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


@pytest.fixture(scope="session")
def hand_sae(d4, tmp_path_factory):
    """(sae, dir): a hand-built TopK SAE (d_sae 256, k 16) on d4's blocks.2.resid_post with random unit-norm
    decoder rows and W_enc = W_dec.T, saved as an SAE folder. Shared: tests must not modify it."""
    import torch

    from nanosae.sae import SAE, SAEConfig

    cfg = SAEConfig(architecture="topk", d_in=128, d_sae=256, k=16, hook_name="blocks.2.resid_post")
    cfg.model_name = d4[0].info.name
    sae = SAE(cfg)
    W = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    path = tmp_path_factory.mktemp("hand_sae")
    sae.save(path)
    return sae, path


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium driven by playwright (no browser download: CI installs Debian chromium). A missing chromium
    fails the tests that need it, never skips them: CI installs it."""
    from playwright.sync_api import sync_playwright

    if not Path("/usr/bin/chromium").is_file():
        pytest.fail("no /usr/bin/chromium: install Debian's chromium (apt-get install chromium) to run browser tests")

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    args += ["--no-first-run", "--disable-sync"]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=args)
        yield b
        b.close()
