"""Latent labels: <sae_dir>/labels.json maps a latent index to its label text, {"123": "mentions of dogs"}. Set
them with `nanosae label`, by editing the file, or (optionally) with an OpenAI-compatible chat model. Automatic
labels are recorded in labels_auto.json beside it ({"123": {"text": ..., "model": ...}}); a label counts as
automatic only while its text is still the one recorded there, so editing it by hand makes it a human label."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import NanosaeError
from .fileio import atomic_write_json

LABELS_FILE = "labels.json"
AUTO_FILE = "labels_auto.json"
MAX_LABEL = 512  # Neuronpedia's limit on an explanation


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return {int(k): v for k, v in raw.items()}
    except (ValueError, TypeError) as e:
        raise NanosaeError(
            f'{path}: not a labels file ({e}); it should map latent ids to text, {{"12": "..."}}'
        ) from None


def load_labels(sae_dir: str | os.PathLike) -> dict[int, str]:
    """{latent index: label text} for an SAE folder ({} when it has no labels)."""
    path = Path(sae_dir) / LABELS_FILE
    out = _read(path)
    for i, v in out.items():
        if not isinstance(v, str):
            raise NanosaeError(f"{path}: the label of latent {i} is not text; labels map ids to strings")
    return {i: v for i, v in out.items() if v.strip()}


def load_label_records(sae_dir: str | os.PathLike) -> dict[int, dict]:
    """{index: {"text", "source" ("human" or "auto"), "model"}}: the labels with where they came from."""
    auto = _read(Path(sae_dir) / AUTO_FILE)
    out = {}
    for i, text in load_labels(sae_dir).items():
        a = auto.get(i)
        is_auto = isinstance(a, dict) and a.get("text") == text
        out[i] = {"text": text, "source": "auto" if is_auto else "human", "model": a.get("model") if is_auto else None}
    return out


def _d_sae(sae_dir: Path) -> int | None:
    try:
        return int(json.loads((sae_dir / "cfg.json").read_text())["d_sae"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def set_label(sae_dir: str | os.PathLike, index: int, text: str | None, model: str | None = None) -> None:
    """Set (or, with text None/empty, remove) the label of one latent; `model` marks it as that model's answer."""
    sae_dir = Path(sae_dir)
    if not sae_dir.is_dir():
        raise NanosaeError(f"{sae_dir}: no such SAE folder")
    d_sae = _d_sae(sae_dir)
    if index < 0 or (d_sae is not None and index >= d_sae):
        raise NanosaeError(f"latent {index} does not exist; this SAE has latents 0..{(d_sae or 1) - 1}")
    labels, auto = load_labels(sae_dir), _read(sae_dir / AUTO_FILE)
    text = (text or "").strip()
    if len(text) > MAX_LABEL:
        raise NanosaeError(f"a label is at most {MAX_LABEL} characters (got {len(text)})")
    labels.pop(index, None)
    auto.pop(index, None)
    if text:
        labels[index] = text
        if model:
            auto[index] = {"text": text, "model": model}
    atomic_write_json(sae_dir / LABELS_FILE, {str(i): labels[i] for i in sorted(labels)})
    if auto or (sae_dir / AUTO_FILE).exists():
        atomic_write_json(sae_dir / AUTO_FILE, {str(i): auto[i] for i in sorted(auto)})


def _prompt(stats, i: int, n_examples: int = 8) -> str:
    vocab = stats.vocab
    lines = []
    for e in stats.examples(i)[:n_examples]:
        toks = [vocab[t] for t in e["tokens"]]
        toks[e["index"]] = f"<<{toks[e['index']]}>>"
        lines.append("".join(toks).replace("\n", "\\n"))
    promoted = ", ".join(repr(t) for t, _ in stats.logits(i)[:8])
    return (
        "Below are text excerpts where one latent of a sparse autoencoder on a language model fires strongly; "
        "the token it fires on is marked <<like this>>.\n\n"
        + "\n".join(f"{k + 1}. {line}" for k, line in enumerate(lines))
        + f"\n\nTokens it promotes in the output: {promoted}\n\n"
        "Reply with a short label (at most 8 words) for what it detects, and nothing else."
    )


def chat_completion(api_base: str, api_key: str | None, model: str, prompt: str, timeout: float = 60) -> str:
    """One request to an OpenAI-compatible /chat/completions endpoint; the reply's text."""
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You name features of neural networks concisely."},
            {"role": "user", "content": prompt},
        ],
        "temperature": 0,
        "max_tokens": 40,
    }
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    url = api_base.rstrip("/") + "/chat/completions"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            reply = json.loads(r.read())
        return str(reply["choices"][0]["message"]["content"])
    except urllib.error.HTTPError as e:
        raise NanosaeError(f"{url} answered HTTP {e.code}; check --api-base, --api-key and --llm") from None
    except (urllib.error.URLError, OSError) as e:
        raise NanosaeError(f"{url}: cannot connect ({e}); check --api-base") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise NanosaeError(f"{url}: the reply is not an OpenAI-style chat completion") from None


def auto_label(
    stats,
    sae_dir: str | os.PathLike,
    api_base: str,
    api_key: str | None,
    model: str,
    latents: Iterable[int],
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[int, str]:
    """Ask a chat model to label each of `latents` from its top examples. Human labels are never replaced;
    earlier automatic ones only with overwrite. Saved after each answer, so an interruption loses nothing."""
    sae_dir = Path(sae_dir)
    density = stats.a("density")
    done = {}
    for i in latents:
        if not 0 <= i < stats.d_sae:
            raise NanosaeError(f"latent {i} does not exist; this SAE has latents 0..{stats.d_sae - 1}")
        rec = load_label_records(sae_dir).get(i)
        if rec and (rec["source"] == "human" or not overwrite):
            continue
        if density[i] == 0:
            log(f"latent {i}: never fired, skipped")
            continue
        text = chat_completion(api_base, api_key, model, _prompt(stats, i)).strip()
        text = text.splitlines()[0].strip().strip("\"'").strip() if text else ""
        if not text:
            log(f"latent {i}: empty answer, skipped")
            continue
        set_label(sae_dir, i, text[:MAX_LABEL], model=model)
        done[i] = text[:MAX_LABEL]
        log(f"latent {i}: {text[:MAX_LABEL]}")
    return done
