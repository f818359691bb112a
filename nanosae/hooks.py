"""Named sites in the nanochat GPT, and the small API to read or replace activations there.

Sites: `embed` (normed, smeared token embedding = x0), per layer i `blocks.{i}.resid_pre` (block input after
the lambda mix), `.attn_out`, `.resid_mid`, `.mlp_in` (normed resid_mid: what the MLP reads, a transcoder's
input), `.mlp_hidden` (after relu²), `.mlp_out`, `.resid_post` (block
output), and `final` (normed input of lm_head). SAELens/TransformerLens names (`blocks.{i}.hook_resid_post`,
`blocks.{i}.mlp.hook_post`, `hook_embed`, `ln_final.hook_normalized`) are accepted everywhere.

A hook is f(x, start) -> replacement or None, where x is (B, T, d) and `start` the absolute position of
x[:, 0] (the KV-cache offset in decode steps, 0 in full forwards).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from .errors import NanosaeError
from .gpt import GPT, HookFn

LAYER_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_hidden", "mlp_out", "resid_post")
GLOBAL_SITES = ("embed", "final")
_SAELENS = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "ln2.hook_normalized": "mlp_in",
    "mlp.hook_post": "mlp_hidden",
}
_SAELENS_GLOBAL = {"hook_embed": "embed", "ln_final.hook_normalized": "final"}
_LAYER_RE = re.compile(r"blocks\.(\d+)\.(.+)")


def site_name(layer: int, kind: str = "resid_post") -> str:
    if kind in GLOBAL_SITES:
        return kind
    if kind not in LAYER_SITES:
        raise NanosaeError(f"unknown site {kind!r}; choose one of {', '.join(LAYER_SITES + GLOBAL_SITES)}")
    return f"blocks.{layer}.{kind}"


def parse_site(name: str) -> tuple[int | None, str]:
    """(layer, kind) of a nanosae or SAELens site name; layer is None for embed/final."""
    name = _SAELENS_GLOBAL.get(name, name)
    if name in GLOBAL_SITES:
        return None, name
    m = _LAYER_RE.fullmatch(name)
    kind = m and _SAELENS.get(m[2], m[2])
    if not m or kind not in LAYER_SITES:
        raise NanosaeError(
            f"unknown site {name!r}; use blocks.<layer>.<{'|'.join(LAYER_SITES)}>, embed or final "
            "(SAELens names like blocks.<layer>.hook_resid_post work too)"
        )
    return int(m[1]), kind


def canonical_site(name: str, model: GPT | None = None) -> str:
    """The nanosae name of a site, checked against the model's depth when a model is given."""
    layer, kind = parse_site(name)
    if model is not None and layer is not None and layer >= model.config.n_layer:
        raise NanosaeError(f"site {name!r}: the model has layers 0..{model.config.n_layer - 1}; pick one of those")
    return kind if layer is None else f"blocks.{layer}.{kind}"


def saelens_hook_name(site: str) -> str:
    """The TransformerLens hook name SAELens configs use for a site."""
    layer, kind = parse_site(site)
    if layer is None:
        return {v: k for k, v in _SAELENS_GLOBAL.items()}[kind]
    return f"blocks.{layer}.{ {v: k for k, v in _SAELENS.items()}[kind] }"


def site_width(model: GPT, site: str) -> int:
    _, kind = parse_site(site)
    return 4 * model.config.n_embd if kind == "mlp_hidden" else model.config.n_embd


def expand_sites(spec: str, n_layer: int, layers: str | None = None) -> list[str]:
    """The sites a --site/--layers pair names, in forward order: with layers ("all" or "0,5,7") the site kinds of
    spec (resid_post, or a comma list) at each of those layers; without, spec's comma-separated site names, where
    `*` matches any layer (blocks.*.resid_post)."""
    all_layers = range(n_layer)
    if layers is not None:
        if layers.strip() == "all":
            picked = list(all_layers)
        else:
            try:
                picked = [int(v) for v in layers.split(",") if v.strip()]
            except ValueError:
                raise NanosaeError(f"--layers {layers!r}: give all or a comma list of layers, e.g. 0,3,5") from None
        if bad := [i for i in picked if not 0 <= i < n_layer]:
            raise NanosaeError(f"--layers {bad[0]}: the model has layers 0..{n_layer - 1}; pick some of those")
        kinds = [k.strip() for k in spec.split(",") if k.strip()]
        if any("." in k or k in GLOBAL_SITES for k in kinds):
            raise NanosaeError(f"--layers takes site kinds (--site resid_post,mlp_out), not full names like {spec!r}")
        names = [site_name(i, k) for i in picked for k in kinds]
    else:
        every = ["embed", *(f"blocks.{i}.{k}" for i in all_layers for k in LAYER_SITES), "final"]
        names = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            if "*" in part:
                got = [s for s in every if fnmatch.fnmatchcase(s, part)]
                if not got:
                    raise NanosaeError(f"--site {part!r} matches no site; e.g. blocks.*.resid_post")
                names += got
            else:
                names.append(part)
    names = [canonical_site(s) for s in names]
    for s in names:
        layer, _ = parse_site(s)
        if layer is not None and layer >= n_layer:
            raise NanosaeError(f"site {s!r}: the model has layers 0..{n_layer - 1}; pick one of those")

    def depth(s: str) -> tuple[int, int]:
        layer, kind = parse_site(s)
        if layer is None:
            return (-1 if kind == "embed" else n_layer, 0)
        return (layer, LAYER_SITES.index(kind))

    return sorted(dict.fromkeys(names), key=depth)


def check_target(site: str, target: str) -> None:
    """A one-line error unless a transcoder can read `site` and predict `target`: a later site of the same block."""
    (layer, kind), (t_layer, t_kind) = parse_site(site), parse_site(target)
    example = f"e.g. --site blocks.{layer or 0}.mlp_in --target blocks.{layer or 0}.mlp_out"
    if layer is None or t_layer is None:
        raise NanosaeError(f"a transcoder reads and writes sites of one block, not {site} -> {target}; {example}")
    if t_layer != layer:
        raise NanosaeError(
            f"--target {target} is in block {t_layer} but the input {site} in block {layer}: a transcoder reads and "
            f"writes within one block (cross-layer transcoders are not supported); {example}"
        )
    if LAYER_SITES.index(t_kind) <= LAYER_SITES.index(kind):
        what = "is the input site itself" if t_kind == kind else f"comes before {site} in the forward"
        raise NanosaeError(
            f"--target {target} {what}; a transcoder predicts a later site from an earlier one ({example}), and an "
            "SAE (no --target) reconstructs its own site"
        )


def sae_site(model: GPT, sae, check_model: bool = False) -> str:
    """The site an SAE (anything with cfg.hook_name, cfg.d_in, cfg.model_name) reads on this model, after checking
    the model has it at the SAE's width, and with check_model that the SAE was trained on a model of this name."""
    cfg = sae.cfg
    if not cfg.hook_name:
        raise NanosaeError("the SAE's cfg.json names no hook site; set metadata.hook_name, e.g. blocks.2.resid_post")
    site = canonical_site(cfg.hook_name, model)
    width = site_width(model, site)
    if width != cfg.d_in:
        raise NanosaeError(
            f"the SAE reads {cfg.d_in}-wide activations but {site} of this model is {width} wide; "
            "use the model the SAE was trained on"
        )
    if getattr(cfg, "transcoder", False):
        out_site(model, sae)
    info = getattr(model, "info", None)
    if check_model and cfg.model_name and info is not None and info.name != cfg.model_name:
        raise NanosaeError(
            f"the SAE was trained on {cfg.model_name} but the model is {info.name}; pass that model "
            "(or --no-model-check / check_model=False to go ahead anyway)"
        )
    return site


def out_site(model: GPT, sae) -> str:
    """The site an SAE writes: a transcoder's output site (checked against the model at its width d_out), else the
    site it reads."""
    cfg = sae.cfg
    if not getattr(cfg, "transcoder", False):
        return canonical_site(cfg.hook_name, model)
    if not cfg.hook_name_out:
        raise NanosaeError(
            "the transcoder's cfg.json names no output site; set metadata.hook_name_out, e.g. blocks.2.hook_mlp_out"
        )
    site = canonical_site(cfg.hook_name_out, model)
    if site_width(model, site) != cfg.d_out:
        raise NanosaeError(
            f"the transcoder writes {cfg.d_out}-wide activations but {site} of this model is "
            f"{site_width(model, site)} wide; use the model it was trained on"
        )
    return site


def where(model: GPT, sae) -> str:
    """Where an SAE works, for people: its site, or a transcoder's "input -> output" sites."""
    site, out = sae_site(model, sae), out_site(model, sae)
    return site if out == site else f"{site} -> {out}"


def last_layer(sites: Iterable[str], model: GPT) -> int | None:
    """The block after which a forward can stop and still pass every site (-1: the embedding; None: all)."""
    layers = []
    for s in sites:
        layer, kind = parse_site(s)
        if kind == "final":
            return None
        layers.append(-1 if layer is None else layer)
    if not layers:
        return None
    deepest = max(layers)
    return None if deepest >= model.config.n_layer - 1 else deepest


@contextmanager
def add_hooks(model: GPT, fns: dict[str, HookFn | list[HookFn]]) -> Iterator[GPT]:
    """Register hooks for the duration of the block; they run in registration order at each site."""
    added: list[tuple[str, HookFn]] = []
    try:
        for site, f in fns.items():
            site = canonical_site(site, model)
            for fn in f if isinstance(f, list) else [f]:
                model.hooks.setdefault(site, []).append(fn)
                added.append((site, fn))
        yield model
    finally:
        for site, fn in added:
            model.hooks[site].remove(fn)
            if not model.hooks[site]:
                del model.hooks[site]


class Capture(dict):
    """site -> list of activations, one tensor per forward (prefill, then each decode step)."""

    def cat(self, site: str) -> torch.Tensor:
        """All captured positions of a site concatenated along the sequence axis: (B, T_total, d)."""
        return torch.cat(self[canonical_site(site)], dim=1)


@contextmanager
def capture(model: GPT, sites: Iterable[str], fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Record (a function of) the activations at `sites` on every forward inside the block."""
    got = Capture()
    names = [canonical_site(s, model) for s in sites]

    def recorder(site: str) -> HookFn:
        def record(x: torch.Tensor, start: int) -> None:
            got.setdefault(site, []).append(x.detach() if fn is None else fn(x.detach()))

        return record

    with add_hooks(model, {s: recorder(s) for s in names}):
        yield got


def run_with_cache(
    model: GPT, idx: torch.Tensor, sites: Iterable[str], stop_early: bool = True
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """One forward returning (logits or None, {site: activation}); stops after the deepest site if allowed."""
    sites = [canonical_site(s, model) for s in sites]
    stop = last_layer(sites, model) if stop_early else None
    with capture(model, sites) as got:
        logits = model(idx, stop_after_layer=stop)
    return logits, {s: got[s][0] for s in sites}
