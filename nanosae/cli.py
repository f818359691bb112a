"""The `nanosae` command (also `python -m nanosae`): argparse subcommands, each a thin call into one module."""

from __future__ import annotations

import argparse
import ctypes
import difflib
import inspect
import sys
import types

from .errors import NanosaeError

CHAT_SAE_HELP = "SAE folder, a file in one, or a .pt state dict (default: nanosae-demo/sae when `nanosae demo` made it here from this model)"


class _Parser(argparse.ArgumentParser):
    """argparse with prefix matching off, for the command and every subcommand: `--target` must not be read as
    `--target-l0`, and a flag added later must not change what an old abbreviation meant. An unknown flag is
    refused by the subcommand it was given to, naming its closest flags. `args.given` holds the dests the command
    line set itself (the others hold defaults): without abbreviations a flag is given exactly when it is written
    out, as `--flag` or `--flag=value`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        namespace, extras = super().parse_known_args(args, namespace)
        options = self._option_string_actions
        written = {a.split("=", 1)[0] for a in (args[: args.index("--")] if "--" in args else args)}  # "--": the end
        namespace.given = getattr(namespace, "given", set()) | {options[w].dest for w in written if w in options}
        unknown = [a.split("=", 1)[0] for a in extras if a.startswith("-")]
        if unknown:
            close = {}  # the flags an abbreviation would have meant, then look-alikes (typos)
            for u in unknown:
                for m in ([o for o in options if o.startswith(u)] + difflib.get_close_matches(u, options, 3, 0.6))[:3]:
                    close[m] = None
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return namespace, extras


SAE_HELP = "SAE folder (cfg.json + sae_weights.safetensors), a file in one, or a .pt state dict (best_model.pt)"


SAMPLING_TYPES = {"temperature": float, "top_k": int, "max_tokens": int, "seed": int}


def _default(fn, name: str):
    """The default of `fn`'s parameter `name`: flags that pass straight into a function take its defaults, so each
    default is written once, where the function is."""
    return inspect.signature(fn).parameters[name].default


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
    from .lm_train import TinyConfig, main

    main(_from_flags(TinyConfig, args), args.out, args.force)


def _train_lm_flags(p: argparse.ArgumentParser) -> None:
    from .lm_train import TinyConfig

    p.add_argument("--out", default=None, help="write the nanochat base dir here (default: $NANOSAE_HOME/tiny/<hash>)")
    p.add_argument("--force", action="store_true", help="retrain even if this config was trained before")
    _add_config_flags(p.add_argument_group("config (defaults finish in a few minutes on 2 CPU cores)"), TinyConfig)


def cmd_train_sft(args) -> None:
    from .lm_train import SFTConfig, main_sft

    main_sft(_from_flags(SFTConfig, args), args.base, args.force)


def _train_sft_flags(p: argparse.ArgumentParser) -> None:
    from .lm_train import SFTConfig

    p.add_argument("--base", default=None, help="a folder train-lm wrote (default: the tiny model, trained if needed)")
    p.add_argument("--force", action="store_true", help="fine-tune again even if this config was fine-tuned before")
    _add_config_flags(p.add_argument_group("config (defaults finish in a few minutes on 2 CPU cores)"), SFTConfig)


def cmd_eval(args) -> None:
    from .evaluate import evaluate, format_table, save_result
    from .sae import load_sae, sae_folder

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
    out, png = save_result(result, args.json or sae_folder(args.sae) / "eval_core.json")
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
    from .activations import collect, collect_sites
    from .distributed import torchrun_group

    sites = _sites(args)
    with torchrun_group(args.device) as args.device:  # under torchrun each rank collects its share of the shards
        model, tok, _ = _load(args)
        # several sites: one pass, a cache folder per site (out/<site>)
        collect_one = collect if len(sites) == 1 else collect_sites
        collect_one(
            model,
            tok,
            args.out,
            sites[0] if len(sites) == 1 else sites,
            args.tokens,
            source=None if args.data == "builtin" else args.data,
            dtype=args.dtype,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            shard_tokens=args.shard_tokens,
            keep_bos=args.keep_bos,
        )


def _site(args) -> str:
    """The site that --layer and --site name together (--site alone may be a full name: blocks.3.mlp_out)."""
    from .hooks import site_name

    if args.layer is None and "." not in args.site and args.site not in ("embed", "final"):
        raise NanosaeError(f"--site {args.site} needs --layer (or pass a full site like blocks.3.{args.site})")
    return args.site if args.layer is None else site_name(args.layer, args.site)


def _sites(args) -> list[str]:
    """The sites that --layer/--layers and --site name: one (as _site), or with --layers (all, or a list), a comma
    list or a glob (blocks.*.resid_post) several, in forward order (the model's config gives its depth)."""
    from .checkpoint import model_depth
    from .hooks import expand_sites

    layers = getattr(args, "layers", None)
    if layers is None and "," not in args.site and "*" not in args.site:
        return [_site(args)]
    if layers is not None and args.layer is not None:
        raise NanosaeError("--layer names one layer and --layers several; give one of them")
    if not args.model:
        raise NanosaeError("several sites are read from the model: pass --model (a cache holds one site)")
    return expand_sites(args.site, model_depth(args.model, args.step, args.phase), layers)


def _comma_list(kind, container=list):
    """A flag type: comma-separated values of `kind` (int, float, str, or _token_count)."""
    what = {int: "whole numbers", float: "numbers", _token_count: "counts like 500k"}.get(kind, "values")

    def parse(s: str):
        try:
            return container(kind(v) for v in s.split(",") if v)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of {what}") from None

    return parse


def _field_comments(cls) -> dict[str, str]:
    """The trailing comment of each field in the source of the dataclass `cls`: the help of its flag."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    src = textwrap.dedent(inspect.getsource(cls))
    tokens = tokenize.generate_tokens(io.StringIO(src).readline)
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
    fields = [n for n in ast.parse(src).body[0].body if isinstance(n, ast.AnnAssign)]
    return {n.target.id: comments[n.end_lineno] for n in fields if n.end_lineno in comments}


def _add_config_flags(p, cls, skip=(), only=None, sweep=(), flags=None, **extra) -> None:
    """One flag per field of the dataclass `cls` (all but `skip`, or those in `only`), so that every default
    lives in the dataclass: --field-name (or flags[name]) with the field's default, parsed to the field's type,
    with the field's metadata["help"] or trailing comment as help (a comment's "None: …" reads "default: …").
    A bool is a switch (--x, or --x/--no-x unless it defaults to False), a tuple takes a comma list, an int named
    *tokens a count like 500k or 10M, and a field in `sweep` a comma list of values (default: [its default]).
    extra[name]: more add_argument keywords for that field."""
    import dataclasses
    import typing

    hints, comments = typing.get_type_hints(cls), _field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict = {"dest": f.name, "default": default, "type": kind}
        shown = None if default is None or default is False else default  # the default, as the help shows it
        if kind is bool:
            del kw["type"]
            kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kw["type"] = _comma_list(typing.get_args(kind)[0], tuple)
            shown = ",".join(map(str, default)) or None
        elif kind is int and (f.name == "tokens" or f.name.endswith("_tokens")):
            kw["type"] = _token_count
            shown = None if default is None else f"{default:,}"
        if f.name in sweep:
            kw.update(type=_comma_list(kw["type"]), default=[default])
        text = (f.metadata.get("help") or comments.get(f.name, "")).replace("None: ", "default: ")
        if shown is not None:
            text = f"{text} (default {shown})" if text else f"default {shown}"
        kw["help"] = text.replace("%", "%%")  # argparse formats help with %
        flag = (flags or {}).get(f.name, "--" + f.name.replace("_", "-"))
        p.add_argument(flag, **{**kw, **extra.get(f.name, {})})


def _from_flags(cls, args, **values):
    """The dataclass `cls` from the flags _add_config_flags made for it (values: fields given otherwise)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **values})


# train: SAE flags that take comma lists (one SAE per combination), and the TrainConfig fields that the model and
# site flags (shared with the other commands) set
SWEEP = ("arch", "k", "expansion", "sparsity_coeff")
SOURCE = (
    "model", "model_step", "phase", "tokenizer", "generation", "device", "site", "sites", "targets", "data",
    "seq_len", "activations",
)  # fmt: skip


def _train_config(args):
    """TrainConfig from the flags: one SAE per combination of the SWEEP flags (k only matters to the TopK family,
    the coefficient only to the others, so duplicates collapse)."""
    import itertools

    from .sae import SAETrainConfig, split_arch
    from .train import TrainConfig

    saes, seen = [], set()
    if args.init_from:
        _init_from_defaults(args)
    for flag, k, expansion, coeff in itertools.product(*(getattr(args, name) for name in SWEEP)):
        if flag.startswith("crosscoder"):
            raise NanosaeError(f"--arch {flag} reads two models at once; train it with `nanosae diff --arch {flag}`")
        arch, kind = split_arch(flag)
        topk = arch in ("topk", "batchtopk")
        target = args.target_l0 is not None  # it sets k, and λ only starts at the coefficient
        key = (arch, kind, k if topk and not target else None, expansion, None if topk or target else coeff)
        if key in seen:
            continue
        seen.add(key)
        sweep = {"arch": arch, "kind": kind, "k": k, "expansion": expansion, "sparsity_coeff": None if topk else coeff}
        saes.append(_from_flags(SAETrainConfig, args, **sweep))
    if len({s.kind == "sae" for s in saes}) > 1:
        raise NanosaeError("--arch mixes SAEs and transcoders, which read different data; train them in two runs")
    if args.activations and (args.model or args.layer is not None or args.layers is not None):
        raise NanosaeError("--activations trains on the cache's own model and site; drop --model/--layer/--layers")
    if not args.activations and not args.model:
        raise NanosaeError("pass --model and --layer (streams from the model) or --activations DIR (a collected cache)")
    sites = [] if args.activations else _sites(args)
    if args.distribute_sites and len(sites) < 2:
        raise NanosaeError("--distribute-sites spreads the sites of one run over the ranks: add --layers (or a glob)")
    return _from_flags(
        TrainConfig,
        args,
        saes=saes,
        model=args.model or "",
        model_step=args.step,
        site=sites[0] if len(sites) == 1 else "",
        sites=sites if len(sites) > 1 else [],
        targets=_targets(args, sites, transcoder=saes[0].kind != "sae"),
        data=None if args.data == "builtin" else args.data,
        activations=args.activations or "",
    )


def _targets(args, sites: list[str], transcoder: bool) -> dict[str, str]:
    """Each input site's target for a transcoder run (--target: a site kind, taken in each site's block, or one
    full site name); {} for SAEs."""
    from .hooks import check_target, parse_site

    if not transcoder:
        if args.target is not None:
            raise NanosaeError("--target is for transcoders: add --arch transcoder (or skip_transcoder, …)")
        return {}
    if args.activations:
        raise NanosaeError("a transcoder reads two sites at once: train it from --model (a cache holds one site)")
    target = args.target or "mlp_out"
    if "." in target and len(sites) > 1:
        raise NanosaeError(f"--target {target} names one site; with several sites give a kind (--target mlp_out)")
    out = {}
    for site in sites:
        layer, _ = parse_site(site)
        out[site] = target if "." in target or layer is None else f"blocks.{layer}.{target}"
        check_target(site, out[site])
    return out


def _init_from_defaults(args) -> None:
    """train --init-from: the SAE flags not given take the SAE's recipe, and --layer/--site its site."""
    import dataclasses

    from .sae import SAETrainConfig, arch_flag, load_sae, recipe_of

    init = load_sae(args.init_from)
    recipe = recipe_of(init)
    for f in dataclasses.fields(SAETrainConfig):
        if f.name not in args.given and f.name not in ("name", "kind"):
            value = arch_flag(recipe.arch, recipe.kind) if f.name == "arch" else getattr(recipe, f.name)
            setattr(args, f.name, [value] if f.name in SWEEP else value)
    if not args.given & {"layer", "site", "activations"} and init.cfg.hook_name:
        args.layer, args.site = None, init.cfg.hook_name
    if "target" not in args.given and init.cfg.hook_name_out:
        args.target = init.cfg.hook_name_out


def _resume_config(args):
    """The saved config of the run in --out, with the flags given on this command line (args.given): --tokens (a
    new length: more extends the run, finished or not), --log-every, --checkpoint-every, --eval-every and --device
    take effect; any other flag must agree with the saved run. A flag left out means the saved value: args is
    filled in with them, so the model and site load as for a new run."""
    import dataclasses

    from .hooks import parse_site
    from .sae import SAETrainConfig
    from .train import TrainConfig, changed_settings, read_checkpoint

    ckpt = read_checkpoint(args.out)
    saved = TrainConfig.from_dict(ckpt["config"])
    for dest, value in _saved_flags(saved).items():
        if dest not in args.given:
            setattr(args, dest, value)
    # a source given replaces the saved one (rather than meeting it in one command line)
    if "site" in args.given and "layer" not in args.given and ("." in args.site or args.site in ("embed", "final")):
        args.layer = None  # a full site name needs no layer
    if "layers" in args.given:  # --layers takes site kinds: the saved sites' kinds unless --site is given too
        args.layer = None
        if "site" not in args.given and saved.sites:
            args.site = ",".join(dict.fromkeys(parse_site(s)[1] for s in saved.sites))
    if "activations" in args.given and not args.given & {"model", "layer"}:
        args.model = args.layer = None
    if "model" in args.given and "activations" not in args.given:
        args.activations = None
    asked = _train_config(args)
    sae_flags = {f.name for f in dataclasses.fields(SAETrainConfig)}
    if not args.given & sae_flags:
        asked.saes = saved.saes  # exactly as saved (a run made in Python may have SAEs no flags can describe)
    differ = [k for k in changed_settings(asked, ckpt) if k != "tokens"]
    if differ:
        raise NanosaeError(
            f"--resume continues {args.out} with its saved settings, and these flags differ from it: "
            f"{_describe(differ, asked, saved, args.given)}; drop them, or give another --out to train a new run"
        )
    return asked


def _saved_flags(saved) -> dict:
    """The flag values that would have trained `saved` (a TrainConfig): what --resume reads for a flag not given."""
    import dataclasses

    from .hooks import parse_site
    from .sae import arch_flag

    flags = {f.name: getattr(saved, f.name) for f in dataclasses.fields(saved) if f.name not in ("saes", *SOURCE)}
    layer, kind = parse_site(saved.site) if saved.site else (None, "resid_post")
    flags.update(
        model=saved.model or None,
        step=saved.model_step,
        phase=saved.phase,
        tokenizer=saved.tokenizer,
        generation=saved.generation,
        device=saved.device,
        layer=None if saved.sites else layer,
        layers=None,
        site=",".join(saved.sites) if saved.sites else kind,
        data=saved.data or "builtin",
        seq_len=saved.seq_len,
        activations=saved.activations or None,
        target=parse_site(next(iter(saved.targets.values())))[1] if saved.targets else None,
    )
    for f in dataclasses.fields(saved.saes[0]):
        values = [getattr(s, f.name) for s in saved.saes]
        if f.name == "arch":
            values = [arch_flag(s.arch, s.kind) for s in saved.saes]
        if f.name == "sparsity_coeff":  # only the non-TopK SAEs took it (see _train_config)
            values = [v for v, s in zip(values, saved.saes) if s.arch not in ("topk", "batchtopk")] or [None]
        flags[f.name] = list(dict.fromkeys(values)) if f.name in SWEEP else values[0]
    return flags


def _describe(differ: list[str], asked, saved, given: set[str]) -> str:
    """The flags behind the settings `differ` (changed_settings' names), each with its saved value."""
    if "saes" in differ:  # name the SAE settings that differ
        pairs = list(zip(asked.saes, saved.saes)) if len(asked.saes) == len(saved.saes) else []
        fields = {k for a, b in pairs for k, v in vars(a).items() if getattr(b, k) != v} or set(SWEEP) & given
        differ = sorted(set(differ) - {"saes"} | fields)
    flags = {**_saved_flags(saved), "model_step": saved.model_step, "site": saved.site, "sites": saved.sites}
    flags["targets"] = list(saved.targets.values())
    parts = []
    for k in differ:
        values = flags[k] if isinstance(flags[k], list) else [flags[k]]
        shown = ",".join(
            "default" if v in (None, "", ()) else ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
            for v in values
        )
        flag = {
            "model_step": "--step",
            "site": "--layer/--site",
            "sites": "--layers/--site",
            "targets": "--target",
        }.get(k, "--" + k.replace("_", "-"))
        parts.append(f"{flag} (saved {shown})")
    return ", ".join(parts)


def cmd_train(args) -> None:
    from .distributed import dist_info, torchrun_group
    from .train import train

    cfg = _resume_config(args) if args.resume else _train_config(args)
    with torchrun_group(cfg.device) as cfg.device:  # under torchrun: each rank trains on its share of every batch
        args.device = cfg.device  # the model loads there too
        rank, world = dist_info()
        if cfg.activations:
            from .activations import cache_stream

            def stream_fn(state):
                return cache_stream(cfg.activations, cfg.batch_size, cfg.seed, rank, world, state)
        else:
            from .activations import model_stream, ranks_sites

            model, tok, _ = _load(args)
            if cfg.distribute_sites and len(cfg.sites) < world:
                raise NanosaeError(f"--distribute-sites needs a site per rank: {len(cfg.sites)} sites, {world} ranks")
            # with --distribute-sites this rank's stream gives whole global batches of the sites it owns
            owned = {"owned": ranks_sites(cfg.sites, world)[rank]} if cfg.distribute_sites else {}

            def stream_fn(state):
                return model_stream(
                    model,
                    tok,
                    cfg.sites or cfg.site,
                    cfg.data,
                    cfg.batch_size,
                    seq_len=cfg.seq_len,
                    seed=cfg.seed,
                    rank=rank,
                    world_size=world,
                    state=state,
                    targets=cfg.targets,
                    **owned,
                )

        eval_fn = None
        if cfg.eval_every and not cfg.activations:  # a short spliced-CE eval on held-out text, logged
            from .evaluate import make_train_eval

            eval_fn = make_train_eval(model, tok, cfg.data, n_tokens=8192)

        train(cfg, stream_fn, eval_fn=eval_fn, resume=args.resume)


def cmd_evolve(args) -> None:
    from .evolve import EvolveConfig, evolve
    from .sae import sae_folder

    cfg = _from_flags(EvolveConfig, args)
    chain = _chain_config(args) if args.chain else None
    out = args.out or (sae_folder(args.sae) / "evolve" if args.sae and not args.chain else "evolve-chain")
    data = None if args.data == "builtin" else args.data
    evolve(args.model, args.sae, out, cfg, data, args.tokenizer, chain, args.dashboard)


def _chain_config(args):
    """evolve --chain: the TrainConfig of the chain's first SAE (the SAE flags, or --sae's recipe to go on from)."""
    from .checkpoint import read_meta, resolve
    from .hooks import check_target, parse_site
    from .sae import SAETrainConfig, load_sae, recipe_of, split_arch
    from .train import TrainConfig

    init = load_sae(args.sae) if args.sae else None
    arch, kind = split_arch(args.arch)
    recipe = recipe_of(init) if init else _from_flags(SAETrainConfig, args, name="", arch=arch, kind=kind)
    if args.layer is not None:
        site = _site(args)
    elif init is not None:
        site = init.cfg.hook_name
    else:  # the middle layer, as demo picks
        n_layer = read_meta(resolve(args.model, phase=args.phases[0]).meta)["model_config"]["n_layer"]
        args.layer = n_layer // 2
        site = _site(args)
    target = init.cfg.hook_name_out if init is not None else ""
    if recipe.kind != "sae" and not target:  # a transcoder chain predicts the MLP output of its block
        target = f"blocks.{parse_site(site)[0]}.mlp_out"
        check_target(site, target)
    return TrainConfig(
        saes=[recipe],
        tokens=args.train_tokens,
        batch_size=args.train_batch_size,
        site=site,
        targets={site: target} if target else {},
        data=None if args.data == "builtin" else args.data,
        tokenizer=args.tokenizer,
        device=args.device,
        seed=args.seed,
    )


def _evolve_flags(p: argparse.ArgumentParser) -> None:
    from .evolve import EvolveConfig
    from .sae import SAETrainConfig

    p.add_argument("--sae", default=None, help=SAE_HELP + "; with --chain, the SAE the chain starts from")
    p.add_argument("--model", required=True, help="a nanochat base dir or checkpoint folder holding the series")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: <base>/tokenizer)")
    p.add_argument("--data", default="builtin", help="text/.jsonl/.parquet file or dir, or builtin")
    p.add_argument("--out", default=None, help="output folder (default: <SAE>/evolve, or evolve-chain with --chain)")
    p.add_argument("--dashboard", default=None, help="a nanosae viz folder whose header will link the page")
    _add_config_flags(p, EvolveConfig, split={"choices": ["train", "val", "all"]})
    g = p.add_argument_group("--chain: train an SAE on the first checkpoint, fine-tune it along the series")
    g.add_argument("--chain", action="store_true", help="train a chain of SAEs (SAE-Track) instead of following one")
    g.add_argument("--layer", type=int, default=None, help="block of the site (default: --sae's, else the middle)")
    g.add_argument("--site", default="resid_post", help="site kind or full site name")
    g.add_argument("--train-tokens", type=_token_count, default=2_000_000, help="the first SAE's training tokens")
    g.add_argument("--train-batch-size", type=int, default=4096, help="activations per training step")
    g.add_argument("--seed", type=int, default=0)
    _add_config_flags(g, SAETrainConfig, only=("arch", "k", "expansion", "d_sae", "lr", "target_l0", "sparsity_coeff"))


def cmd_compare(args) -> None:
    from .compare import check_same_site, compare, format_compare
    from .fileio import atomic_write_json
    from .sae import load_sae

    a, b = load_sae(args.sae_a), load_sae(args.sae_b)
    check_same_site(a, b)  # before any model loads
    models, rows, specials = None, None, ()
    if args.model:
        from .checkpoint import load_model
        from .data import token_tensor
        from .evaluate import special_token_ids

        model_a, tok, _ = _load(args)
        model_b = model_a
        if args.model_b or args.step_b is not None:
            model_b, _, _ = load_model(args.model_b or args.model, args.step_b, phase=args.phase, device=args.device)
        T = min(128, model_a.config.sequence_len)
        rows = token_tensor(tok, None if args.data == "builtin" else args.data, T, "val", -(-args.tokens // T))
        models, specials = (model_a, model_b), special_token_ids(tok)
    result = compare(a, b, models, rows, specials)
    print(format_compare(result))
    atomic_write_json(args.json, result)
    print(f"wrote {args.json}")


def _compare_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("sae_a", help="the first SAE (" + SAE_HELP + ")")
    p.add_argument("sae_b", help="the second SAE, at the same site")
    _model_args(p, required=False)
    p.add_argument("--model-b", default=None, help="the model B's latents are read on (default: --model)")
    p.add_argument("--step-b", type=int, default=None, help="checkpoint step for B (default: --step's)")
    p.add_argument("--data", default="builtin", help="text/.jsonl/.parquet file or dir, or builtin")
    p.add_argument("--tokens", type=_token_count, default=32_768, help="tokens for the activation correlation")
    p.add_argument("--json", default="compare.json", help="result path")


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
    from .server import ServedModel, serve

    args.model, args.phase, args.sae, args.dashboard = chat_defaults(
        args.model, args.phase, args.sae, args.dashboard, "serve"
    )
    model, tok, _ = _load(args)
    sae, units, labels = load_runtime(args.sae, model)
    given = {k: getattr(args, k) for k in ("temperature", "top_k", "max_tokens") if getattr(args, k) is not None}
    served = ServedModel(model, tok, sae, units, labels, args.dashboard, **given)  # the rest: ServedModel's defaults
    serve(served, args.host, args.port)


def _feature_flags(p, model_required: bool = True) -> None:
    """The flags of the feature statistics that viz, export and label read (or compute)."""
    from .features import FeatureConfig

    _model_args(p, model_required)
    p.add_argument("--data", default=None, help="text/.jsonl/.parquet file or dir (default: the built-in corpus)")
    _add_config_flags(p, FeatureConfig, only=("n_tokens", "seq_len", "batch_size"), flags={"n_tokens": "--tokens"})
    p.add_argument("--stats", default=None, help="feature statistics folder (default: <SAE>/feature_stats)")
    p.add_argument("--recompute", action="store_true", help="recompute the statistics even if saved ones match")


def _features(args):
    """(stats, sae) for viz/export/label: the saved statistics when they match, else one pass over the data."""
    from .features import FeatureConfig, load_or_compute
    from .sae import load_sae, sae_folder

    sae = load_sae(args.sae, args.device)  # fails fast on a bad SAE folder, before the model loads
    model, tok, _ = _load(args)
    sae = sae.to(model.device)
    stats = load_or_compute(
        model, tok, sae, sae_folder(args.sae), args.data, _from_flags(FeatureConfig, args), args.stats, args.recompute
    )
    print(stats.summary())
    return stats, sae


def cmd_viz(args) -> None:
    from .dashboard import write_dashboard
    from .labels import load_labels
    from .sae import sae_folder

    labels = load_labels(sae_folder(args.sae))
    stats, _ = _features(args)
    index = write_dashboard(stats, args.out, labels)
    print(f"wrote {index} ({stats.d_sae} latents, {len(labels)} labelled); open it in a browser")


def cmd_export_neuronpedia(args) -> None:
    from .labels import load_label_records
    from .neuronpedia import check_exportable, export_neuronpedia, names
    from .sae import load_sae, sae_folder

    check_exportable(load_sae(args.sae))  # before the model loads and the statistics are computed
    labels = load_label_records(sae_folder(args.sae))
    stats, sae = _features(args)
    n = names(stats, args.model_id, args.set_name)  # checks the ids before writing anything
    paths = export_neuronpedia(
        stats, sae, args.out, labels, n["model_id"], n["set_name"], args.creator, args.hf_repo, args.log_sparsity
    )
    print(f"Neuronpedia id {n['model_id']}/{n['source']}")
    for what, path in paths.items():
        print(f"  {what:9s} {path}")
    from .demo import command

    print(f"upload: {command()} export upload {args.out} --api-key KEY --send")


def cmd_export_upload(args) -> None:
    from .neuronpedia import upload

    upload(args.dir, args.api_base, args.api_key, args.send, not args.no_source_set)


def cmd_label(args) -> None:
    import os

    from .labels import auto_label, load_label_records, set_label
    from .sae import sae_folder

    folder = sae_folder(args.sae)
    if args.auto:
        if not args.api_base or not args.llm:
            raise NanosaeError("--auto needs --api-base (an OpenAI-compatible URL) and --llm (the model name)")
        if not args.model:
            raise NanosaeError("--auto needs --model (and --data) to find each latent's examples")
        stats, _ = _features(args)
        latents = args.latents if args.latents else range(stats.d_sae)
        key = args.api_key or os.environ.get("OPENAI_API_KEY")
        done = auto_label(stats, folder, args.api_base, key, args.llm, latents, args.overwrite)
        print(f"labelled {len(done)} latents in {folder / 'labels.json'}")
        return
    if args.index is None:
        for i, r in sorted(load_label_records(folder).items()):
            print(f"{i:6d}  {r['text']}" + (f"  (auto: {r['model']})" if r["source"] == "auto" else ""))
        return
    if not args.clear and args.text is None:
        raise NanosaeError('give the label text (nanosae label --sae DIR 123 "text") or --clear')
    set_label(folder, args.index, None if args.clear else args.text)
    print(f"latent {args.index}: {'label removed' if args.clear else args.text}")


def cmd_demo(args) -> None:
    from .demo import DemoConfig, run_demo

    run_demo(_from_flags(DemoConfig, args))


def _demo_flags(p: argparse.ArgumentParser) -> None:
    from .demo import DemoConfig

    _add_config_flags(p, DemoConfig)


def cmd_diff(args) -> None:
    from .diff import DiffConfig, run_diff

    run_diff(
        _from_flags(
            DiffConfig, args, model=tuple(args.model or ()), phase=tuple(args.phase or ()), step=tuple(args.step or ())
        )
    )


def _diff_flags(p: argparse.ArgumentParser) -> None:
    from .diff import DiffConfig

    p.add_argument(
        "--model",
        action="append",
        help="model A, then model B: checkpoint dir, base dir or .pt "
        "(default: the tiny base model and its chat model, trained or from the cache)",
    )
    p.add_argument(
        "--phase",
        action="append",
        choices=["base", "sft", "rl"],
        help="phase of each --model in order; one base dir with --phase twice diffs its two phases",
    )
    p.add_argument("--step", action="append", type=int, help="checkpoint step of each --model in order")
    _add_config_flags(p, DiffConfig, skip=("model", "phase", "step"), arch={"choices": ["crosscoder", "crosscoder_l1"]})


def _sample_flags(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--stop", action="store_true", help="stop at <|assistant_end|> or <|bos|>")


def _eval_flags(p: argparse.ArgumentParser) -> None:
    from .evaluate import evaluate

    p.add_argument("--sae", required=True, help=SAE_HELP)
    _model_args(p)
    p.add_argument("--data", default=None, help="text/.jsonl/.parquet file or dir (default: the built-in corpus)")
    p.add_argument("--split", choices=["train", "val", "all"], default="val")
    p.add_argument("--tokens", type=_token_count, default=_default(evaluate, "n_tokens"), help="tokens for metrics")
    p.add_argument("--ce-tokens", type=_token_count, default=None, help="tokens for CE/KL (default: --tokens / 10)")
    p.add_argument("--batch-size", type=int, default=_default(evaluate, "batch_size"), help="prompts per batch")
    p.add_argument("--context-size", type=int, default=None, help="default: 128, or the model's if shorter")
    p.add_argument("--saebench-compat", action="store_true", help="report SAEBench's EV and MSE formulas (quirks)")
    p.add_argument("--no-model-check", action="store_true", help="evaluate on a model other than the SAE's")
    p.add_argument("--json", default=None, help="result path (default: <SAE>/eval_core.json; PNG beside it)")


def _site_flags(p: argparse.ArgumentParser) -> None:
    """Where activations come from: a site of the model and the text it reads (collect, and train with --model)."""
    p.add_argument("--layer", type=int, default=None, help="block index of the site")
    p.add_argument("--layers", default=None, help="several layers from one pass: all, or a list like 0,4,8")
    p.add_argument(
        "--site",
        default="resid_post",
        help="site kind (resid_post, mlp_out, …) or full site name; comma lists and globs (blocks.*.resid_post) "
        "name several sites, read in one pass",
    )
    p.add_argument("--data", default="builtin", help="text/.jsonl/.parquet file or folder, or builtin")
    p.add_argument("--seq-len", type=int, default=None, help="context size (default: the model's)")


def _collect_flags(p: argparse.ArgumentParser) -> None:
    from .activations import _collect

    _model_args(p)
    _site_flags(p)
    p.add_argument("--tokens", type=_token_count, required=True, help="activations to collect (e.g. 2M)")
    p.add_argument("--out", required=True, help="cache folder; re-running the same command resumes it")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="storage dtype")
    p.add_argument("--batch-size", type=int, default=_default(_collect, "batch_size"), help="rows per forward")
    p.add_argument("--shard-tokens", type=_token_count, default=_default(_collect, "shard_tokens"), help="per shard")
    p.add_argument("--keep-bos", action="store_true", help="keep the <|bos|> positions (dropped by default)")


def _train_flags(p: argparse.ArgumentParser) -> None:
    from .sae import SAETrainConfig
    from .train import TrainConfig

    _model_args(p, required=False)
    _site_flags(p)
    p.add_argument("--activations", default=None, help="a cache folder from nanosae collect (instead of --model)")
    p.add_argument(
        "--target",
        default=None,
        help="transcoders: the site they predict from --site, in its block: a kind (default mlp_out) or a full name",
    )
    p.add_argument("--out", required=True, help="run folder: the SAE (or one subfolder per SAE), metrics, checkpoint")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out; flags left out keep the saved values, --tokens sets a new length",
    )
    g = p.add_argument_group("SAEs (comma lists train one SAE per combination)")
    b_dec_init = {"choices": ["geometric_median", "mean", "zero"]}
    d_sae = {"help": "number of latents (overrides --expansion)"}
    arch = {"help": "the training architecture: standard | april | topk | batchtopk | gated | jumprelu; transcoders: "
            "transcoder, skip_transcoder (BatchTopK) or <arch>_transcoder, <arch>_skip_transcoder"}  # fmt: skip
    _add_config_flags(
        g, SAETrainConfig, skip=("name", "kind"), sweep=SWEEP, b_dec_init=b_dec_init, d_sae=d_sae, arch=arch
    )
    g = p.add_argument_group("run")
    _add_config_flags(g, TrainConfig, skip=("saes", "out", *SOURCE))


def _chat_flags(p: argparse.ArgumentParser) -> None:
    from .chat import ChatSession

    _model_args(p, required=False)
    p.add_argument("--sae", default=None, help=CHAT_SAE_HELP)
    for name in ("temperature", "top_k", "max_tokens", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=SAMPLING_TYPES[name], default=_default(ChatSession, name))
    p.add_argument("--latents", type=int, default=_default(ChatSession, "top_n"), help="latents per token (0: none)")
    p.add_argument("--steer", action="append", metavar="ID:A", help="add A units of a latent's direction (123:+8)")
    p.add_argument("--clamp", action="append", metavar="ID:V", help="hold a latent at activation V (45:0)")
    p.add_argument("--ablate", action="append", metavar="ID", help="clamp a latent to 0")
    p.add_argument("--only-generated", action="store_true", help="steer generated tokens only, not the prompt")


def _serve_flags(p: argparse.ArgumentParser) -> None:
    _model_args(p, required=False)
    p.add_argument("--sae", default=None, help=CHAT_SAE_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dashboard", default=None, help="the --out folder of nanosae viz, linked from latents")
    # for requests that give none; left out: ServedModel's defaults (server.py, not imported here: fastapi is slow)
    for name in ("temperature", "top_k", "max_tokens"):
        p.add_argument(f"--{name.replace('_', '-')}", type=SAMPLING_TYPES[name], default=None)


def _viz_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help=SAE_HELP)
    _feature_flags(p)
    p.add_argument("--out", required=True, help="dashboard folder (index.html inside)")


def _export_flags(p: argparse.ArgumentParser) -> None:
    ex = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    q = ex.add_parser("neuronpedia", help="SAELens weights + SAEDashboard batches + the bulk-import layout")
    q.add_argument("--sae", required=True, help=SAE_HELP)
    _feature_flags(q)
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


def _label_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE folder")
    p.add_argument("index", type=int, nargs="?", help="latent id (none: list the labels)")
    p.add_argument("text", nargs="?", help="the label")
    p.add_argument("--clear", action="store_true", help="remove the latent's label")
    g = p.add_argument_group("automatic labels from an OpenAI-compatible chat endpoint (off unless --auto)")
    g.add_argument("--auto", action="store_true", help="label latents with a chat model from their top examples")
    g.add_argument("--api-base", default=None, help="e.g. http://127.0.0.1:8080/v1 (POSTs <base>/chat/completions)")
    g.add_argument("--api-key", default=None, help="bearer key (default: $OPENAI_API_KEY)")
    g.add_argument("--llm", default=None, help="model name the endpoint serves")
    g.add_argument("--latents", type=_comma_list(int), default=None, help="ids to label, e.g. 0,5,9 (default: all)")
    g.add_argument("--overwrite", action="store_true", help="replace earlier automatic labels (never human ones)")
    _feature_flags(g, model_required=False)


# the subcommands: name, help, the function that adds its flags, the function that runs it
COMMANDS = [
    (
        "demo",
        "the whole pipeline: tiny model (or --model) -> SAE -> eval -> dashboard -> export",
        _demo_flags,
        cmd_demo,
    ),
    (
        "diff",
        "model diffing: a crosscoder on two models (default: tiny base vs chat); what is whose, with a dashboard",
        _diff_flags,
        cmd_diff,
    ),
    ("sample", "generate text from a nanochat checkpoint", _sample_flags, cmd_sample),
    ("train-lm", "train the tiny nanochat model on CPU (cached) and print samples", _train_lm_flags, cmd_train_lm),
    (
        "train-sft",
        "fine-tune the tiny model into a chat model (cached) and print answers",
        _train_sft_flags,
        cmd_train_sft,
    ),
    ("eval", "SAEBench core metrics of an SAE spliced into its model (EV, L0, CE/KL, density)", _eval_flags, cmd_eval),
    ("collect", "cache activations at one site as checksummed safetensors shards", _collect_flags, cmd_collect),
    ("train", "train SAEs (topk, batchtopk, standard, april, gated, jumprelu) on activations", _train_flags, cmd_train),
    (
        "chat",
        "terminal chat showing each token's SAE latents, with steering (default: the tiny chat model)",
        _chat_flags,
        cmd_chat,
    ),
    (
        "serve",
        "local web app: streaming chat, per-token latents, steering, search (default: the tiny chat model)",
        _serve_flags,
        cmd_serve,
    ),
    (
        "evolve",
        "one SAE over a model's checkpoints, or a chain of SAEs trained along them (--chain)",
        _evolve_flags,
        cmd_evolve,
    ),
    (
        "compare",
        "match the latents of two SAEs at one site (decoder cosine, optimal matching, activation correlation)",
        _compare_flags,
        cmd_compare,
    ),
    ("viz", "write a self-contained HTML dashboard of every latent (opens from file://)", _viz_flags, cmd_viz),
    ("export", "export for Neuronpedia, or upload an export", _export_flags, None),
    ("label", "set, remove or list latent labels (labels.json in the SAE folder)", _label_flags, cmd_label),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nanosae", description="Sparse autoencoders for nanochat models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help, add_flags, run in COMMANDS:
        p = sub.add_parser(name, help=help)
        add_flags(p)
        if run is not None:
            p.set_defaults(func=run)
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
    return run(lambda: args.func(args))


def run(body) -> int:
    """body()'s exit status; a NanosaeError or Ctrl-C ends it in one line (exit 2 or 130), never a traceback."""
    try:
        return body() or 0
    except NanosaeError as e:
        print(f"nanosae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nanosae: interrupted", file=sys.stderr)
        return 130
