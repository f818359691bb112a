"""A terminal chat like nanochat's chat_cli that shows the SAE latents of every generated token and takes
steering commands mid-chat.

The conversation is rendered as chat_cli does: <|bos|>, then per turn <|user_start|> text <|user_end|>
<|assistant_start|>, the reply generated until <|assistant_end|> (appended when the reply ends without it).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import torch

from .errors import NanosaeError
from .gpt import GPT
from .hooks import where
from .runtime import Steer, TokenLatents, Tracker, check_steers, generate_tracked, parse_steer
from .sae import SAE
from .tokenizer import Tokenizer

DEMO_OUT = Path("nanosae-demo")  # `nanosae demo`'s default --out, in the current directory

HELP = """commands:
  /steer ID +A    add A units of latent ID's decoder direction (negative A pushes away)
  /clamp ID V     hold latent ID at activation V (the SAE error is kept)
  /ablate ID      clamp latent ID to 0
  /unsteer ID     drop the steering of latent ID          /clear   drop all steering
  /only-generated on|off   steer only generated tokens    /steering   show the steering
  /latents on|off|N        show the top N latents per generated token
  /reset          start a new conversation                /quit    leave (also Ctrl-D)"""


class TextStream:
    """Token ids to printable text: tokens ending inside a multi-byte UTF-8 character wait for the rest (as
    chat_web did); each piece comes with the items pushed with its tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.pending = tokenizer, []

    def push(self, token: int, item=None) -> tuple[str, list] | None:
        self.pending.append((token, item))
        text = self.tok.decode([t for t, _ in self.pending])
        return None if text.endswith("\ufffd") else self.flush()

    def flush(self) -> tuple[str, list] | None:
        """Whatever is held back (an invalid sequence shows as U+FFFD), e.g. at the end of a reply."""
        if not self.pending:
            return None
        text, items = self.tok.decode([t for t, _ in self.pending]), [i for _, i in self.pending]
        self.pending = []
        return text, items


def format_latents(rec: TokenLatents, labels: dict[int, str], n: int) -> str:
    parts = []
    for i, v in zip(rec.ids[:n], rec.values[:n]):
        label = labels.get(i)
        parts.append(f"{i} {v:.2f}" + (f" ({label})" if label else ""))
    return " · ".join(parts) if parts else "(no active latents)"


class ChatSession:
    """The state of one terminal chat: conversation tokens, steering, display settings."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        sae: SAE,
        steers: Sequence[Steer] = (),
        only_generated: bool = False,
        units: torch.Tensor | None = None,
        labels: dict[int, str] | None = None,
        temperature: float = 0.6,
        top_k: int | None = 50,
        max_tokens: int = 256,
        top_n: int = 3,
        seed: int = 42,
    ):
        self.site = where(model, sae)
        self.model, self.tok, self.sae = model, tokenizer, sae
        self.steers = {s.latent: s for s in steers}
        self.only_generated, self.units, self.labels = only_generated, units, labels or {}
        self.temperature, self.top_k, self.max_tokens, self.seed = temperature, top_k, max_tokens, seed
        self.top_n = top_n  # 0 hides the latents
        sp = tokenizer.encode_special
        self.user_start, self.user_end = sp("<|user_start|>"), sp("<|user_end|>")
        self.assistant_start, self.assistant_end = sp("<|assistant_start|>"), sp("<|assistant_end|>")
        self.conversation = [tokenizer.bos_token_id]

    def command(self, line: str) -> str | None:
        """Run a /command; returns the text to show, or None to quit."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit"):
            return None
        if name in ("steer", "clamp", "ablate"):
            s = parse_steer(arg, name, prefix="/")
            check_steers(self.sae, [s])
            self.steers[s.latent] = s
            return f"steering: {self.describe()}"
        if name == "unsteer":
            if not arg.isdigit():
                raise NanosaeError("write /unsteer ID")
            self.steers.pop(int(arg), None)
            return f"steering: {self.describe()}"
        if name == "clear":
            self.steers.clear()
            return "steering cleared"
        if name == "steering":
            return f"steering: {self.describe()}"
        if name == "only-generated":
            if arg not in ("on", "off"):
                raise NanosaeError("write /only-generated on or /only-generated off")
            self.only_generated = arg == "on"
            return f"steering applies to {'generated tokens only' if self.only_generated else 'every token'}"
        if name == "latents":
            if arg in ("on", "off"):
                self.top_n = 3 if arg == "on" else 0
            elif arg.isdigit():
                self.top_n = int(arg)
            else:
                raise NanosaeError("write /latents on, /latents off or /latents N")
            return f"showing {self.top_n} latents per token" if self.top_n else "latents hidden"
        if name == "reset":
            self.conversation = [self.tok.bos_token_id]
            return "new conversation"
        if name == "help":
            return HELP
        raise NanosaeError(f"unknown command /{name}; /help lists the commands")

    def describe(self) -> str:
        if not self.steers:
            return "none"
        where = " (generated tokens only)" if self.only_generated else ""
        return ", ".join(str(s) for s in self.steers.values()) + where

    def reply(self, message: str, write: Callable[[str], None]) -> list[tuple[int, TokenLatents]]:
        """Generate the assistant's reply to `message`, writing its text as it streams; returns each generated
        token with its latents."""
        prompt = self.conversation + [self.user_start, *self.tok.encode(message), self.user_end, self.assistant_start]
        room = self.model.cos.size(1) - len(prompt)  # positions the model can take
        if room < 1:
            raise NanosaeError(f"the conversation ({len(prompt)} tokens) fills the model's context; /reset")
        out, stream = [], TextStream(self.tok)
        for token, rec in generate_tracked(
            self.model,
            self.sae,
            prompt,
            min(self.max_tokens, room),
            self.temperature,
            self.top_k,
            self.seed,
            self.tok.stop_token_ids(),
            list(self.steers.values()),
            self.only_generated,
            self.units,
            Tracker(self.sae, max(self.top_n, 1)),
        ):
            out.append((token, rec))
            if token not in self.tok.special_ids() and (piece := stream.push(token)):
                write(piece[0])
        if piece := stream.flush():
            write(piece[0])
        tokens = [t for t, _ in out]
        self.conversation = prompt + tokens
        if not tokens or tokens[-1] != self.assistant_end:
            self.conversation.append(self.assistant_end)
        return out


def chat(
    session: ChatSession,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> None:
    """The read-reply loop: a message gets a streamed reply (and its latents), a /command changes the session;
    it ends on /quit or end of input."""
    s, out = session, out or sys.stdout  # looked up now: a default bound at import would miss redirections

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    name = getattr(getattr(s.model, "info", None), "name", "model")
    write(
        f"nanosae chat: {name} with a {s.sae.cfg.architecture} SAE of {s.sae.cfg.d_sae} latents at {s.site}\n"
        f"steering: {s.describe()}  ·  /help for commands, /quit to leave\n"
    )
    while True:
        try:
            line = read("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line in ("quit", "exit"):
            return
        if line.startswith("/"):
            try:
                msg = s.command(line)
            except NanosaeError as e:
                msg = f"error: {e}"
            if msg is None:
                return
            write(msg + "\n")
            continue
        write("\nAssistant: ")
        try:
            generated = s.reply(line, write)
        except NanosaeError as e:
            write(f"error: {e}\n")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops the reply (which is then not kept), not the chat
            write(" [stopped]\n")
            continue
        write("\n")
        if s.top_n:
            for token, rec in generated:
                write(f"  {s.tok.id_to_token(token)!r:>16}  {format_latents(rec, s.labels, s.top_n)}\n")


def chat_defaults(
    model: str | None, phase: str | None, sae: str | None, dashboard: str | None, command: str = "chat"
) -> tuple[str, str | None, str, str | None]:
    """(model, phase, sae, dashboard) for chat and serve. No model: the tiny chat model (fine-tuned from the tiny
    base model, each trained first unless cached). A base dir and no phase: its chat model (a train-lm folder
    without one gets it fine-tuned now). No SAE: the one `nanosae demo` wrote into ./nanosae-demo from this same
    base dir (its dashboard too), said aloud; otherwise an error naming what to pass, before any training."""
    from .checkpoint import PHASE_DIRS
    from .lm_train import ensure_chat_model, read_marker, read_sft_marker, tiny_dir

    default, fine_tune = model is None, False  # the chat model is made only once the SAE question is settled
    if default:
        if phase not in (None, "sft"):
            raise NanosaeError(f"--phase {phase} needs --model (with no --model, {command} uses the tiny chat model)")
        print("no --model: using the tiny chat model (nanosae train-sft), trained first where it is not cached")
        model, phase = str(tiny_dir()), "sft"
    elif phase is None and Path(model).expanduser().is_dir():
        path = Path(model).expanduser()
        if read_marker(path) is not None:  # a train-lm folder: its chat model, fine-tuned now if it has none
            phase, fine_tune = "sft", read_sft_marker(path) is None
        elif (path / PHASE_DIRS["sft"]).is_dir():
            print(f"{path}: using its chat model ({PHASE_DIRS['sft']}); pass --phase base for the base model")
            phase = "sft"
    if sae is None:
        sae, found = demo_sae(model)
        dashboard = dashboard or found
        if sae is None:
            raise NanosaeError(
                f"{command} needs an SAE: pass --sae DIR (an SAE trained on this model's activations, e.g. by nanosae "
                f"train), or run `nanosae demo` in this directory first ({command} then uses its nanosae-demo/sae)"
            )
        print(f"no --sae: using {sae}, which `nanosae demo` trained on the base model's activations")
    if default or fine_tune:
        model = str(ensure_chat_model(None if default else model))
    return model, phase, sae, dashboard


def demo_sae(model: str) -> tuple[str | None, str | None]:
    """(SAE dir, dashboard dir or None) that `nanosae demo` wrote into ./nanosae-demo from this base dir, else
    (None, None)."""
    try:
        summary = json.loads((DEMO_OUT / "summary.json").read_text())
        made_from = Path(summary["model_path"]).expanduser().resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    sae, dashboard = DEMO_OUT / "sae", DEMO_OUT / "dashboard"
    if made_from != Path(model).expanduser().resolve() or not (sae / "cfg.json").is_file():
        return None, None
    return str(sae), str(dashboard) if (dashboard / "index.html").is_file() else None
