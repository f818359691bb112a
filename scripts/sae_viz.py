"""python -m scripts.sae_viz: nanochat PR #169's visualisation command, run as `nanosae viz`: one self-contained HTML
dashboard of every latent (what --all_features asked for). The model is the one the SAE records unless --checkpoint
names one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanosae.cli import _add_config_flags, _token_count, run
from nanosae.errors import NanosaeError
from nanosae.features import FeatureConfig
from nanosae.sae import load_sae, sae_folder
from scripts import ProposalParser, model_flags, nanosae, sae_flags

PROG = "python -m scripts.sae_viz"


def build_parser() -> ProposalParser:
    p = ProposalParser(
        prog=PROG,
        description="Write the dashboard of an SAE's latents (nanosae viz, with the flags "
        "of nanochat PR #169's scripts/sae_viz.py).",
    )
    sae_flags(p)
    p.add_argument("--all_features", action="store_true", help="every latent (the dashboard always holds them all)")
    p.add_argument("--feature", type=int, default=None, help="also print the link that opens this latent's page")
    _add_config_flags(p, FeatureConfig, only=("n_tokens",), flags={"n_tokens": "--num_samples"})
    p.add_argument(
        "--num_tokens", dest="n_tokens", type=_token_count, default=argparse.SUPPRESS, help="the same as --num_samples"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, … (default: nanosae viz's)")
    p.add_argument("--output_dir", default=None, help="dashboard folder (default: <SAE folder>/dashboard)")
    p.refuse("--top_k", "the dashboard holds every latent; sort and search them in the page")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        sae = load_sae(args.sae_path)  # fails fast on a bad SAE, and names its model
        if args.feature is not None and not 0 <= args.feature < sae.cfg.d_sae:
            raise NanosaeError(f"--feature {args.feature}: the SAE has latents 0..{sae.cfg.d_sae - 1}")
        out = Path(args.output_dir) if args.output_dir else sae_folder(args.sae_path) / "dashboard"
        argv = ["viz", "--sae", args.sae_path, *model_flags(sae, args.sae_path, args.checkpoint), "--out", str(out)]
        if args.device:
            argv += ["--device", args.device]
        if "n_tokens" in args.given:
            argv += ["--tokens", str(args.n_tokens)]
        if rc := nanosae(argv):
            return rc
        if args.feature is not None:
            print(f"latent {args.feature}: {(out / 'index.html').absolute().as_uri()}#/f/{args.feature}")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
