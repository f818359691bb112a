"""Hugging Face-format nanochat models (transformers' NanoChatForCausalLM folders) against transformers itself.

The models are small random NanoChatForCausalLMs that transformers builds and saves; their tokenizer is the
fixture's tokenizer.pkl converted by transformers' own tiktoken converter, as real conversions are made.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanosae import NanosaeError, Tokenizer, load_model
from nanosae.activations import iter_cache, load_manifest
from nanosae.cli import main as cli_main
from nanosae.data import token_rows
from nanosae.generate import generate
from nanosae.hooks import run_with_cache
from nanosae.tokenizer import load_encoding

ROOT = Path(__file__).resolve().parents[1]
BASE_DIR = ROOT / "tests" / "fixtures" / "nanochat-d4" / "base_dir"
VOCAB = 2000  # the fixture tokenizer's
# "plain": transformers' defaults (untied, softcap 15, RoPE base 10000, eps 1e-6) with grouped-query attention;
# "tied": every constant config.json can set moved off its default, and 48 padding rows beyond the tokenizer
VARIANTS = {
    "plain": dict(vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2),
    "tied": dict(
        vocab_size=2048,
        num_attention_heads=2,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        rms_norm_eps=1e-2,
        final_logit_softcapping=None,
    ),
}


def _hf_tokenizer(tmp: Path):
    """The fixture's tiktoken Encoding as a transformers fast tokenizer (transformers' TikTokenConverter)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = load_encoding(BASE_DIR / "tokenizer" / "tokenizer.pkl")
    ranks = tmp / "ranks.tiktoken"  # the tiktoken BPE file format the converter reads
    ranks.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in enc._mergeable_ranks.items()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file itself, no cache under /tmp
        converter = TikTokenConverter(str(ranks), pattern=enc._pat_str, extra_special_tokens=enc._special_tokens)
        backend = converter.converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|assistant_end|>")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """{variant: (transformers model, its saved folder)}, plus the converted tokenizer under "tokenizer"."""
    from transformers import NanoChatConfig, NanoChatForCausalLM

    tmp = tmp_path_factory.mktemp("hf")
    tokenizer = _hf_tokenizer(tmp)
    out = {"tokenizer": tokenizer}
    for i, (variant, kwargs) in enumerate(VARIANTS.items()):
        specials = dict(bos_token_id=1991, eos_token_id=1995, pad_token_id=1995)
        config = NanoChatConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            max_position_embeddings=256,
            **specials,
            **kwargs,
        )
        model = NanoChatForCausalLM(config).eval()
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():  # transformers' init (std 0.02) gives near-uniform logits: draw peakier weights
            for name, p in model.named_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (3 if "lm_head" in name else 1) / p.shape[-1] ** 0.5)
        folder = tmp / f"nanochat-{variant}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[variant] = (model, folder)
    return out


def _texts(reference) -> list[torch.Tensor]:
    return [torch.tensor(reference[f"seq{i}_ids"])[None] for i in range(3)]  # 11, 80 and 200 tokens


def _one_line_error(exc_info, *names) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, f"{name} not named in: {msg}"
    return msg


# ---------------------------------------------------------------- the model against transformers' forward


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(hf, reference, variant):
    theirs, folder = hf[variant]
    model, tok, meta = load_model(folder)
    assert model.gen.name == "hf" and model.info.generation == "hf" and model.info.name == f"nanochat-{variant}"
    assert model.config.vocab_size == tok.vocab_size == VOCAB and meta["hf_config"]["model_type"] == "nanochat"
    worst = 0.0
    with torch.no_grad():
        for ids in _texts(reference):
            want = theirs(ids).logits[..., :VOCAB]  # rows past the tokenizer are padding, which nanosae drops
            got = model(ids)
            assert got.shape == want.shape
            worst = max(worst, (got - want).abs().max().item())
        batch = torch.cat([ids[:, :11] for ids in _texts(reference)])  # a batch of three rows
        worst = max(worst, (model(batch) - theirs(batch).logits[..., :VOCAB]).abs().max().item())
    print(f"{variant}: max abs logit difference vs transformers {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_matches_transformers(hf, reference, variant):
    theirs, folder = hf[variant]
    model, tok, _ = load_model(folder)
    padding = list(range(VOCAB, theirs.config.vocab_size))  # nanosae never emits them; transformers is told so
    for key in ("gen0_prompt", "gen1_prompt"):
        prompt = reference[key].tolist()
        with torch.no_grad():
            out = theirs.generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False, suppress_tokens=padding or None
            )
        want = out[0, len(prompt) :].tolist()
        assert generate(model, prompt, 24, stop_tokens=tok.stop_token_ids() - {tok.bos_token_id}) == want


def test_sharded_checkpoint_loads_the_same(hf, reference, tmp_path):
    theirs, folder = hf["plain"]
    sharded = tmp_path / "nanochat-plain"
    theirs.save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(folder / "tokenizer.json", sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (sharded / "model.safetensors").exists()
    model, _, _ = load_model(sharded)
    single, _, _ = load_model(folder)
    ids = _texts(reference)[1]
    with torch.no_grad():
        assert torch.equal(model(ids), single(ids))
    assert model.info.name == single.info.name == "nanochat-plain"
    assert model.info.fingerprint != single.info.fingerprint  # different files, so a cache can tell them apart


def test_folder_file_inside_and_hub_snapshot_paths(hf, tmp_path):
    _, folder = hf["plain"]
    for path in (folder, folder / "config.json", folder / "model.safetensors", str(folder)):
        assert load_model(path)[0].info.path == str(folder)
    snapshot = tmp_path / "models--someone--nanochat-d32" / "snapshots" / "0123abcd"
    shutil.copytree(folder, snapshot)
    model, _, _ = load_model(snapshot)
    assert model.info.name == "nanochat-d32" and model.info.step is None and model.info.phase is None
    native = Path(shutil.copytree(BASE_DIR, tmp_path / "base"))  # a config.json beside model_*.pt: still native
    (native / "base_checkpoints" / "d4" / "config.json").write_text((folder / "config.json").read_text())
    assert load_model(native / "base_checkpoints" / "d4")[0].info.generation == "current"


# ---------------------------------------------------------------- the tokenizer against the native one


def test_tokenizer_json_is_the_native_tokenizer(hf, reference, tok_info):
    _, folder = hf["plain"]
    native = Tokenizer.from_dir(BASE_DIR / "tokenizer")
    tok = load_model(folder)[1]
    assert tok.enc._mergeable_ranks == native.enc._mergeable_ranks and tok.enc._pat_str == native.enc._pat_str
    assert tok.enc._special_tokens == native.enc._special_tokens == tok_info["special_tokens"]
    assert tok.bos_token_id == native.bos_token_id and tok.stop_token_ids() == native.stop_token_ids()
    for i, text in enumerate(tok_info["strings"]):
        ids = tok.encode(text, prepend="<|bos|>")
        assert ids == native.encode(text, prepend="<|bos|>") == reference[f"tok.str{i}_bos_ids"].tolist()
        assert tok.decode(ids[1:]) == text
    assert tok.encode(tok_info["strings"]) == native.encode(tok_info["strings"])
    hf_tok = hf["tokenizer"]  # and transformers' own encoding of the same file agrees (special text aside)
    for text in tok_info["strings"]:
        if "<|" not in text:
            assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)


def test_chat_rendering_matches_the_native_tokenizer(hf, reference, tok_info):
    _, folder = hf["plain"]
    native = Tokenizer.from_dir(BASE_DIR / "tokenizer")
    tok = load_model(folder)[1]
    conversation = tok_info["conversation"]
    ids, mask = tok.render_conversation(conversation)
    assert (ids, mask) == native.render_conversation(conversation)
    assert ids == reference["tok.conv_ids"].tolist() and mask == reference["tok.conv_mask"].tolist()
    completion = tok.render_for_completion(conversation)
    assert completion == native.render_for_completion(conversation) == reference["tok.conv_completion_ids"].tolist()


# ---------------------------------------------------------------- transformers stays optional


def test_loading_imports_neither_transformers_nor_tokenizers(hf):
    _, folder = hf["plain"]
    code = (
        "import sys, nanosae\n"
        f"nanosae.load_model({str(BASE_DIR)!r})\n"
        "assert 'transformers' not in sys.modules and 'tokenizers' not in sys.modules, 'native'\n"
        f"nanosae.load_model({str(folder)!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'tokenizers'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- what a user runs


def test_cli_sample_and_collect_on_a_hf_folder(hf, tmp_path, capsys):
    _, folder = hf["plain"]
    model, tok, _ = load_model(folder)
    prompt = "The capital of France is"
    assert cli_main(["sample", "--model", str(folder), "--prompt", prompt, "--max-tokens", "12"]) == 0
    want = tok.decode(generate(model, tok.encode(prompt, prepend=tok.bos_token_id), 12))
    assert capsys.readouterr().out == prompt + want + "\n"

    out = tmp_path / "acts"
    args = ["collect", "--model", str(folder), "--layer", "1", "--tokens", "500", "--out", str(out)]
    assert cli_main([*args, "--seq-len", "64", "--batch-size", "2", "--shard-tokens", "256"]) == 0
    manifest = load_manifest(out)
    assert (manifest["model_name"], manifest["site"], manifest["d_in"]) == ("nanochat-plain", "blocks.1.resid_post", 64)
    assert manifest["model_fingerprint"] == model.info.fingerprint and manifest["total_tokens"] == 500
    got = torch.cat([shard["activations"] for shard in iter_cache(out)])
    rows, want = token_rows(tok, None, 64), []  # the same rows, forward by forward, BOS positions dropped
    while sum(len(a) for a in want) < 500:
        batch = torch.tensor(list(itertools.islice(rows, 2)))
        _, cache = run_with_cache(model, batch, ["blocks.1.resid_post"])
        want.append(cache["blocks.1.resid_post"].reshape(-1, 64)[batch.flatten() != tok.bos_token_id])
    assert torch.equal(got, torch.cat(want)[:500])


# ---------------------------------------------------------------- every bad folder: one line, naming the fix


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _setup(name: str, folder: Path):
    """Damage a copy of the plain folder; return (load_model kwargs, strings the error must name)."""
    cfg, weights = folder / "config.json", folder / "model.safetensors"
    if name == "not_nanochat":
        _edit_config(folder, model_type="llama")
        return {}, [cfg, "'llama'", "nanochat"]
    if name == "fewer_layers_than_weights":
        _edit_config(folder, num_hidden_layers=2)
        return {}, [folder, "model.layers.2", "config.json"]
    if name == "wrong_width":
        _edit_config(folder, hidden_size=128, intermediate_size=512)
        return {}, [folder, "model.embed_tokens.weight", "(2000, 64)", "(2000, 128)", "config.json"]
    if name == "vocab_below_tokenizer":
        _edit_config(folder, vocab_size=1500)
        return {}, [cfg, "2000", "1500", "tokenizer"]
    if name == "unsupported_mlp":
        _edit_config(folder, intermediate_size=300, attention_bias=True)
        return {}, [cfg, "intermediate_size", "attention_bias", "nanochat"]
    if name == "bad_value":
        _edit_config(folder, rms_norm_eps="tiny")
        return {}, [cfg, "rms_norm_eps", "corrupted"]
    if name == "corrupt_config":
        cfg.write_text("{not json")
        return {}, [cfg, "JSON"]
    if name == "missing_weights":
        weights.unlink()
        return {}, [folder, "model.safetensors", "copy the weights"]
    if name == "corrupt_weights":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + bytes(64))
        return {}, [weights, "corrupt", "copy it again"]
    if name == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:-1000])
        return {}, [weights, "corrupt", "copy it again"]
    if name == "missing_tokenizer":
        (folder / "tokenizer.json").unlink()
        return {}, [folder, "tokenizer.json", "--tokenizer"]
    if name == "corrupt_tokenizer":
        (folder / "tokenizer.json").write_text('{"model": {"type": "WordLevel", "vocab": {}}}')
        return {}, [folder / "tokenizer.json", "BPE"]
    if name == "step_given":
        return {"step": 400}, [folder, "--step"]
    if name == "generation_given":
        return {"generation": "v0"}, [folder, "--generation", "'hf'"]
    raise AssertionError(name)


BAD_FOLDERS = [
    "not_nanochat",
    "fewer_layers_than_weights",
    "wrong_width",
    "vocab_below_tokenizer",
    "unsupported_mlp",
    "bad_value",
    "corrupt_config",
    "missing_weights",
    "corrupt_weights",
    "truncated_weights",
    "missing_tokenizer",
    "corrupt_tokenizer",
    "step_given",
    "generation_given",
]


@pytest.mark.parametrize("name", BAD_FOLDERS)
def test_bad_folder_gives_one_line_error(hf, tmp_path, name):
    folder = Path(shutil.copytree(hf["plain"][1], tmp_path / "nanochat-plain"))
    kwargs, names = _setup(name, folder)
    with pytest.raises(NanosaeError) as e:
        load_model(folder, **kwargs)
    _one_line_error(e, *names)


@pytest.mark.parametrize("damage", ["missing_shard", "corrupt_shard", "index_names_absent_tensor", "corrupt_index"])
def test_bad_shards_give_one_line_error(hf, tmp_path, damage):
    sharded = tmp_path / "nanochat-plain"
    hf["plain"][0].save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(hf["plain"][1] / "tokenizer.json", sharded)
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sharded / sorted(set(index["weight_map"].values()))[1]
    if damage == "missing_shard":
        shard.unlink()
        names = [shard, "copy every weights file"]
    elif damage == "corrupt_shard":
        shard.write_bytes(np.random.default_rng(0).bytes(5000))
        names = [shard, "corrupt"]
    elif damage == "index_names_absent_tensor":
        index["weight_map"]["model.layers.9.mlp.fc1.weight"] = shard.name
        index_path.write_text(json.dumps(index))
        names = [index_path, "model.layers.9.mlp.fc1.weight", "copy the shards"]
    else:
        index_path.write_text('{"weight_map": ["a list"]}')
        names = [index_path, "weight_map"]
    with pytest.raises(NanosaeError) as e:
        load_model(sharded)
    _one_line_error(e, *names)


@pytest.mark.parametrize("damage", ["merges_out_of_order", "gpt2_pre_tokenizer", "no_nanochat_specials", "not_json"])
def test_tokenizer_json_that_tiktoken_cannot_reproduce_is_refused(hf, tmp_path, damage):
    data = json.loads((hf["plain"][1] / "tokenizer.json").read_text())
    path = tmp_path / "tokenizer.json"
    if damage == "merges_out_of_order":  # a merge list tiktoken's rank order would not follow
        data["model"]["merges"] = data["model"]["merges"][::-1]
        names = ["merges", "order"]
    elif damage == "gpt2_pre_tokenizer":  # GPT-2's built-in split, not nanochat's regex
        data["pre_tokenizer"] = {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        }
        names = ["one regex", "tokenizer.pkl"]
    elif damage == "no_nanochat_specials":
        data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|assistant_end|>"]
        names = ["<|assistant_end|>", "nanochat tokenizer"]
    else:
        data = None
        names = ["not valid JSON"]
    path.write_text("{" if data is None else json.dumps(data))
    with pytest.raises(NanosaeError) as e:
        Tokenizer.from_dir(tmp_path)
    _one_line_error(e, path, *names)


def test_tokenizer_dir_overrides_the_folder(hf, tmp_path):
    folder = Path(shutil.copytree(hf["plain"][1], tmp_path / "nanochat-plain"))
    (folder / "tokenizer.json").unlink()
    tok = load_model(folder, tokenizer_dir=BASE_DIR / "tokenizer")[1]  # nanochat's own tokenizer.pkl
    assert tok.encode("hello there") == Tokenizer.from_dir(BASE_DIR / "tokenizer").encode("hello there")
