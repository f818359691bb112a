"""`nanosae demo` end to end on the real d4 checkpoint, at a small size: every stage's files, the summary, reuse of
a finished run, and the errors a user can cause."""

import json
from pathlib import Path

import pytest

from nanosae.cli import main

BASE_DIR = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"

SMALL = ["--collect-tokens", "16k", "--tokens", "32k", "--batch-size", "1024", "--expansion", "4", "--k", "8"]
SMALL += ["--eval-tokens", "4096", "--viz-tokens", "8192"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, ["demo", "--model", str(BASE_DIR), "--out", str(out), *SMALL]


def test_demo_runs_every_stage_and_summarises(demo, capsys):
    out, argv = demo
    assert main(argv) == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["site"] == "blocks.2.resid_post" and (s["d_in"], s["d_sae"], s["k"]) == (128, 512, 8)
    assert 0 < s["l0"] <= 8 and 0 < s["explained_variance"] < 1 and 0 <= s["dead_frac"] < 1
    assert s["ce_loss_score"] > 0 and s["kl_div_score"] > 0  # better than zero ablation, even this small
    assert all(Path(p).exists() for p in s["files"].values())
    assert (out / "sae" / "cfg.json").is_file() and (out / "sae" / "sae_weights.safetensors").is_file()
    assert (out / "neuronpedia" / "saelens" / "cfg.json").is_file()
    assert (out / "dashboard" / "index.html").is_file()
    eval_metrics = json.loads((out / "sae" / "eval_core.json").read_text())["eval_result_metrics"]
    assert eval_metrics["sparsity"]["l0"] == s["l0"]
    assert set(s["seconds"]) == {"model", "collect", "train", "eval", "features", "dashboard", "export", "total"}
    for f in s["striking"]:  # what the summary names is what the statistics hold
        assert f["top_tokens"] and 0 < f["purity"] <= 1 and f["density"] > 0
    assert "explained variance" in printed and f"nanosae serve --model {BASE_DIR}" in printed


def test_demo_reuses_a_finished_run(demo, capsys):
    out, argv = demo
    first = json.loads((out / "summary.json").read_text())
    weights = (out / "sae" / "sae_weights.safetensors").read_bytes()
    assert main(argv) == 0
    assert "reusing the SAE trained before" in capsys.readouterr().out
    again = json.loads((out / "summary.json").read_text())
    assert (out / "sae" / "sae_weights.safetensors").read_bytes() == weights
    for key in ("l0", "explained_variance", "ce_loss_score", "kl_div_score", "dead_frac"):
        assert again[key] == pytest.approx(first[key], abs=1e-9)


def test_demo_refuses_to_overwrite_other_settings(demo, capsys):
    out, argv = demo
    weights = (out / "sae" / "sae_weights.safetensors").read_bytes()
    assert main([*argv, "--k", "4"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "--force" in err and "Traceback" not in err
    assert (out / "sae" / "sae_weights.safetensors").read_bytes() == weights  # nothing lost


def test_demo_errors_are_one_line(tmp_path, capsys):
    assert main(["demo", "--model", str(BASE_DIR), "--layer", "9", "--out", str(tmp_path / "a"), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanosae: error:") and "\n" not in err and "layer" in err
    assert main(["demo", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "b"), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanosae: error:") and "\n" not in err and "missing" in err
