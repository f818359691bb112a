"""`nanosae demo` end to end on the real d4 checkpoint, at a small size: every stage's files, the summary, reuse of
a finished run, and the errors a user can cause."""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from nanosae.cli import main

BASE_DIR = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"

SMALL = ["--collect-tokens", "16k", "--tokens", "32k", "--batch-size", "1024", "--expansion", "4", "--k", "8"]
SMALL += ["--eval-tokens", "4096", "--viz-tokens", "8192"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, ["demo", "--model", str(BASE_DIR), "--out", str(out), *SMALL]


def _without_nanosae_on_path(monkeypatch, tmp_path) -> dict:
    """The environment of someone who ran ./run.sh or a venv's python without activating the venv."""
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    monkeypatch.delenv("NANOSAE_COMMAND", raising=False)
    monkeypatch.setenv("PATH", f"{empty}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert shutil.which("nanosae") is None
    return dict(os.environ)


def test_demo_runs_every_stage_and_summarises(demo, capsys, monkeypatch, tmp_path):
    out, argv = demo
    env = _without_nanosae_on_path(monkeypatch, tmp_path)
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
    logged = [json.loads(line) for line in (out / "sae" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("lr", 0) for r in logged) == pytest.approx(4e-3)  # the demo's lr, not the width rule's
    for f in s["striking"]:  # what the summary names is what the statistics hold
        assert f["top_tokens"] and 0 < f["purity"] <= 1 and f["density"] > 0
    assert "explained variance" in printed
    # the last line is a command that runs as printed, from another folder, with no nanosae on PATH
    explore = printed.strip().splitlines()[-2]
    assert explore.startswith("explore   ") and f"serve --model {BASE_DIR}" in explore
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*shlex.split(explore.removeprefix("explore")), "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline, health = time.time() + 120, None
        while health is None and proc.poll() is None and time.time() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None and health["ready"] and health["dashboard"], proc.poll()
    finally:
        proc.kill()  # SIGKILL: stops it whatever signals the suite's launcher left ignored
        proc.wait(30)


def test_the_explore_line_names_the_command_as_the_user_ran_it(monkeypatch, tmp_path):
    from nanosae.demo import command

    _without_nanosae_on_path(monkeypatch, tmp_path)
    assert shlex.split(command()) == [sys.executable, "-m", "nanosae"]
    monkeypatch.setenv("NANOSAE_COMMAND", "../nano sae/run.sh")  # what run.sh exports: how it was called
    assert shlex.split(command()) == ["../nano sae/run.sh"]
    monkeypatch.delenv("NANOSAE_COMMAND")
    on_path = tmp_path / "bin" / "nanosae"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    assert command() == "nanosae"


def test_run_sh_tells_the_cli_how_it_was_called(tmp_path):
    """run.sh, called by a relative path from another folder, hands the CLI that path (in NANOSAE_COMMAND)."""
    repo = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"  # a stand-in venv: a python with torch, set-up stamps, a nanosae that shows its env
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    stamp = subprocess.run(f"cat {repo / 'pyproject.toml'} | cksum", shell=True, capture_output=True, text=True)
    (venv / f".nanosae-setup-{stamp.stdout.split()[0]}").touch()
    (venv / "bin" / "nanosae").write_text('#!/bin/sh\necho "$NANOSAE_COMMAND|$*"\n')
    (venv / "bin" / "nanosae").chmod(0o755)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    rel = os.path.relpath(repo / "run.sh", cwd)
    env = {**os.environ, "NANOSAE_VENV": str(venv)}
    got = subprocess.run(["bash", rel, "demo", "--k", "8"], cwd=cwd, env=env, capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip().splitlines()[-1] == f"{rel}|demo --k 8"
    got = subprocess.run(["bash", "run.sh", "demo"], cwd=repo, env=env, capture_output=True, text=True)
    assert got.stdout.strip().splitlines()[-1] == "./run.sh|demo"  # `bash run.sh` users type ./run.sh


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
    for change in (["--k", "4"], ["--lr", "1e-3"]):
        assert main([*argv, *change]) == 2
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
