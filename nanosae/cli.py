"""The `nanosae` command (also `python -m nanosae`): argparse subcommands, each a thin call into one module."""

from __future__ import annotations

import argparse
import ctypes
import sys

from .errors import NanosaeError

CHAT_SAE_HELP = "SAE folder (default: nanosae-demo/sae when `nanosae demo` made it here from this model)"


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="checkpoint dir, nanochat base dir or model_XXXXXX.pt")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--phase", choices=["base", "sft", "rl"], default=None, help="phase, for a base dir")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: <base>/tokenizer)")
    p.add_argument("--generation", default=None, help="override the detected nanochat generation")
    p.add_argument("--device", default="cpu")


def _load(args):
    from .checkpoint import load_model

    return load_model(
        args.model,
        args.step,
        phase=args.phase,
        device=args.device,
        generation=args.generation,
        tokenizer_dir=args.tokenizer,
    )


def cmd_sample(args) -> None:
    from .generate import generate_stream

    model, tok, _ = _load(args)
    prompt = tok.encode(args.prompt, prepend=tok.bos_token_id)
    stop = tok.stop_token_ids() if args.stop else None
    print(args.prompt, end="", flush=True)
    text = []
    for t in generate_stream(model, prompt, args.max_tokens, args.temperature, args.top_k, args.seed, stop):
        text.append(t)
        s = tok.decode(text)
        if not s.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(s, end="", flush=True)
            text = []
    print()


def cmd_train_lm(args) -> None:
    import dataclasses

    from .lm_train import TinyConfig, main

    fields = {f.name for f in dataclasses.fields(TinyConfig)}
    main(TinyConfig(**{k: v for k, v in vars(args).items() if k in fields}), args.out, args.force)


def _train_lm_args(p: argparse.ArgumentParser) -> None:
    """One flag per TinyConfig field (--n-layer, --vocab-size, ...), so the CLI and the Python config agree."""
    import dataclasses

    from .lm_train import TinyConfig

    p.add_argument("--out", default=None, help="write the nanochat base dir here (default: $NANOSAE_HOME/tiny/<hash>)")
    p.add_argument("--force", action="store_true", help="retrain even if this config was trained before")
    g = p.add_argument_group("config (defaults finish in a few minutes on 2 CPU cores)")
    for f in dataclasses.fields(TinyConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "data":
            g.add_argument(flag, default=None, help="text/.jsonl/.parquet file or dir, or builtin (the default)")
        else:
            g.add_argument(flag, type=type(f.default), default=f.default, help=f"default {f.default}")


def cmd_train_sft(args) -> None:
    import dataclasses

    from .lm_train import SFTConfig, main_sft

    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    main_sft(SFTConfig(**{k: v for k, v in vars(args).items() if k in fields}), args.base, args.force)


def _train_sft_args(p: argparse.ArgumentParser) -> None:
    """One flag per SFTConfig field, so the CLI and the Python config agree."""
    import dataclasses

    from .lm_train import SFTConfig

    p.add_argument("--base", default=None, help="a folder train-lm wrote (default: the tiny model, trained if needed)")
    p.add_argument("--force", action="store_true", help="fine-tune again even if this config was fine-tuned before")
    g = p.add_argument_group("config (defaults finish in about 3 minutes on 2 CPU cores)")
    for f in dataclasses.fields(SFTConfig):
        g.add_argument(
            "--" + f.name.replace("_", "-"), type=type(f.default), default=f.default, help=f"default {f.default}"
        )


def cmd_eval(args) -> None:
    from pathlib import Path

    from .evaluate import evaluate, format_table, save_result
    from .sae import load_sae

    sae = load_sae(args.sae, args.device)  # fails fast on a bad SAE folder, before the model loads
    model, tok, _ = _load(args)
    result = evaluate(
        sae,
        model,
        tok,
        args.data,
        args.tokens,
        ce_tokens=args.ce_tokens,
        batch_size=args.batch_size,
        context_size=args.context_size,
        split=None if args.split == "all" else args.split,
        saebench_compat=args.saebench_compat,
        check_model=not args.no_model_check,
        sae_id=str(args.sae),
    )
    print(format_table(result))
    out, png = save_result(result, args.json or Path(args.sae) / "eval_core.json")
    print(f"wrote {out} and {png}")


def _token_count(s: str) -> int:
    """An integer with an optional k/M/B suffix: 500k, 10M, 1.5B."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(s[-1:].lower(), 1)
    try:
        n = float(s[:-1] if scale > 1 else s) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a count like 20000, 500k or 10M") from None
    if n < 1 or n != int(n):
        raise argparse.ArgumentTypeError(f"{s!r} must be a positive whole number")
    return int(n)


def cmd_collect(args) -> None:
    import os

    import torch.distributed as dist

    from .activations import collect
    from .hooks import site_name

    own_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if own_group:  # under torchrun: each rank collects its share of the shards
        if args.device.startswith("cuda"):
            import torch

            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    try:
        if args.layer is None and "." not in args.site and args.site not in ("embed", "final"):
            raise NanosaeError(f"--site {args.site} needs --layer (or pass a full site like blocks.3.{args.site})")
        site = args.site if args.layer is None else site_name(args.layer, args.site)
        model, tok, _ = _load(args)
        collect(
            model,
            tok,
            args.out,
            site,
            args.tokens,
            source=None if args.data == "builtin" else args.data,
            dtype=args.dtype,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            shard_tokens=args.shard_tokens,
            keep_bos=args.keep_bos,
        )
    finally:
        if own_group:
            dist.destroy_process_group()


def _floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of numbers") from None


def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of whole numbers") from None


def _train_config(args):
    """TrainConfig from the flags: one SAE per combination of --arch, --k, --expansion and --sparsity-coeff (k only
    matters to the TopK family, the coefficient only to the others, so duplicates collapse)."""
    import itertools

    from .hooks import site_name
    from .sae import SAETrainConfig
    from .train import TrainConfig

    saes, seen = [], set()
    for arch, k, expansion, coeff in itertools.product(
        args.arch.split(","), args.k, args.expansion, args.sparsity_coeff
    ):
        topk = arch in ("topk", "batchtopk")
        target = args.target_l0 is not None  # it sets k, and λ only starts at the coefficient
        key = (arch, k if topk and not target else None, expansion, None if topk or target else coeff)
        if key in seen:
            continue
        seen.add(key)
        saes.append(
            SAETrainConfig(
                arch=arch,
                expansion=expansion,
                d_sae=args.d_sae,
                k=k,
                matryoshka=tuple(args.matryoshka),
                lr=args.lr,
                sparsity_coeff=None if topk else coeff,
                target_l0=args.target_l0,
                aux_coeff=args.aux_coeff,
                aux_rare=args.aux_rare,
                k_aux=args.k_aux,
                normalize=args.normalize,
                b_dec_init=args.b_dec_init,
                bandwidth=args.bandwidth,
                init_threshold=args.init_threshold,
                threshold_rate=args.threshold_rate,
                resample=args.resample,
                grad_clip=args.grad_clip,
                beta1=args.beta1,
            )
        )
    if args.activations and (args.model or args.layer is not None):
        raise NanosaeError("--activations trains on the cache's own model and site; drop --model/--layer")
    if not args.activations and (not args.model or (args.layer is None and "." not in args.site)):
        raise NanosaeError("pass --model and --layer (streams from the model) or --activations DIR (a collected cache)")
    site = "" if args.activations else args.site if args.layer is None else site_name(args.layer, args.site)
    return TrainConfig(
        saes=saes,
        tokens=args.tokens,
        batch_size=args.batch_size,
        lr_warmup_steps=args.lr_warmup_steps,
        lr_decay_frac=args.lr_decay_frac,
        sparsity_warmup_frac=args.sparsity_warmup_frac,
        dead_tokens=args.dead_tokens,
        density_tokens=args.density_tokens,
        seed=args.seed,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every,
        out=args.out,
        device=args.device,
        model=args.model or "",
        model_step=args.step,
        phase=args.phase,
        tokenizer=args.tokenizer,
        generation=args.generation,
        site=site,
        data=None if args.data == "builtin" else args.data,
        seq_len=args.seq_len,
        activations=args.activations or "",
    )


def cmd_train(args) -> None:
    import os

    import torch
    import torch.distributed as dist

    from .train import TrainConfig, read_checkpoint, train

    own_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if own_group:  # under torchrun: data-parallel, each rank trains on its share of every batch
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    try:
        if args.resume:  # the saved settings, so the run continues exactly
            cfg = TrainConfig.from_dict({**read_checkpoint(args.out)["config"], "out": args.out, "device": args.device})
        else:
            cfg = _train_config(args)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if cfg.activations:
            from .activations import cache_stream

            def stream_fn(state):
                return cache_stream(cfg.activations, cfg.batch_size, cfg.seed, rank, world, state)
        else:
            from .activations import model_stream
            from .checkpoint import load_model

            model, tok, _ = load_model(
                cfg.model,
                cfg.model_step,
                phase=cfg.phase,
                device=cfg.device,
                generation=cfg.generation,
                tokenizer_dir=cfg.tokenizer,
            )

            def stream_fn(state):
                return model_stream(
                    model,
                    tok,
                    cfg.site,
                    cfg.data,
                    cfg.batch_size,
                    seq_len=cfg.seq_len,
                    seed=cfg.seed,
                    rank=rank,
                    world_size=world,
                    state=state,
                )

        eval_fn = None
        if cfg.eval_every and not cfg.activations:  # a short spliced-CE eval on held-out text, logged
            from .evaluate import make_train_eval

            eval_fn = make_train_eval(model, tok, cfg.data, n_tokens=8192)

        train(cfg, stream_fn, eval_fn=eval_fn, resume=args.resume)
    finally:
        if own_group:
            dist.destroy_process_group()


def _steers(args) -> list:
    from .runtime import parse_steer

    given = [(kind, v) for kind in ("steer", "clamp", "ablate") for v in getattr(args, kind) or []]
    return [parse_steer(v, kind) for kind, v in given]


def cmd_chat(args) -> None:
    from .chat import ChatSession, chat, chat_defaults
    from .runtime import check_steers, load_runtime

    steers = _steers(args)  # flags are checked before the model loads
    args.model, args.phase, args.sae, _ = chat_defaults(args.model, args.phase, args.sae, None, "chat")
    model, tok, _ = _load(args)
    sae, units, labels = load_runtime(args.sae, model)
    check_steers(sae, steers)
    session = ChatSession(
        model,
        tok,
        sae,
        steers,
        args.only_generated,
        units,
        labels,
        args.temperature,
        args.top_k,
        args.max_tokens,
        args.latents,
        args.seed,
    )
    chat(session)


def cmd_serve(args) -> None:
    from .chat import chat_defaults
    from .runtime import load_runtime
    from .server import Runtime, serve

    args.model, args.phase, args.sae, args.dashboard = chat_defaults(
        args.model, args.phase, args.sae, args.dashboard, "serve"
    )
    model, tok, _ = _load(args)
    sae, units, labels = load_runtime(args.sae, model)
    rt = Runtime(model, tok, sae, units, labels, args.dashboard, args.temperature, args.top_k, args.max_tokens)
    serve(rt, args.host, args.port)


def _feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE folder (cfg.json + sae_weights.safetensors)")
    _model_args(p)
    p.add_argument("--data", default=None, help="text/.jsonl/.parquet file or dir (default: the built-in corpus)")
    p.add_argument("--tokens", type=_token_count, default=262_144, help="tokens to read (e.g. 1M; default 262144)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per prompt (Neuronpedia uses 128)")
    p.add_argument("--batch-size", type=int, default=0, help="prompts per forward (default: by SAE width)")
    p.add_argument("--stats", default=None, help="feature statistics folder (default: <SAE>/feature_stats)")
    p.add_argument("--recompute", action="store_true", help="recompute the statistics even if saved ones match")


def _features(args):
    """(stats, sae) for viz/export/label: the saved statistics when they match, else one pass over the data."""
    from .features import FeatureConfig, load_or_compute
    from .sae import load_sae

    sae = load_sae(args.sae, args.device)  # fails fast on a bad SAE folder, before the model loads
    model, tok, _ = _load(args)
    sae = sae.to(model.device)
    cfg = FeatureConfig(n_tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size)
    stats = load_or_compute(model, tok, sae, args.sae, args.data, cfg, args.stats, args.recompute)
    print(stats.summary())
    return stats, sae


def cmd_viz(args) -> None:
    from .dashboard import write_dashboard
    from .labels import load_labels

    labels = load_labels(args.sae)
    stats, _ = _features(args)
    index = write_dashboard(stats, args.out, labels)
    print(f"wrote {index} ({stats.d_sae} latents, {len(labels)} labelled); open it in a browser")


def cmd_export_neuronpedia(args) -> None:
    from .labels import load_label_records
    from .neuronpedia import export_neuronpedia, names

    labels = load_label_records(args.sae)
    stats, sae = _features(args)
    n = names(stats, args.model_id, args.set_name)  # checks the ids before writing anything
    paths = export_neuronpedia(
        stats, sae, args.out, labels, n["model_id"], n["set_name"], args.creator, args.hf_repo, args.log_sparsity
    )
    print(f"Neuronpedia id {n['model_id']}/{n['source']}")
    for what, path in paths.items():
        print(f"  {what:9s} {path}")
    print(f"upload: nanosae export upload {args.out} --api-key KEY --send")


def cmd_export_upload(args) -> None:
    from .neuronpedia import upload

    upload(args.dir, args.api_base, args.api_key, args.send, not args.no_source_set)


def cmd_label(args) -> None:
    import os

    from .labels import auto_label, load_label_records, set_label

    if args.auto:
        if not args.api_base or not args.llm:
            raise NanosaeError("--auto needs --api-base (an OpenAI-compatible URL) and --llm (the model name)")
        if not args.model:
            raise NanosaeError("--auto needs --model (and --data) to find each latent's examples")
        stats, _ = _features(args)
        latents = args.latents if args.latents else range(stats.d_sae)
        key = args.api_key or os.environ.get("OPENAI_API_KEY")
        done = auto_label(stats, args.sae, args.api_base, key, args.llm, latents, args.overwrite)
        print(f"labelled {len(done)} latents in {args.sae}/labels.json")
        return
    if args.index is None:
        for i, r in sorted(load_label_records(args.sae).items()):
            print(f"{i:6d}  {r['text']}" + (f"  (auto: {r['model']})" if r["source"] == "auto" else ""))
        return
    if not args.clear and args.text is None:
        raise NanosaeError('give the label text (nanosae label --sae DIR 123 "text") or --clear')
    set_label(args.sae, args.index, None if args.clear else args.text)
    print(f"latent {args.index}: {'label removed' if args.clear else args.text}")


def cmd_demo(args) -> None:
    import dataclasses

    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)}))


def _demo_args(p: argparse.ArgumentParser) -> None:
    """One flag per DemoConfig field, so the CLI and the Python config agree."""
    import dataclasses

    from .demo import DemoConfig

    for f in dataclasses.fields(DemoConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true")
        elif "tokens" in f.name:
            p.add_argument(flag, type=_token_count, default=f.default, help=f"default {f.default:,}")
        else:
            kind = int if f.type in ("int", "int | None") else str
            p.add_argument(flag, type=kind, default=f.default, help=f"default {f.default}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanosae", description="Sparse autoencoders for nanochat models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole pipeline: tiny model (or --model) -> SAE -> eval -> dashboard -> export")
    _demo_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sample", help="generate text from a nanochat checkpoint")
    _model_args(p)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--stop", action="store_true", help="stop at <|assistant_end|> or <|bos|>")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train-lm", help="train the tiny nanochat model on CPU (cached) and print samples")
    _train_lm_args(p)
    p.set_defaults(func=cmd_train_lm)

    p = sub.add_parser("train-sft", help="fine-tune the tiny model into a chat model (cached) and print answers")
    _train_sft_args(p)
    p.set_defaults(func=cmd_train_sft)

    p = sub.add_parser("eval", help="SAEBench core metrics of an SAE spliced into its model (EV, L0, CE/KL, density)")
    p.add_argument("--sae", required=True, help="SAE folder (cfg.json + sae_weights.safetensors)")
    _model_args(p)
    p.add_argument("--data", default=None, help="text/.jsonl/.parquet file or dir (default: the built-in corpus)")
    p.add_argument("--split", choices=["train", "val", "all"], default="val")
    p.add_argument("--tokens", type=_token_count, default=409_600, help="tokens for sparsity, variance, density")
    p.add_argument("--ce-tokens", type=_token_count, default=None, help="tokens for CE/KL (default: --tokens / 10)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--saebench-compat", action="store_true", help="report SAEBench's EV and MSE formulas (quirks)")
    p.add_argument("--no-model-check", action="store_true", help="evaluate on a model other than the SAE's")
    p.add_argument("--json", default=None, help="result path (default: <SAE>/eval_core.json; PNG beside it)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("collect", help="cache activations at one site as checksummed safetensors shards")
    _model_args(p)
    p.add_argument("--layer", type=int, default=None, help="block index of the site")
    p.add_argument("--site", default="resid_post", help="site kind (resid_post, mlp_out, …) or a full site name")
    p.add_argument("--data", default="builtin", help="text/.jsonl/.parquet file or folder, or builtin")
    p.add_argument("--tokens", type=_token_count, required=True, help="activations to collect (e.g. 2M)")
    p.add_argument("--out", required=True, help="cache folder; re-running the same command resumes it")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="storage dtype")
    p.add_argument("--seq-len", type=int, default=None, help="context size (default: the model's)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward")
    p.add_argument("--shard-tokens", type=_token_count, default=1 << 16, help="about this many tokens per shard")
    p.add_argument("--keep-bos", action="store_true", help="keep the <|bos|> positions (dropped by default)")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("train", help="train SAEs (topk, batchtopk, standard, april, gated, jumprelu) on activations")
    _model_args(p, required=False)
    p.add_argument("--layer", type=int, default=None, help="block index of the site (with --model)")
    p.add_argument("--site", default="resid_post", help="site kind (resid_post, mlp_out, …) or a full site name")
    p.add_argument("--data", default="builtin", help="text/.jsonl/.parquet file or folder, or builtin (with --model)")
    p.add_argument("--seq-len", type=int, default=None, help="context size (default: the model's)")
    p.add_argument("--activations", default=None, help="a cache folder from nanosae collect (instead of --model)")
    p.add_argument("--out", required=True, help="run folder: the SAE (or one subfolder per SAE), metrics, checkpoint")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its saved settings")
    g = p.add_argument_group("SAEs (comma lists train one SAE per combination)")
    g.add_argument("--arch", default="topk", help="topk, batchtopk, standard, april, gated, jumprelu (default topk)")
    g.add_argument("--k", type=_ints, default=[32], help="active latents per token, TopK family (default 32)")
    g.add_argument("--expansion", type=_ints, default=[16], help="d_sae = expansion * d_in (default 16)")
    g.add_argument("--d-sae", type=int, default=0, help="number of latents (overrides --expansion)")
    g.add_argument("--sparsity-coeff", type=_floats, default=[None], help="λ of the L1/L0 penalty (default per arch)")
    g.add_argument("--matryoshka", type=_ints, default=[], help="nested prefix widths for topk/batchtopk: 128,512")
    g.add_argument("--lr", type=float, default=None, help="Adam LR (default 2e-4 / sqrt(d_sae / 2^14))")
    g.add_argument(
        "--target-l0", type=float, default=None, help="steer λ so the mean L0 settles here (topk/batchtopk: sets k)"
    )
    g.add_argument("--aux-coeff", type=float, default=1 / 32, help="AuxK weight (default 1/32)")
    g.add_argument("--aux-rare", type=float, default=0.0, help="AuxK also trains latents below this x the mean rate")
    g.add_argument("--k-aux", type=int, default=None, help="AuxK latents per token (default d_in / 2)")
    g.add_argument(
        "--normalize", action=argparse.BooleanOptionalAction, default=None, help="scale inputs to E|x|=√d_in"
    )
    g.add_argument("--b-dec-init", choices=["geometric_median", "mean", "zero"], default="geometric_median")
    g.add_argument("--bandwidth", type=float, default=2.0, help="JumpReLU straight-through bandwidth (default 2)")
    g.add_argument("--init-threshold", type=float, default=None, help="JumpReLU initial threshold (default 0.1)")
    g.add_argument("--threshold-rate", type=float, default=0.01, help="BatchTopK threshold EMA rate")
    g.add_argument("--resample", action=argparse.BooleanOptionalAction, default=None, help="resample dead latents")
    g.add_argument("--grad-clip", type=float, default=None, help="gradient-norm clip (default: april 1, others off)")
    g.add_argument("--beta1", type=float, default=None, help="Adam beta1 (default: jumprelu 0, others 0.9)")
    g = p.add_argument_group("run")
    g.add_argument("--tokens", type=_token_count, default=2_000_000, help="training tokens (e.g. 50M; default 2M)")
    g.add_argument("--batch-size", type=int, default=4096, help="tokens per step, over all ranks")
    g.add_argument("--lr-warmup-steps", type=int, default=None, help="default: 5%% of the steps, at most 1000")
    g.add_argument("--lr-decay-frac", type=float, default=0.2, help="linear LR decay over this last fraction")
    g.add_argument("--sparsity-warmup-frac", type=float, default=0.05, help="λ warm-up over this first fraction")
    g.add_argument("--dead-tokens", type=_token_count, default=None, help="dead = silent this long (min(10M, N/10))")
    g.add_argument("--density-tokens", type=_token_count, default=1_000_000, help="window of the saved densities")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=int, default=20, help="steps between metrics lines")
    g.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    g.add_argument("--eval-every", type=int, default=0, help="steps between evaluations")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "chat", help="terminal chat showing each token's SAE latents, with steering (default: the tiny chat model)"
    )
    _model_args(p, required=False)
    p.add_argument("--sae", default=None, help=CHAT_SAE_HELP)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--latents", type=int, default=3, help="latents shown per generated token (0: none)")
    p.add_argument("--steer", action="append", metavar="ID:A", help="add A units of a latent's direction (123:+8)")
    p.add_argument("--clamp", action="append", metavar="ID:V", help="hold a latent at activation V (45:0)")
    p.add_argument("--ablate", action="append", metavar="ID", help="clamp a latent to 0")
    p.add_argument("--only-generated", action="store_true", help="steer generated tokens only, not the prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "serve", help="local web app: streaming chat, per-token latents, steering, search (default: tiny chat model)"
    )
    _model_args(p, required=False)
    p.add_argument("--sae", default=None, help=CHAT_SAE_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dashboard", default=None, help="the --out folder of nanosae viz, linked from latents")
    p.add_argument("--temperature", type=float, default=0.8, help="default for requests that give none")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=512)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("viz", help="write a self-contained HTML dashboard of every latent (opens from file://)")
    _feature_args(p)
    p.add_argument("--out", required=True, help="dashboard folder (index.html inside)")
    p.set_defaults(func=cmd_viz)

    p = sub.add_parser("export", help="export for Neuronpedia, or upload an export")
    ex = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    q = ex.add_parser("neuronpedia", help="SAELens weights + SAEDashboard batches + the bulk-import layout")
    _feature_args(q)
    q.add_argument("--out", required=True, help="export folder")
    q.add_argument("--model-id", default=None, help="Neuronpedia model id (default: the model's name, nanochat-d20)")
    q.add_argument("--set-name", default=None, help="source set (default: <hook kind>-nanosae, e.g. res-nanosae)")
    q.add_argument("--creator", default="nanosae", help="creator name in the records")
    q.add_argument("--hf-repo", default=None, help="Hugging Face repo that will host the saelens/ folder")
    q.add_argument("--log-sparsity", type=float, default=-8.0, help="skip latents with log10 density below this")
    q.set_defaults(func=cmd_export_neuronpedia)
    q = ex.add_parser("upload", help="post an export to a Neuronpedia API (dry run unless --send)")
    q.add_argument("dir", help="the --out folder of nanosae export neuronpedia")
    q.add_argument("--api-base", default="https://www.neuronpedia.org", help="API base URL")
    q.add_argument("--api-key", default=None, help="API key (default: $NEURONPEDIA_API_KEY)")
    q.add_argument("--send", action="store_true", help="really send (default: print what would be sent)")
    q.add_argument("--no-source-set", action="store_true", help="skip creating the source set (it exists already)")
    q.set_defaults(func=cmd_export_upload)

    p = sub.add_parser("label", help="set, remove or list latent labels (labels.json in the SAE folder)")
    p.add_argument("--sae", required=True, help="SAE folder")
    p.add_argument("index", type=int, nargs="?", help="latent id (none: list the labels)")
    p.add_argument("text", nargs="?", help="the label")
    p.add_argument("--clear", action="store_true", help="remove the latent's label")
    g = p.add_argument_group("automatic labels from an OpenAI-compatible chat endpoint (off unless --auto)")
    g.add_argument("--auto", action="store_true", help="label latents with a chat model from their top examples")
    g.add_argument("--api-base", default=None, help="e.g. http://127.0.0.1:8080/v1 (POSTs <base>/chat/completions)")
    g.add_argument("--api-key", default=None, help="bearer key (default: $OPENAI_API_KEY)")
    g.add_argument("--llm", default=None, help="model name the endpoint serves")
    g.add_argument("--latents", type=_ints, default=None, help="ids to label, e.g. 0,5,9 (default: all)")
    g.add_argument("--overwrite", action="store_true", help="replace earlier automatic labels (never human ones)")
    _model_args(g, required=False)
    g.add_argument("--data", default=None, help="text source for the examples (default: the built-in corpus)")
    g.add_argument("--tokens", type=_token_count, default=262_144)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=0)
    g.add_argument("--stats", default=None)
    g.add_argument("--recompute", action="store_true")
    p.set_defaults(func=cmd_label)
    return parser


def _keep_freed_memory() -> None:
    """glibc hands freed blocks of a few MiB back to the OS, so every CPU forward page-faults its activations in
    again. Keeping blocks up to 32 MiB (and up to 256 MiB of free heap) makes the tiny model's forward ~25% faster."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _keep_freed_memory()
    try:
        return args.func(args) or 0
    except NanosaeError as e:
        print(f"nanosae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nanosae: interrupted", file=sys.stderr)
        return 130
