"""The commands of nanochat PR #169 (scripts/): `python -m scripts.sae_train / sae_eval / sae_viz` run as
subprocesses, from the repository root as the proposal documented them and from another folder (the repository root
on PYTHONPATH, paths relative to that folder); their flags land on nanosae's configs; the errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sae_pt import pr169_checkpoint

from nanosae.cli import _train_config
from nanosae.cli import build_parser as nanosae_parser
from nanosae.sae import SAETrainConfig, load_sae
from nanosae.train import TrainConfig
from scripts import sae_eval, sae_train, sae_viz

ROOT = Path(__file__).parent.parent
BASE_DIR = ROOT / "tests" / "fixtures" / "nanochat-d4" / "base_dir"
SMALL = ["--num_tokens", "8192", "--batch_size", "1024", "--expansion_factor", "2", "--k", "8"]


def proposal(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m scripts.<script> args` in cwd; outside the repository root, with the root on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if Path(cwd).resolve() != ROOT.resolve():
        env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-m", f"scripts.{script}", *args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The proposal's first command, run in a folder of its own whose `models` is the d4 checkpoint: (folder, run)."""
    here = tmp_path_factory.mktemp("proposal")
    (here / "models").symlink_to(BASE_DIR)
    run = proposal("sae_train", "--checkpoint", "models", "--layer", "2", *SMALL, cwd=here)
    assert run.returncode == 0, run.stderr[-3000:]
    return here, run


def test_sae_train_writes_an_sae_folder_and_best_model_pt(trained):
    here, run = trained
    folder = here / "sae_models" / "layer_2"  # the default --output_dir, in the folder it ran in
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_sae"], cfg["k"]) == ("topk", 256, 8)
    assert cfg["metadata"]["nanosae_site"] == "blocks.2.resid_post"
    # the checkpoint is recorded absolute (the link kept), so the next commands find it from any folder
    assert cfg["metadata"]["nanosae_training"]["run"]["model"] == str(here / "models")
    raw = torch.load(folder / "best_model.pt", weights_only=True)
    assert raw["config"] == cfg and set(raw) == {"W_enc", "b_enc", "W_dec", "b_dec", "config"}
    sae = load_sae(folder)
    for name, t in sae.state_dict().items():
        assert torch.equal(raw[name], t)
    assert f"nanosae train --model {here / 'models'} --layer 2 --out sae_models/layer_2 --k 8" in run.stdout
    assert "python -m scripts.sae_eval --sae_path sae_models/layer_2/best_model.pt" in run.stdout


def test_sae_eval_runs_from_the_repository_root_on_the_recorded_model(trained):
    here, _ = trained
    pt = here / "sae_models" / "layer_2" / "best_model.pt"
    run = proposal("sae_eval", "--sae_path", str(pt), "--num_test_samples", "4096", cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "explained variance" in run.stdout
    result = json.loads((pt.parent / "eval_core.json").read_text())  # beside the SAE, not inside the .pt's name
    assert result["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(8.0)
    assert result["eval_config"]["model_name"] == "nanochat-d4"


def test_sae_path_may_name_the_folder_or_a_file_in_it(trained):
    folder = trained[0] / "sae_models" / "layer_2"
    for path in (folder, folder / "cfg.json", folder / "sae_weights.safetensors"):
        (folder / "eval_core.json").unlink(missing_ok=True)
        assert sae_eval.main(["--sae_path", str(path), "--num_test_samples", "2048"]) == 0
        assert json.loads((folder / "eval_core.json").read_text())["eval_result_metrics"]["sparsity"]["l0"] == 8.0


def test_sae_viz_writes_the_dashboard_of_every_latent(trained):
    here, _ = trained
    pt = "sae_models/layer_2/best_model.pt"
    run = proposal("sae_viz", "--sae_path", pt, "--all_features", "--num_samples", "4096", "--feature", "5", cwd=here)
    assert run.returncode == 0, run.stderr[-3000:]
    index = here / "sae_models" / "layer_2" / "dashboard" / "index.html"
    assert index.is_file() and "256 latents" in run.stdout
    assert f"latent 5: {index.as_uri()}#/f/5" in run.stdout


def test_a_checkpoint_path_that_does_not_exist_is_one_line(tmp_path):
    run = proposal("sae_train", "--checkpoint", "models/d20/base_final.pt", "--layer", "10", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("nanosae: error: models/d20/base_final.pt: no such file or directory")
    assert "model_XXXXXX.pt" in line and "base_checkpoints/d20" in line  # what nanochat writes
    assert not (tmp_path / "sae_models").exists()


@pytest.mark.parametrize(
    "script, argv, says",
    [
        (sae_train, ["--checkpoint", "m", "--num_epochs", "3"], "--num_epochs: nanosae streams fresh activations"),
        (sae_train, ["--checkpoint", "m", "--l1_coefficient", "1e-3"], "--l1_coefficient: the proposal's L1 scale"),
        (sae_train, ["--checkpoint", "m", "--prepare_neuronpedia"], "run nanosae export neuronpedia"),
        (sae_train, ["--checkpoint", "m", "--activation", "jumprelu"], "argument --activation: invalid choice"),
        (sae_train, ["--checkpoint", "m", "--expansion", "4"], "unrecognized arguments: --expansion 4"),
        (sae_eval, ["--sae_path", "s", "--sae_dir", "d"], "--sae_dir: evaluate one SAE at a time"),
        (sae_eval, ["--sae_path", "s", "--generate_dashboards"], "scripts.sae_viz"),
        (sae_viz, ["--sae_path", "s", "--top_k", "20"], "--top_k: the dashboard holds every latent"),
        (sae_viz, ["--sae_path", "s", "--k", "8"], "unrecognized arguments: --k 8"),
    ],
)
def test_flags_without_a_nanosae_meaning_are_one_line_errors(script, argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(argv)
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert says in line and line.startswith(f"{script.PROG}: error:")
    if "unrecognized" in line:  # the accepted flags, listed
        assert "; accepted: --help, " in line and ("--checkpoint" in line) and "--num_epochs" not in line


def test_an_unknown_flag_is_refused_as_a_subprocess_too(tmp_path):
    run = proposal("sae_train", "--checkpoint", "m", "--warmup_steps", "10", cwd=tmp_path)
    assert run.returncode == 2
    (line,) = run.stderr.strip().splitlines()
    assert "unrecognized arguments: --warmup_steps 10; accepted: --help, --checkpoint, --layer" in line


def nanosae_config(*proposal_argv: str, layer: int = 3) -> TrainConfig:
    """The TrainConfig nanosae builds from the command line the proposal's flags mean."""
    args = sae_train.build_parser().parse_args(["--checkpoint", "m", *proposal_argv])
    return _train_config(nanosae_parser().parse_args(sae_train.train_argv(args, layer, "m")))


def test_the_proposal_flags_land_on_nanosae_configs_whose_defaults_stay_nanosae_s():
    assert nanosae_config() == TrainConfig(
        saes=[SAETrainConfig()], out="sae_models/layer_3", model="m", site="blocks.3.resid_post"
    )
    cfg = nanosae_config(
        "--activation",
        "relu",
        "--hook_type",
        "mlp",
        "--expansion_factor",
        "4",
        "--k",
        "16",
        "--num_activations",
        "10k",
        "--batch_size",
        "512",
        "--learning_rate",
        "1e-3",
        "--device",
        "cuda",
        "--output_dir",
        "o",
    )
    assert cfg.saes == [SAETrainConfig(arch="standard", expansion=4, k=16, lr=1e-3)]
    assert (cfg.site, cfg.tokens, cfg.batch_size, cfg.device, cfg.out) == (
        "blocks.3.mlp_out",
        10_000,
        512,
        "cuda",
        "o/layer_3",
    )
    assert nanosae_config(
        "--activation", "gated", "--hook_type", "attn", "--lr", "2e-4", "--num_tokens", "1M"
    ).saes == [SAETrainConfig(arch="gated", lr=2e-4)]
    assert nanosae_config("--hook_type", "attn").site == "blocks.3.attn_out"
    assert nanosae_config("--num_tokens", "1M").tokens == 1_000_000


def test_without_layer_every_layer_gets_an_sae():
    args = sae_train.build_parser().parse_args(["--checkpoint", str(BASE_DIR), "--output_dir", "o"])
    argvs = sae_train.commands(args)
    assert [a[a.index("--out") + 1] for a in argvs] == [f"o/layer_{i}" for i in range(4)]  # d4: four blocks


def test_eval_and_viz_of_a_pr169_checkpoint_need_its_model(tmp_path, capsys):
    pt = tmp_path / "best_model.pt"
    pr169_checkpoint(pt, "gated")
    assert sae_eval.main(["--sae_path", str(pt)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "records no model checkpoint" in line and "--checkpoint" in line
    argv = ["--sae_path", str(pt), "--checkpoint", str(BASE_DIR), "--num_test_samples", "2048"]
    assert sae_eval.main([*argv, "--output_dir", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "eval_core.json").read_text())
    assert result["sae_cfg_dict"]["architecture"] == "gated_signed"
    assert sae_viz.main(["--sae_path", str(pt), "--feature", "256", "--checkpoint", str(BASE_DIR)]) == 2
    assert "--feature 256: the SAE has latents 0..255" in capsys.readouterr().err


def test_a_recorded_model_that_moved_is_named(tmp_path, hand_sae, capsys):
    sae, _ = hand_sae
    sae = load_sae(hand_sae[1])
    sae.cfg.training = {"run": {"model": str(tmp_path / "gone")}}
    folder = sae.save(tmp_path / "sae")
    assert sae_viz.main(["--sae_path", str(folder), "--all_features"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"its model {tmp_path / 'gone'} is not there" in line and "--checkpoint" in line
