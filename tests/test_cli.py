"""The command line itself: flags are never abbreviated (an unknown one is named with its closest matches)."""

from __future__ import annotations

import pytest

from nanosae.cli import build_parser

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
