"""Find, load and save nanochat checkpoints in their real layout (docs/nanochat.md, "Files").

<base>/tokenizer/{tokenizer.pkl, token_bytes.pt}
<base>/{base,chatsft,chatrl}_checkpoints/<tag>/model_<step:06d>.pt + meta_<step:06d>.json

and Hugging Face folders of transformers' NanoChatForCausalLM (model_type "nanochat"): config.json,
model.safetensors or shards named by model.safetensors.index.json, tokenizer.json. They are read with
safetensors and json alone; transformers is never imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import NanosaeError
from .fileio import atomic_write, atomic_write_json, sha256_file, torch_load
from .gpt import GENERATIONS, GPT, Generation, GPTConfig, detect_generation
from .tokenizer import Tokenizer

PHASE_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
_MODEL_RE = re.compile(r"model_(\d+)\.pt")
_USAGE = (
    "pass a checkpoint dir (…/base_checkpoints/d20), a nanochat base dir (~/.cache/nanochat), a model_XXXXXX.pt "
    "or a Hugging Face nanochat folder (config.json + model.safetensors)"
)


@dataclass
class CheckpointFiles:
    model: Path
    meta: Path
    tokenizer_dir: Path
    tag: str
    step: int
    phase: str | None


@dataclass
class ModelInfo:
    """Where a loaded model came from; `name` is what SAE configs and exports call it (nanochat-d20)."""

    name: str
    path: str
    step: int | None  # None for a Hugging Face folder, which records no step
    phase: str | None
    generation: str
    fingerprint: str


def _steps(ckpt_dir: Path) -> list[int]:
    return sorted(int(m[1]) for f in ckpt_dir.iterdir() if (m := _MODEL_RE.fullmatch(f.name)))


def _pick_tag(phase_dir: Path) -> Path:
    # nanochat's rule: the d<N> folder with the largest N, else the most recently modified folder
    dirs = [d for d in phase_dir.iterdir() if d.is_dir() and _steps(d)]
    if not dirs:
        raise NanosaeError(f"{phase_dir}: holds no checkpoint folder with model_XXXXXX.pt files")
    numbered = [(int(m[1]), d) for d in dirs if (m := re.match(r"d(\d+)", d.name))]
    if numbered:
        return max(numbered, key=lambda t: t[0])[1]
    return max(dirs, key=lambda d: d.stat().st_mtime)


def resolve(
    path: str | os.PathLike, step: int | None = None, phase: str | None = None, tokenizer_dir=None
) -> CheckpointFiles:
    """Turn a user's path (file, checkpoint dir or base dir) into the model, meta and tokenizer files."""
    p = Path(path).expanduser()
    if not p.exists():
        raise NanosaeError(f"{p}: no such file or directory; {_USAGE}")
    if phase is not None and phase not in PHASE_DIRS:
        raise NanosaeError(f"unknown phase {phase!r}; choose one of {', '.join(PHASE_DIRS)}")
    if p.is_file():
        m = _MODEL_RE.fullmatch(p.name)
        if not m:
            raise NanosaeError(f"{p}: not a nanochat model file (model_XXXXXX.pt); {_USAGE}")
        if step is not None and int(m[1]) != step:
            raise NanosaeError(f"{p}: is step {int(m[1])}, but step {step} was asked for")
        ckpt_dir, step = p.parent, int(m[1])
    else:
        if _steps(p):
            ckpt_dir = p
        else:
            present = [ph for ph, d in PHASE_DIRS.items() if (p / d).is_dir()]
            if not present:
                raise NanosaeError(f"{p}: no model_XXXXXX.pt and no {'/'.join(PHASE_DIRS.values())} inside; {_USAGE}")
            chosen = phase or present[0]
            if chosen not in present:
                raise NanosaeError(f"{p}: has no {PHASE_DIRS[chosen]} (phases present: {', '.join(present)})")
            ckpt_dir = _pick_tag(p / PHASE_DIRS[chosen])
        steps = _steps(ckpt_dir)
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise NanosaeError(f"{ckpt_dir}: no model_{step:06d}.pt (steps present: {', '.join(map(str, steps))})")
    model_file = ckpt_dir / f"model_{step:06d}.pt"
    meta_file = ckpt_dir / f"meta_{step:06d}.json"
    found_phase = next((ph for ph, d in PHASE_DIRS.items() if ckpt_dir.parent.name == d), None)
    candidates = (
        [Path(tokenizer_dir)] if tokenizer_dir else [ckpt_dir / "tokenizer", ckpt_dir.parent.parent / "tokenizer"]
    )
    tok = next((c for c in candidates if (c / "tokenizer.pkl").is_file()), None)
    if tok is None:
        looked = ", ".join(str(c) for c in candidates)
        raise NanosaeError(f"no tokenizer.pkl for {model_file} (looked in {looked}); pass --tokenizer DIR")
    return CheckpointFiles(model_file, meta_file, tok, ckpt_dir.name, step, found_phase)


def checkpoint_steps(path: str | os.PathLike, phase: str | None = None) -> list[int]:
    """The steps saved in the checkpoint folder load_model(path, phase=phase) reads (a training run's series)."""
    return _steps(resolve(path, phase=phase).model.parent)


def read_meta(path: Path) -> dict:
    """meta_*.json as nanochat writes it (Python json, so `Infinity` may appear: Python's parser accepts it)."""
    if not path.is_file():
        raise NanosaeError(f"{path}: missing; nanochat writes meta_XXXXXX.json beside each model_XXXXXX.pt")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise NanosaeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise NanosaeError(f"{path}: has no model_config; is this a nanochat meta file?")
    return meta


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    sd = torch_load(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise NanosaeError(f"{path}: does not hold a state dict of tensors")
    return {k.removeprefix("_orig_mod."): v for k, v in sd.items()}


def config_from_meta(meta: dict, meta_path: Path) -> GPTConfig:
    cfg = dict(meta["model_config"])
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(cfg) - fields
    missing = fields - set(cfg) - {"window_pattern"}
    if unknown or missing:
        raise NanosaeError(
            f"{meta_path}: model_config keys do not match nanochat's GPTConfig "
            f"(unknown: {sorted(unknown)}, missing: {sorted(missing)})"
        )
    cfg.setdefault("window_pattern", "L")
    bad = [k for k, v in cfg.items() if not (isinstance(v, str) if k == "window_pattern" else type(v) is int and v > 0)]
    if bad:
        raise NanosaeError(f"{meta_path}: model_config has invalid values for {bad}; is this file corrupted?")
    if cfg["n_embd"] % cfg["n_head"] or cfg["n_head"] % cfg["n_kv_head"]:
        raise NanosaeError(
            f"{meta_path}: n_embd must divide by n_head and n_head by n_kv_head; is this file corrupted?"
        )
    return GPTConfig(**cfg)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """nanochat's COMPUTE_DTYPE rule: bf16 on CUDA with SM >= 80, fp32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float32


def build_model(
    sd: dict[str, torch.Tensor],
    config: GPTConfig,
    generation: str | Generation,
    device="cpu",
    dtype=torch.float32,
    where="",
) -> GPT:
    """A GPT holding `sd` (checked key by key and shape by shape), in compute `dtype` on `device`."""
    if isinstance(generation, str) and generation not in GENERATIONS:
        raise NanosaeError(f"unknown generation {generation!r}; choose one of {', '.join(GENERATIONS)}")
    gen = GENERATIONS[generation] if isinstance(generation, str) else generation
    sd = dict(sd)
    if "transformer.wte.weight" not in sd:
        raise NanosaeError(f"{where}: no transformer.wte.weight; is this a nanochat checkpoint?")
    if gen.lambdas and "resid_lambdas" not in sd:  # nanochat patches these the same way
        sd["resid_lambdas"] = torch.ones(config.n_layer)
        sd["x0_lambdas"] = torch.zeros(config.n_layer)
    wte = sd["transformer.wte.weight"]
    padded_vocab = wte.shape[0] if wte.dim() == 2 else 0
    if padded_vocab < config.vocab_size:
        raise NanosaeError(
            f"{where}: transformer.wte.weight has shape {tuple(wte.shape)} but the meta says vocab_size "
            f"{config.vocab_size}; the model and meta files do not belong together"
        )
    try:
        with torch.device("meta"):
            model = GPT(config, gen, padded_vocab=padded_vocab)
    except NanosaeError as e:
        raise NanosaeError(f"{where}: {e}") from None
    expected = model.state_dict()
    unknown, missing = sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd))
    if unknown or missing:
        raise NanosaeError(
            f"{where}: keys do not fit a {gen.name!r} nanochat GPT with {config.n_layer} layers "
            f"(unexpected: {unknown[:4]}, missing: {missing[:4]}); check the checkpoint or --generation"
        )
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise NanosaeError(
                f"{where}: {k} has shape {tuple(sd[k].shape)} but the meta config implies {tuple(v.shape)}"
            )
    # assign=True swaps the meta tensors for the loaded ones (no to_empty: on meta it costs a second of imports)
    model.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in sd.items()}, assign=True)
    model.cos, model.sin = (t.to(device) for t in model._rope_tables(model.cos.size(1)))
    model.set_compute_dtype(dtype)
    model.eval().requires_grad_(False)
    return model


def model_fingerprint(path: Path) -> str:
    """Cheap identity of a checkpoint file: size plus sha256 of its first 16 MiB (the scalars and embeddings)."""
    return f"{path.stat().st_size}-{sha256_file(path, limit=16 << 20)[:16]}"


def model_depth(path: str | os.PathLike, step: int | None = None, phase: str | None = None) -> int:
    """The number of blocks of the model load_model(path, step, phase=phase) loads, from its config alone (to name
    every layer's sites before the weights are read)."""
    if (folder := hf_folder(path)) is not None:
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise NanosaeError(f"{folder / 'config.json'}: not valid JSON ({e}); copy it again") from None
        return hf_architecture(cfg, folder / "config.json")[0].n_layer
    files = resolve(path, step, phase)
    return config_from_meta(read_meta(files.meta), files.meta).n_layer


def load_model(
    path: str | os.PathLike,
    step: int | None = None,
    *,
    phase: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    generation: str | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
) -> tuple[GPT, Tokenizer, dict]:
    """Load a nanochat checkpoint or Hugging Face nanochat folder: (model in eval mode, tokenizer, meta dict).
    The model carries `.info`."""
    if (folder := hf_folder(path)) is not None:
        return load_hf_model(
            folder, step, phase=phase, device=device, dtype=dtype, generation=generation, tokenizer_dir=tokenizer_dir
        )
    files = resolve(path, step, phase, tokenizer_dir)
    meta = read_meta(files.meta)
    config = config_from_meta(meta, files.meta)
    sd = read_state_dict(files.model)
    gen = generation or detect_generation(sd, meta["model_config"])
    model = build_model(sd, config, gen, device, dtype or default_dtype(device), where=str(files.model))
    tokenizer = Tokenizer.from_dir(files.tokenizer_dir)
    if tokenizer.vocab_size != config.vocab_size:
        raise NanosaeError(
            f"{files.tokenizer_dir / 'tokenizer.pkl'}: has {tokenizer.vocab_size} tokens but {files.meta} says "
            f"vocab_size {config.vocab_size}; use the tokenizer this model was trained with"
        )
    suffix = "" if files.phase in (None, "base") else f"-{files.phase}"
    model.info = ModelInfo(
        name=f"nanochat-{files.tag}{suffix}",
        path=str(files.model),
        step=files.step,
        phase=files.phase,
        generation=gen,
        fingerprint=model_fingerprint(files.model),
    )
    return model, tokenizer, meta


# ---------------------------------------------------------------------------- Hugging Face nanochat folders

HF_WEIGHTS, HF_INDEX = "model.safetensors", "model.safetensors.index.json"
# transformers' names of the block weights -> nanochat's
_HF_BLOCK_NAMES = {
    "self_attn.q_proj": "attn.c_q",
    "self_attn.k_proj": "attn.c_k",
    "self_attn.v_proj": "attn.c_v",
    "self_attn.o_proj": "attn.c_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def hf_folder(path: str | os.PathLike) -> Path | None:
    """The Hugging Face model folder `path` names (the folder, its config.json or a weights file), else None.
    A folder holding model_XXXXXX.pt files stays a nanochat checkpoint dir even with a config.json beside them."""
    p = Path(path).expanduser()
    if p.is_file() and (p.name == "config.json" or p.name.endswith((".safetensors", ".safetensors.index.json"))):
        p = p.parent
    return p if p.is_dir() and (p / "config.json").is_file() and not _steps(p) else None


def _hf_name(folder: Path) -> str:
    """The folder's name; for a hub cache snapshot (models--org--name/snapshots/<commit>) the repository's."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.split("--")[-1]
    return folder.name


def hf_architecture(cfg: dict, where: Path) -> tuple[GPTConfig, Generation, bool]:
    """(config, generation, tied embeddings) for a transformers NanoChatConfig dict, with transformers' defaults
    for absent keys. vocab_size is the embedding rows. What nanochat's GPT cannot compute is refused."""
    if cfg.get("model_type") != "nanochat":
        raise NanosaeError(
            f"{where}: model_type is {cfg.get('model_type')!r}, not 'nanochat'; nanosae reads nanochat models "
            "(transformers' NanoChatForCausalLM) only"
        )

    def get(key, default):
        return default if cfg.get(key) is None else cfg[key]

    sizes = {
        "vocab_size": get("vocab_size", 50304),
        "hidden_size": get("hidden_size", 768),
        "intermediate_size": get("intermediate_size", 8192),
        "num_hidden_layers": get("num_hidden_layers", 12),
        "num_attention_heads": get("num_attention_heads", 6),
        "max_position_embeddings": get("max_position_embeddings", 2048),
    }
    sizes["num_key_value_heads"] = get("num_key_value_heads", sizes["num_attention_heads"])
    # transformers 5 writes rope_parameters; older configs kept rope_theta at the top and scaling in rope_scaling
    rope = get("rope_parameters", None) or get("rope_scaling", None) or {}
    cap = cfg.get("final_logit_softcapping", 15.0)  # absent: transformers' default; null: no softcap
    reals = {
        "rms_norm_eps": get("rms_norm_eps", 1e-6),
        "rope_theta": rope.get("rope_theta", get("rope_theta", 10000.0)) if isinstance(rope, dict) else None,
        "final_logit_softcapping": 1.0 if cap is None else cap,
    }
    bad = [k for k, v in sizes.items() if not (type(v) is int and v > 0)]
    bad += [k for k, v in reals.items() if not (type(v) in (int, float) and (v > 0 or k == "rms_norm_eps" and v == 0))]
    if bad:
        raise NanosaeError(f"{where}: invalid values for {bad}; is this file corrupted?")
    C, H, KV = sizes["hidden_size"], sizes["num_attention_heads"], sizes["num_key_value_heads"]
    unsupported = {
        "hidden_act": get("hidden_act", "relu2") != "relu2",
        "attention_bias": bool(get("attention_bias", False)),
        "intermediate_size": sizes["intermediate_size"] != 4 * C,
        "head_dim": get("head_dim", C // H) != C // H or C % H != 0 or H % KV != 0,
        "rope_type": rope.get("rope_type", rope.get("type", "default")) != "default",
    }
    if any(unsupported.values()):
        odd = [k for k, v in unsupported.items() if v]
        raise NanosaeError(
            f"{where}: {', '.join(odd)} differ from nanochat's architecture (relu2 MLP of width 4 x hidden_size, "
            "no attention bias, head_dim = hidden_size / heads dividing by the key/value heads, plain RoPE); "
            "nanosae reads nanochat models only"
        )
    config = GPTConfig(
        sequence_len=sizes["max_position_embeddings"],
        vocab_size=sizes["vocab_size"],
        n_layer=sizes["num_hidden_layers"],
        n_head=H,
        n_kv_head=KV,
        n_embd=C,
    )
    gen = dataclasses.replace(
        GENERATIONS["hf"],
        rope_base=float(reals["rope_theta"]),
        softcap=0.0 if cap is None else float(cap),
        norm_eps=float(reals["rms_norm_eps"]),
    )
    return config, gen, bool(get("tie_word_embeddings", False))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(path.read_bytes())  # from bytes, not mmap: see read_state_dict
    except FileNotFoundError:
        raise NanosaeError(f"{path}: missing; copy every weights file of the model") from None
    except Exception:
        raise NanosaeError(f"{path}: not a readable safetensors file (corrupt or truncated? copy it again)") from None


def read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """(all tensors, the files they came from): model.safetensors, or the shards its index names."""
    index = folder / HF_INDEX
    if not index.is_file():
        single = folder / HF_WEIGHTS
        if not single.is_file():
            raise NanosaeError(
                f"{folder}: no {HF_WEIGHTS} or {HF_INDEX}; copy the weights too (saved with safetensors, "
                "save_pretrained's default)"
            )
        return _read_safetensors(single), [single]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        ok = all(isinstance(k, str) and isinstance(f, str) and Path(f).name == f for k, f in weight_map.items())
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise NanosaeError(f"{index}: not a safetensors index (a weight_map of tensor -> shard file); copy it again")
    files = [folder / f for f in sorted(set(weight_map.values()))]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(_read_safetensors(f))
    absent = [k for k in weight_map if k not in sd]
    if absent:
        raise NanosaeError(f"{index}: names tensors no shard holds ({absent[:3]}); copy the shards again")
    return sd, files


def hf_state_dict(sd: dict[str, torch.Tensor], config: GPTConfig, tied: bool, where: Path) -> dict[str, torch.Tensor]:
    """nanochat's names for transformers' NanoChatForCausalLM tensors, checked name by name and shape by shape."""
    C, V = config.n_embd, config.vocab_size
    kv = config.n_kv_head * (C // config.n_head)
    shapes = {"model.embed_tokens.weight": (V, C)} | ({} if tied else {"lm_head.weight": (V, C)})
    for i in range(config.n_layer):
        block = {"q_proj": (C, C), "k_proj": (kv, C), "v_proj": (kv, C), "o_proj": (C, C)}
        shapes |= {f"model.layers.{i}.self_attn.{k}.weight": v for k, v in block.items()}
        shapes |= {f"model.layers.{i}.mlp.fc1.weight": (4 * C, C), f"model.layers.{i}.mlp.fc2.weight": (C, 4 * C)}
    if tied:  # transformers uses the embedding as the unembedding, whatever the file holds
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    unknown, missing = sorted(set(sd) - set(shapes)), sorted(set(shapes) - set(sd))
    if unknown or missing:
        raise NanosaeError(
            f"{where}: tensors do not fit the {config.n_layer}-layer nanochat model config.json describes "
            f"(unexpected: {unknown[:4]}, missing: {missing[:4]}); the weights and config.json do not belong together"
        )
    for k, shape in shapes.items():
        if tuple(sd[k].shape) != shape:
            raise NanosaeError(
                f"{where}: {k} has shape {tuple(sd[k].shape)} but config.json implies {shape}; the weights and "
                "config.json do not belong together"
            )
    wte = sd["model.embed_tokens.weight"]
    out = {"transformer.wte.weight": wte, "lm_head.weight": wte if tied else sd["lm_head.weight"]}
    for k, v in sd.items():
        if m := re.fullmatch(r"model\.layers\.(\d+)\.(\w+\.\w+)\.weight", k):
            out[f"transformer.h.{m[1]}.{_HF_BLOCK_NAMES[m[2]]}.weight"] = v
    return out


def load_hf_model(
    folder: Path,
    step: int | None = None,
    *,
    phase: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    generation: str | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
) -> tuple[GPT, Tokenizer, dict]:
    """A folder of transformers' NanoChatForCausalLM as a GPT computing what transformers computes (the 'hf'
    generation, with config.json's RoPE base, softcap and norm epsilon); meta holds config.json as `hf_config`."""
    for flag, value in (("--step", step), ("--phase", phase)):
        if value is not None:
            raise NanosaeError(f"{folder}: a Hugging Face model folder holds one model; drop {flag}")
    if generation not in (None, "hf"):
        raise NanosaeError(
            f"{folder}: a Hugging Face nanochat model runs transformers' architecture (generation 'hf'); "
            f"drop --generation {generation}"
        )
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise NanosaeError(f"{cfg_path}: not valid JSON ({e}); copy it again") from None
    if not isinstance(cfg, dict):
        raise NanosaeError(f"{cfg_path}: not a model config (a JSON object); copy it again")
    config, gen, tied = hf_architecture(cfg, cfg_path)
    if tokenizer_dir is None and not (folder / "tokenizer.json").is_file():
        raise NanosaeError(f"{folder}: no tokenizer.json; copy it from the model's repository or pass --tokenizer DIR")
    tokenizer = Tokenizer.from_dir(tokenizer_dir or folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise NanosaeError(
            f"{Path(tokenizer_dir or folder)}: the tokenizer has {tokenizer.vocab_size} tokens but {cfg_path} says "
            f"vocab_size {config.vocab_size}; use the tokenizer this model was trained with"
        )
    sd, files = read_hf_weights(folder)
    sd = hf_state_dict(sd, config, tied, folder)
    config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)  # rows beyond it: padding
    model = build_model(sd, config, gen, device, dtype or default_dtype(device), where=str(folder))
    prints = [model_fingerprint(f) for f in files]
    size = sum(f.stat().st_size for f in files)
    fingerprint = (
        prints[0] if len(prints) == 1 else f"{size}-{hashlib.sha256(' '.join(prints).encode()).hexdigest()[:16]}"
    )
    model.info = ModelInfo(
        name=_hf_name(folder), path=str(folder), step=None, phase=None, generation="hf", fingerprint=fingerprint
    )
    return model, tokenizer, {"model_config": dataclasses.asdict(config), "hf_config": cfg}


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model: GPT, meta: dict) -> Path:
    """Write model_<step>.pt (plain fp32 state dict, nanochat's key order) and meta_<step>.json atomically."""
    ckpt_dir = Path(ckpt_dir)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    path = atomic_write(ckpt_dir / f"model_{step:06d}.pt", lambda f: torch.save(sd, f))
    meta = {"step": step, **meta}
    meta.update(step=step, model_config=dataclasses.asdict(model.config))  # the caller's meta may be stale
    atomic_write_json(ckpt_dir / f"meta_{step:06d}.json", meta)
    return path
