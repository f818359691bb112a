"""The command line itself: flags are never abbreviated (an unknown one is named with its closest matches); the
flags of a config are made from its dataclass (types, defaults, help)."""

from __future__ import annotations

import pytest

from nanosae.cli import _from_flags, _train_config, build_parser
from nanosae.demo import DemoConfig
from nanosae.features import FeatureConfig
from nanosae.lm_train import TinyConfig
from nanosae.sae import SAETrainConfig
from nanosae.train import TrainConfig

SAE, MODEL = ["--sae", "s"], ["--model", "m"]


@pytest.mark.parametrize(
    "argv, unknown, hint",
    [
        (["train", "--out", "o", "--target", "blocks.1.mlp_out"], "--target blocks.1.mlp_out", "--target-l0"),
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
