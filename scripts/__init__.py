"""The commands of the first SAE proposal for nanochat (github.com/karpathy/nanochat/pull/169, "SAE-based
interpretability extension", closed unmerged), typed as its README documented them, from this repository's root:

    python -m scripts.sae_train --checkpoint models/d20/base_final.pt --layer 10
    python -m scripts.sae_eval --sae_path sae_models/layer_10/best_model.pt
    python -m scripts.sae_viz --sae_path sae_models/layer_10/best_model.pt --all_features

Each reads the proposal's flags, turns them into the `nanosae` command they mean and runs it (nanosae.cli.main): the
same parser, functions, defaults and errors. A flag of the proposal without a nanosae meaning is refused with the
reason; any other is refused with the list of accepted flags.

`scripts` is not installed with nanosae (nanochat runs its own commands as `python -m scripts.base_train`, …; two
installed `scripts` would shadow each other): run these from the repository root, or use the nanosae commands they
print.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path

from nanosae.cli import _Parser
from nanosae.cli import main as nanosae_main
from nanosae.errors import NanosaeError


class ProposalParser(_Parser):
    """nanosae's parser (no abbreviations, `given`), whose errors are one line; an unknown flag's error lists the
    accepted ones."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments"):
            message += f"; accepted: {', '.join(self.accepted())}"
        self.exit(2, f"{self.prog}: error: {message}\n")

    def accepted(self) -> list[str]:
        return [o for a in self._actions if not isinstance(a, _Refuse) for o in a.option_strings if o.startswith("--")]

    def refuse(self, flag: str, why: str) -> None:
        """A flag of the proposal that has no nanosae meaning: giving it is an error that says why."""
        self.add_argument(flag, action=_Refuse, nargs="?", help=argparse.SUPPRESS, why=why)


class _Refuse(argparse.Action):
    def __init__(self, *args, why: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.why = why

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.why}")


def nanosae(argv: Sequence[str]) -> int:
    """Run a nanosae command line (its exit status)."""
    return nanosae_main(list(argv))


def command(argv: Sequence[str]) -> str:
    """argv as the nanosae command a user would type."""
    return shlex.join(["nanosae", *argv])


def sae_flags(p: argparse.ArgumentParser) -> None:
    """The flags eval and viz share: the SAE and, optionally, its model."""
    p.add_argument(
        "--sae_path",
        required=True,
        help="an SAE folder, a file in one (cfg.json, best_model.pt, …) or a .pt state dict",
    )
    p.add_argument("--checkpoint", default=None, help="the model (default: the checkpoint the SAE was trained on)")


def model_flags(sae, sae_path: str, checkpoint: str | None) -> list[str]:
    """The nanosae flags naming the SAE's model: --checkpoint when given, else the checkpoint its training recorded
    (nanosae train keeps it in cfg.json: metadata.nanosae_training.run)."""
    if checkpoint:
        return ["--model", checkpoint]
    run_cfg = sae.cfg.training.get("run") or {}
    model = run_cfg.get("model")
    if not model:
        raise NanosaeError(
            f"{sae_path}: records no model checkpoint (not trained by nanosae from a model); pass --checkpoint "
            "with the nanochat model it was trained on"
        )
    if not Path(model).expanduser().exists():
        raise NanosaeError(f"{sae_path}: its model {model} is not there (moved?); pass --checkpoint with its new path")
    flags = ["--model", model]
    for key, flag in (("model_step", "--step"), ("phase", "--phase"), ("tokenizer", "--tokenizer")):
        if run_cfg.get(key) is not None:
            flags += [flag, str(run_cfg[key])]
    if run_cfg.get("generation"):
        flags += ["--generation", run_cfg["generation"]]
    return flags
