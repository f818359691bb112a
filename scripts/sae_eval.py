"""python -m scripts.sae_eval: nanochat PR #169's evaluation command, run as `nanosae eval` (SAEBench core metrics
with the SAE spliced into its model). The model is the one the SAE records unless --checkpoint names one."""

from __future__ import annotations

import sys
from pathlib import Path

from nanosae.cli import _token_count, run
from nanosae.sae import load_sae
from scripts import ProposalParser, model_flags, nanosae, sae_flags

PROG = "python -m scripts.sae_eval"


def build_parser() -> ProposalParser:
    p = ProposalParser(
        prog=PROG,
        description="Evaluate an SAE on its model (nanosae eval, with the flags of "
        "nanochat PR #169's scripts/sae_eval.py).",
    )
    sae_flags(p)
    p.add_argument(
        "--num_test_samples",
        "--num_tokens",
        dest="tokens",
        type=_token_count,
        default=None,
        help="tokens to evaluate on (default: nanosae eval's)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, … (default: nanosae eval's)")
    p.add_argument("--output_dir", default=None, help="write eval_core.json there (default: the SAE's folder)")
    p.refuse("--sae_dir", "evaluate one SAE at a time: --sae_path <folder or .pt>")
    for flag in ("--generate_dashboards", "--top_k"):
        p.refuse(flag, "dashboards come from python -m scripts.sae_viz --sae_path <SAE> --all_features (every latent)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        sae = load_sae(args.sae_path)  # fails fast on a bad SAE, and names its model
        argv = ["eval", "--sae", args.sae_path, *model_flags(sae, args.sae_path, args.checkpoint)]
        if args.device:
            argv += ["--device", args.device]
        if args.tokens:
            argv += ["--tokens", str(args.tokens)]
        if args.output_dir:
            argv += ["--json", str(Path(args.output_dir) / "eval_core.json")]
        return nanosae(argv)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
