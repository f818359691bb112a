"""Data-parallel training: `torchrun --nproc_per_node=2 -m nanosae train` (gloo, CPU) runs the same steps on the same
global batches as one process: over this short run the weights agree up to float rounding (the ranks reduce sums in
another order, so over long runs an occasional top-k choice can flip and the runs part)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanosae.activations import collect
from nanosae.sae import load_sae


def one_and_two_ranks(tmp_path, args: list[str], names: list[str], atol: float = 1e-5) -> str:
    """Run `nanosae *args` in one process (into tmp_path/one) and on two gloo ranks (tmp_path/two), check that the
    SAEs `names` agree (up to atol x each tensor's largest entry), and return the two-rank run's stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "nanosae", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanosae", *args,
         "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    for name in names:
        a, b = load_sae(tmp_path / "one" / name), load_sae(tmp_path / "two" / name)
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(va, vb, rtol=1e-4, atol=atol * va.abs().max().item()), (name, k)
    return two.stdout


def test_two_gloo_ranks_train_the_same_weights_as_one_process(tmp_path, d4):
    model, tok, _ = d4
    collect(model, tok, tmp_path / "cache", "blocks.1.resid_post", 8192, seq_len=64, progress=False)
    args = ["train", "--activations", str(tmp_path / "cache"), "--arch", "topk,standard,batchtopk", "--k", "8",
            "--expansion", "4", "--sparsity-coeff", "0.3", "--no-resample", "--tokens", "8192", "--batch-size", "512",
            "--dead-tokens", "512", "--log-every", "4"]  # fmt: skip
    out = one_and_two_ranks(tmp_path, args, ["topk_k8_x4", "standard_l0.3_x4", "batchtopk_k8_x4"])
    assert "trained 3 SAE(s) on 8,192 tokens" in out  # printed once, by rank 0

    def log(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    la, lb = log("one"), log("two")
    assert len(la) == len(lb) == 12  # 16 steps, a line per 4 steps and SAE, written once
    assert any(x["aux"] > 0 for x in la if x["sae"] == "topk_k8_x4")  # AuxK ran (dead latents), on both
    for x, y in zip(la, lb):
        assert x["sae"] == y["sae"] and abs(x["fvu"] - y["fvu"]) < 1e-4 and abs(x["aux"] - y["aux"]) < 1e-4


@pytest.mark.parametrize("spread", [[], ["--distribute-sites"]])
def test_two_gloo_ranks_train_the_transcoders_one_process_trains(tmp_path, spread):
    """Transcoders at two blocks, streamed from the model: each rank forwards half the rows of a fill and either
    both ranks get the same global batches of [mlp_in | mlp_out] rows (data-parallel: BatchTopK's global selection
    and the skip's dense gradient reduced across ranks), or with --distribute-sites each rank gets whole batches of
    its own block's rows (the all-to-all of [input | target] columns); either way the transcoders are one
    process's."""
    model = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"
    args = ["train", "--model", str(model), "--layers", "1,2", "--site", "mlp_in", "--seq-len", "64", "--arch",
            "skip_transcoder", "--k", "8", "--expansion", "2", "--tokens", "4096", "--batch-size", "512",
            "--log-every", "4", *spread]  # fmt: skip
    # W_skip starts at 0: after 8 Adam steps its entries are a few LR steps, where the ranks' other reduction
    # order shows more (seen: 2.7e-8 off in entries up to 1.5e-3)
    one_and_two_ranks(tmp_path, args, ["blocks.1.mlp_in", "blocks.2.mlp_in"], atol=1e-4)
    assert load_sae(tmp_path / "two" / "blocks.2.mlp_in").cfg.hook_name_out == "blocks.2.mlp_out"
