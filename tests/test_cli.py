"""The command line itself: flags are never abbreviated (an unknown one is named with its closest matches); the
flags of a config are made from its dataclass (types, defaults, help)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nanosae.cli import _from_flags, _train_config, build_parser, main
from nanosae.demo import DemoConfig
from nanosae.errors import NanosaeError
from nanosae.features import FeatureConfig
from nanosae.lm_train import TinyConfig
from nanosae.sae import SAETrainConfig, load_sae
from nanosae.train import TrainConfig, read_checkpoint

SAE, MODEL = ["--sae", "s"], ["--model", "m"]


@pytest.mark.parametrize(
    "argv, unknown, hint",
    [
        (["train", "--out", "o", "--target-l", "5"], "--target-l 5", "--target-l0"),
        (["train", "--out", "o", "--expans", "4"], "--expans 4", "--expansion"),
        (["train", "--out", "o", "--dead-tok=5"], "--dead-tok=5", "--dead-tokens"),
        (["collect", *MODEL, "--tokens", "1k", "--out", "o", "--shard", "8k"], "--shard 8k", "--shard-tokens"),
        (["eval", *SAE, *MODEL, "--ce", "9"], "--ce 9", "--ce-tokens"),
        (["sample", *MODEL, "--max", "3"], "--max 3", "--max-tokens"),
        (["chat", *SAE, *MODEL, "--only"], "--only", "--only-generated"),
        (["serve", *SAE, *MODEL, "--dash", "d"], "--dash d", "--dashboard"),
        (["viz", *SAE, *MODEL, "--out", "o", "--recomp"], "--recomp", "--recompute"),
        (["export", "neuronpedia", *SAE, *MODEL, "--out", "o", "--set", "x"], "--set x", "--set-name"),
        (["export", "upload", "dir", "--no-source"], "--no-source", "--no-source-set"),
        (["label", *SAE, "--over"], "--over", "--overwrite"),
        (["train-lm", "--n-lay", "2"], "--n-lay 2", "--n-layer"),
        (["demo", "--collect", "9"], "--collect 9", "--collect-tokens"),
    ],
)
def test_flags_are_never_abbreviated(argv, unknown, hint, capsys):
    """A prefix of a flag is an unknown flag (prefix matching once read `--target` as `--target-l0`); the error
    names the subcommand and the closest flags."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: unrecognized arguments: {unknown}" in err and f"did you mean {hint}" in err
    assert f"usage: nanosae {argv[0]}" in err  # the subcommand's own usage, which lists its flags


def test_an_unknown_flag_far_from_every_flag_gets_no_hint(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", *MODEL, "--zzzzzz"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --zzzzzz" in err and "did you mean" not in err


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_flags_left_out_mean_the_configs_defaults():
    """Every default lives in its dataclass: a command line without the flags builds the dataclass's defaults."""
    cfg = _train_config(parse("train", "--model", "m", "--layer", "1", "--out", "o"))
    assert cfg == TrainConfig(saes=[SAETrainConfig()], out="o", model="m", site="blocks.1.resid_post")
    assert _from_flags(TinyConfig, parse("train-lm")) == TinyConfig()
    assert _from_flags(DemoConfig, parse("demo")) == DemoConfig()
    for argv in (["viz", *SAE, *MODEL, "--out", "o"], ["export", "neuronpedia", *SAE, *MODEL, "--out", "o"]):
        assert _from_flags(FeatureConfig, parse(*argv)) == FeatureConfig()
    assert _from_flags(FeatureConfig, parse("label", *SAE)) == FeatureConfig()


def test_flags_parse_to_the_field_types():
    cfg = _train_config(
        parse(
            "train", "--activations", "a", "--out", "o", "--tokens", "1.5M", "--dead-tokens", "20k", "--matryoshka",
            "128,512", "--no-normalize", "--resample", "--lr", "1e-3", "--k-aux", "5", "--init-threshold", "0.2",
            "--b-dec-init", "mean", "--lr-warmup-steps", "7",
        )
    )  # fmt: skip
    assert (cfg.tokens, cfg.dead_tokens, cfg.lr_warmup_steps, cfg.activations, cfg.site) == (
        1_500_000,
        20_000,
        7,
        "a",
        "",
    )
    s = cfg.saes[0]
    assert (s.matryoshka, s.normalize, s.resample, s.lr, s.k_aux, s.init_threshold) == (
        (128, 512),
        False,
        True,
        1e-3,
        5,
        0.2,
    )
    assert s.b_dec_init == "mean" and parse("demo", "--force").force and parse("demo", "--tokens", "3k").tokens == 3000
    tiny = _from_flags(TinyConfig, parse("train-lm", "--matrix-lr", "0.1", "--window-pattern", "SSL", "--data", "d"))
    assert (tiny.matrix_lr, tiny.window_pattern, tiny.data.endswith("/d")) == (0.1, "SSL", True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--k", "8,x"], "'8,x' is not a comma-separated list of whole numbers"),
        (["--sparsity-coeff", "1,y"], "'1,y' is not a comma-separated list of numbers"),
        (["--tokens", "3q"], "'3q' is not a count like 20000, 500k or 10M"),
        (["--b-dec-init", "median"], "invalid choice: 'median'"),
        (["--normalize", "yes"], "unrecognized arguments: yes"),
    ],
)
def test_bad_flag_values_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse("train", "--out", "o", *argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_train_reads_global_sites_without_a_layer(capsys):
    assert _train_config(parse("train", *MODEL, "--site", "embed", "--out", "o")).site == "embed"
    assert _train_config(parse("train", *MODEL, "--site", "blocks.2.mlp_out", "--out", "o")).site == "blocks.2.mlp_out"
    with pytest.raises(NanosaeError, match="--site mlp_out needs --layer"):
        _train_config(parse("train", *MODEL, "--site", "mlp_out", "--out", "o"))


def test_comma_lists_train_one_sae_per_combination():
    args = parse("train", "--activations", "a", "--out", "o", "--arch", "topk,standard", "--k", "8,16",
                 "--sparsity-coeff", "1,2", "--expansion", "2")  # fmt: skip
    got = [(s.arch, s.k, s.sparsity_coeff, s.expansion) for s in _train_config(args).saes]
    # k only matters to topk and the coefficient only to standard: the other combinations collapse
    assert got == [("topk", 8, None, 2), ("topk", 16, None, 2), ("standard", 8, 1.0, 2), ("standard", 8, 2.0, 2)]


def test_help_is_the_fields_comment(capsys):
    with pytest.raises(SystemExit):
        parse("train", "--help")
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--aux-coeff AUX_COEFF AuxK weight (topk, batchtopk) (default 0.03125)" in text
    assert "--lr LR default: 2e-4 / sqrt(d_sae / 2^14)" in text  # a comment's "None: …" reads "default: …"
    assert "resampling of dead latents at 20/40/60/80% of training" in text  # a % in a comment survives argparse
    assert "--tokens TOKENS training tokens (steps = tokens // batch_size) (default 2,000,000)" in text


# --resume with other flags: small runs streamed from the fixture model (steps of 512 tokens)

BASE_DIR = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"
RUN = f"--model {BASE_DIR} --layer 1 --seq-len 64 --batch-size 512 --expansion 2 --log-every 2"
FIRST = f"train {RUN} --k 8 --tokens 4096 --lr-decay-frac 0.5"  # 8 steps, the LR decays over the last 4


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    assert main(f"{FIRST} --out {out}".split()) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize(
    "flags, differing",
    [
        ("--tokens 8192 --k 16", "--k (saved 8)"),  # the safe change does not carry the other one through
        ("--arch batchtopk", "--arch (saved topk)"),
        ("--lr 1e-3 --seed 3", "--lr (saved default), --seed (saved 0)"),
        ("--layer 2", "--layer/--site (saved blocks.1.resid_post)"),
        (f"--activations {BASE_DIR}", "--activations (saved default), --model (saved"),
    ],
)
def test_resume_refuses_flags_that_differ_from_the_saved_run(finished, flags, differing, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    before = (run / "checkpoint.pt").read_bytes()
    assert main(f"train --out {run} --resume {flags}".split()) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"these flags differ from it: {differing}" in err, err
    assert (run / "checkpoint.pt").read_bytes() == before  # nothing trained, nothing written


def test_resume_takes_the_saved_values_and_the_safe_flags(finished, tmp_path):
    """The first command again (+ --resume) changes nothing; cadence and device flags are applied."""
    run = copy_run(finished, tmp_path)
    assert main(f"{FIRST} --out {run} --resume --device cpu --log-every 1".split()) == 0
    assert [m["step"] for m in metrics(run)] == [2, 4, 6, 8]  # finished: nothing more to train
    assert read_checkpoint(run)["config"]["log_every"] == 1


def test_more_tokens_extend_a_finished_run(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    assert main(f"train --out {run} --resume --tokens 8192 --log-every 4".split()) == 0
    ckpt = read_checkpoint(run)
    assert ckpt["step"] == 16 and ckpt["config"]["tokens"] == 8192 and ckpt["config"]["saes"][0]["k"] == 8
    m = metrics(run)
    assert [x["step"] for x in m] == [2, 4, 6, 8, 12, 16] and load_sae(run).cfg.k == 8
    # the schedule follows the new length: the LR of step 7 was decaying to the old end (8 steps), that of step 11
    # is on the decay to the new end (16 steps, the last 8)
    assert [x["lr"] / m[0]["lr"] for x in m[3:]] == pytest.approx([1 / 4, 5 / 8, 1 / 8])


def test_an_extended_run_equals_one_asked_for_that_long(tmp_path):
    """A 4-step run extended to 16 steps has the weights and metrics of a 16-step run when the first 4 steps do not
    depend on the length (pinned warm-up and dead-latent window, no decay yet)."""
    common = f"train {RUN} --k 8 --lr-warmup-steps 2 --dead-tokens 512 --lr-decay-frac 0.2"
    long, short = tmp_path / "long", tmp_path / "short"
    assert main(f"{common} --tokens 8192 --out {long}".split()) == 0
    assert main(f"{common} --tokens 2048 --out {short}".split()) == 0
    assert main(f"train --out {short} --resume --tokens 8192".split()) == 0
    assert torch.equal(load_sae(short).W_dec, load_sae(long).W_dec)
    drop = lambda m: [{k: v for k, v in x.items() if k != "tok_s"} for x in m]  # noqa: E731
    assert drop(metrics(short)) == drop(metrics(long))


def test_resume_refuses_fewer_tokens_than_trained(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    assert main(f"train --out {run} --resume --tokens 2048".split()) == 2
    assert "fewer than the 4,096 tokens this run has trained" in capsys.readouterr().err
