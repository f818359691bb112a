"""python -m scripts.sae_train: nanochat PR #169's training command, run as `nanosae train` (the flags map onto
nanosae's, the defaults are nanosae's). Each layer's SAE goes to <output_dir>/layer_<L>/, a nanosae SAE folder, with
best_model.pt beside it: the same weights as one torch file (the final weights: nanosae keeps no "best" step, its LR
decays to 0 at the end)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanosae.cli import _add_config_flags, _token_count, run
from nanosae.sae import SAETrainConfig, load_sae, save_pt
from nanosae.train import TrainConfig
from scripts import ProposalParser, command, nanosae

PROG = "python -m scripts.sae_train"
# the proposal's hook types (forward hooks on a block, its attention, its MLP) and activations, in nanosae's words
HOOK_TYPES = {"resid_post": "resid_post", "attn": "attn_out", "mlp": "mlp_out"}
ACTIVATIONS = {"topk": "topk", "relu": "standard", "gated": "gated"}
# flags whose values pass as they are: dest -> nanosae train's flag
PASSED = {"k": "--k", "expansion": "--expansion", "lr": "--lr", "tokens": "--tokens", "batch_size": "--batch-size"}
PASSED |= {"device": "--device"}
# the proposal's names of the config fields whose flags it shares
FLAGS = {
    "expansion": "--expansion_factor",
    "lr": "--learning_rate",
    "tokens": "--num_tokens",
    "batch_size": "--batch_size",
}


def build_parser() -> ProposalParser:
    p = ProposalParser(
        prog=PROG,
        description="Train SAEs on a nanochat model (nanosae train, with the flags of "
        "nanochat PR #169's scripts/sae_train.py).",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="what nanosae's --model takes: a model_XXXXXX.pt, a checkpoint dir or a nanochat base dir",
    )
    p.add_argument("--layer", type=int, default=None, help="block whose output the SAE reads (default: every layer)")
    p.add_argument(
        "--hook_type",
        choices=HOOK_TYPES,
        default="resid_post",
        help="resid_post, attn or mlp (the output of the block, of its attention, of its MLP)",
    )
    p.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default="topk",
        help="topk; relu (ReLU + L1); gated (the Gated SAE of Rajamanoharan et al. 2024, not the proposal's variant)",
    )
    _add_config_flags(p, SAETrainConfig, only=("k", "expansion", "lr"), flags=FLAGS)
    _add_config_flags(p, TrainConfig, only=("tokens", "batch_size", "device"), flags=FLAGS)
    p.add_argument(
        "--num_activations",
        dest="tokens",
        type=_token_count,
        default=argparse.SUPPRESS,
        help="the same as --num_tokens",
    )
    p.add_argument("--lr", dest="lr", type=float, default=argparse.SUPPRESS, help="the same as --learning_rate")
    p.add_argument(
        "--output_dir", default="sae_models", help="the SAEs go to <output_dir>/layer_<L>/ (default sae_models)"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in the layer's folder")
    p.refuse(
        "--l1_coefficient",
        "the proposal's L1 scale has no nanosae equal; use nanosae train --arch standard "
        "--sparsity-coeff, or --target-l0",
    )
    p.refuse(
        "--num_epochs", "nanosae streams fresh activations instead of repeating them; --num_tokens sets the length"
    )
    p.refuse(
        "--prepare_neuronpedia",
        "after training, run nanosae export neuronpedia --sae <layer folder> --model <checkpoint> --out <dir>",
    )
    return p


def train_argv(args: argparse.Namespace, layer: int, checkpoint: str) -> list[str]:
    """The nanosae train command line the proposal's flags mean, for one layer."""
    argv = [
        "train",
        "--model",
        checkpoint,
        "--layer",
        str(layer),
        "--out",
        str(Path(args.output_dir) / f"layer_{layer}"),
    ]
    if "hook_type" in args.given:
        argv += ["--site", HOOK_TYPES[args.hook_type]]
    if "activation" in args.given:
        argv += ["--arch", ACTIVATIONS[args.activation]]
    argv += [a for dest, flag in PASSED.items() if dest in args.given for a in (flag, str(getattr(args, dest)))]
    return argv + (["--resume"] if args.resume else [])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(lambda: train_layers(args))


def commands(args: argparse.Namespace) -> list[list[str]]:
    """The nanosae train command lines the proposal's flags mean: one per layer (every layer unless --layer)."""
    given = Path(args.checkpoint).expanduser()
    # recorded in the SAE as an absolute path, so that sae_eval and sae_viz find the model from any folder
    checkpoint = str(given.absolute()) if given.exists() else args.checkpoint
    if args.layer is not None:
        layers = [args.layer]
    else:
        from nanosae.checkpoint import load_model

        layers = list(range(load_model(checkpoint)[0].config.n_layer))
    return [train_argv(args, layer, checkpoint) for layer in layers]


def train_layers(args: argparse.Namespace) -> int:
    """Train each layer's SAE, then write its best_model.pt."""
    outs = []
    for argv in commands(args):
        if rc := nanosae(argv):
            return rc
        out = Path(argv[argv.index("--out") + 1])
        pt = save_pt(load_sae(out), out / "best_model.pt")
        print(f"wrote {pt} (the SAE as one torch file); the same run as:\n  {command(argv)}")
        outs.append(pt)
    print(f"next: python -m scripts.sae_eval --sae_path {outs[0]}")
    print(f"      python -m scripts.sae_viz --sae_path {outs[0]} --all_features")
    return 0


if __name__ == "__main__":
    sys.exit(main())
