"""Finding, loading and saving nanochat checkpoints in their real layout, and every bad input a user can give."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nanosae import NanosaeError, load_model
from nanosae.checkpoint import save_checkpoint
from nanosae.cli import main as cli_main
from nanosae.gpt import GPT, GPTConfig

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-d4"
D4 = Path("base_checkpoints") / "d4"
MODEL, META = D4 / "model_000400.pt", D4 / "meta_000400.json"


@pytest.fixture
def base(tmp_path) -> Path:
    """A writable copy of the fixture's nanochat base dir."""
    return Path(shutil.copytree(FIXTURE / "base_dir", tmp_path / "base"))


def _tiny(n_layer: int = 2, seed: int = 0) -> GPT:
    cfg = GPTConfig(sequence_len=64, vocab_size=2000, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(cfg, "current")
    model.init_weights(seed=seed)
    with torch.no_grad():  # init leaves the output near zero; make models distinguishable by their logits
        model.lm_head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    return model


def _logits(model, ids=(1991, 5, 300, 17, 42)) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))


def _one_line_error(exc_info, *names) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, f"{name} not named in: {msg}"
    return msg


# ---------------------------------------------------------------- the three path forms, tags, phases, steps


def test_checkpoint_dir_base_dir_and_model_file_load_the_same_model(base, reference):
    ids = torch.tensor(reference["seq0_ids"])[None]
    loaded = [load_model(p) for p in (base, base / D4, base / MODEL, str(base / MODEL))]
    for model, tok, meta in loaded:
        assert model.info.name == "nanochat-d4" and model.info.step == 400 and model.info.phase == "base"
        assert model.info.path == str(base / MODEL) and model.info.generation == "current"
        assert meta["step"] == 400 and meta["model_config"]["window_pattern"] == "SSSL"
        assert tok.vocab_size == 2000
        with torch.no_grad():
            assert np.abs(model(ids)[0].numpy() - reference["seq0_logits"]).max() <= 1e-4
    assert len({m.info.fingerprint for m, _, _ in loaded}) == 1


def test_base_dir_picks_the_largest_numbered_tag(base):
    save_checkpoint(base / "base_checkpoints" / "d10", 5, _tiny(seed=1), {})
    save_checkpoint(base / "base_checkpoints" / "d2", 9, _tiny(seed=2), {})
    (base / "base_checkpoints" / "d99").mkdir()  # an empty tag folder is not a candidate
    model, _, _ = load_model(base)
    assert model.info.name == "nanochat-d10" and model.info.step == 5  # numeric order: d10 > d4 > d2
    assert torch.equal(_logits(model), _logits(_tiny(seed=1)))
    assert load_model(base / D4)[0].info.name == "nanochat-d4"


def test_unnumbered_tags_fall_back_to_the_newest(tmp_path):
    root = tmp_path / "base"
    shutil.copytree(FIXTURE / "base_dir" / "tokenizer", root / "tokenizer")
    save_checkpoint(root / "base_checkpoints" / "mine", 1, _tiny(seed=1), {})
    save_checkpoint(root / "base_checkpoints" / "yours", 1, _tiny(seed=2), {})
    os.utime(root / "base_checkpoints" / "mine", (2e9, 2e9))
    os.utime(root / "base_checkpoints" / "yours", (1e9, 1e9))
    assert load_model(root)[0].info.name == "nanochat-mine"


def test_phases(base):
    shutil.copytree(base / D4, base / "chatsft_checkpoints" / "d4")
    assert load_model(base)[0].info.phase == "base"  # base first when several phases exist
    model, _, _ = load_model(base, phase="sft")
    assert model.info.phase == "sft" and model.info.name == "nanochat-d4-sft"
    shutil.rmtree(base / "base_checkpoints")
    assert load_model(base)[0].info.phase == "sft"  # the only phase present
    with pytest.raises(NanosaeError) as e:
        load_model(base, phase="rl")
    _one_line_error(e, base, "chatrl_checkpoints", "sft")
    with pytest.raises(NanosaeError) as e:
        load_model(base, phase="mid")
    _one_line_error(e, "'mid'", "base, sft, rl")


def test_latest_step_by_default_and_explicit_step(base):
    ckpt = base / "base_checkpoints" / "d3"
    for step, seed in ((100, 1), (2500, 2), (400, 3)):
        save_checkpoint(ckpt, step, _tiny(seed=seed), {"val_bpb": step / 1000})
    model, _, meta = load_model(ckpt)
    assert model.info.step == 2500 and meta["step"] == 2500 and meta["val_bpb"] == 2.5
    assert torch.equal(_logits(model), _logits(_tiny(seed=2)))
    model, _, _ = load_model(ckpt, step=100)
    assert model.info.step == 100 and torch.equal(_logits(model), _logits(_tiny(seed=1)))
    assert load_model(base, step=400)[0].info.name == "nanochat-d4"  # the d4 tag wins; its step 400 exists
    with pytest.raises(NanosaeError) as e:
        load_model(ckpt, step=7)
    _one_line_error(e, ckpt, "model_000007.pt", "100, 400, 2500")
    with pytest.raises(NanosaeError) as e:
        load_model(ckpt / "model_000100.pt", step=400)
    _one_line_error(e, "model_000100.pt", "400")


def test_tokenizer_is_found_beside_the_checkpoints_or_given(base, tmp_path):
    tok_dir = tmp_path / "elsewhere"
    shutil.copytree(base / "tokenizer", tok_dir)
    shutil.rmtree(base / "tokenizer")
    with pytest.raises(NanosaeError) as e:
        load_model(base / D4)
    _one_line_error(e, "tokenizer.pkl", base / "tokenizer", "--tokenizer")
    model, tok, _ = load_model(base / MODEL, tokenizer_dir=tok_dir)
    assert tok.encode("hello") == load_model(FIXTURE / "base_dir")[1].encode("hello")
    shutil.copytree(tok_dir, base / D4 / "tokenizer")  # a tokenizer inside the checkpoint dir works too
    assert load_model(base / D4)[1].vocab_size == 2000


# ---------------------------------------------------------------- what loading does to the tensors and meta


def test_orig_mod_prefix_is_stripped_and_bf16_upcast(base):
    sd = torch.load(base / MODEL, weights_only=True)
    assert sd["transformer.wte.weight"].dtype == torch.bfloat16  # as nanochat's GPU-style training saved it
    reference_model = load_model(base)[0]
    torch.save({f"_orig_mod.{k}": v.bfloat16() for k, v in sd.items()}, base / MODEL)  # compiled, all bf16
    model, _, _ = load_model(base)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.transformer.wte.weight, sd["transformer.wte.weight"].float())
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"].bfloat16().float())
    assert (_logits(model) - _logits(reference_model)).abs().max().item() < 0.5  # only bf16 rounding differs


def test_meta_with_infinity(base):
    meta = json.loads((base / META).read_text())
    meta["loop_state"]["min_val_bpb"] = float("inf")  # nanochat writes this when eval never ran
    meta["val_bpb"] = None
    (base / META).write_text(json.dumps(meta))
    assert "Infinity" in (base / META).read_text()
    _, _, loaded = load_model(base)
    assert loaded["loop_state"]["min_val_bpb"] == float("inf") and loaded["val_bpb"] is None


def test_meta_without_window_pattern_defaults_to_L(base):
    meta = json.loads((base / META).read_text())
    del meta["model_config"]["window_pattern"]
    (base / META).write_text(json.dumps(meta))
    model, _, _ = load_model(base)
    assert model.config.window_pattern == "L" and model.windows == [256] * 4


def test_pickled_objects_in_a_checkpoint_are_refused(base, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # would create the marker file if unpickled

    sd = torch.load(base / MODEL, weights_only=True)
    torch.save({**sd, "payload": Payload()}, base / MODEL)
    with pytest.raises(NanosaeError) as e:
        load_model(base)
    msg = _one_line_error(e, base / MODEL)
    assert "refused" in msg and "open" in msg
    assert not marker.exists()


def test_save_then_load_round_trip(d4, tmp_path):
    model, tok, meta = d4
    base = tmp_path / "base"
    stale = {**meta, "step": 1, "model_config": {"n_layer": 99}}  # a caller's stale meta must not win
    path = save_checkpoint(base / "base_checkpoints" / "d4", 401, model, stale)
    assert path == base / "base_checkpoints" / "d4" / "model_000401.pt"
    tok.save(base / "tokenizer")
    loaded, tok2, meta2 = load_model(base)
    assert meta2["step"] == 401 and meta2["model_config"]["n_layer"] == 4
    assert meta2["user_config"] == meta["user_config"]
    ids = torch.tensor([tok.encode("def main():\n    return 0", prepend=tok.bos_token_id)])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert tok2.encode("round trip ✓") == tok.encode("round trip ✓")
    # nanochat's own key order, all fp32 (nanochat can load it with strict=True)
    ours = torch.load(path, weights_only=True)
    theirs = torch.load(FIXTURE / "base_dir" / MODEL, weights_only=True)
    assert list(ours) == list(theirs)
    assert all(v.dtype == torch.float32 for v in ours.values())
    assert not list(path.parent.glob(".*tmp"))  # atomic writes leave no temp files behind


def test_bf16_model_saves_fp32(tmp_path):
    model = _tiny(seed=4)
    want = {k: v.bfloat16().float() for k, v in model.state_dict().items() if "lambda" not in k}
    model.set_compute_dtype(torch.bfloat16)
    path = save_checkpoint(tmp_path, 1, model, {})
    saved = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert all(torch.equal(saved[k], v) for k, v in want.items())


# ---------------------------------------------------------------- every bad input: one line, naming the file


def _write_meta(base: Path, **changes) -> None:
    meta = json.loads((base / META).read_text())
    meta["model_config"].update(changes)
    (base / META).write_text(json.dumps(meta))


def _edit_sd(base: Path, fn) -> None:
    sd = torch.load(base / MODEL, weights_only=True)
    fn(sd)
    torch.save(sd, base / MODEL)


def _setup(name: str, base: Path) -> tuple[Path, dict, list]:
    """Break the copied base dir in one way: (path to load, load_model kwargs, strings the error must name)."""
    model, meta = base / MODEL, base / META
    if name == "missing_path":
        return base / "nope", {}, [base / "nope"]
    if name == "dir_without_checkpoints":
        (base / "empty").mkdir()
        return base / "empty", {}, [base / "empty", "base_checkpoints"]
    if name == "phase_dir_without_tags":
        shutil.rmtree(base / D4)
        return base, {}, [base / "base_checkpoints"]
    if name == "not_a_model_file":
        (base / "weights.pt").write_bytes(b"")
        return base / "weights.pt", {}, [base / "weights.pt", "model_XXXXXX.pt"]
    if name == "missing_meta":
        meta.unlink()
        return base, {}, [meta]
    if name == "corrupt_meta":
        meta.write_text('{"step": 400, "model_config": {')
        return base, {}, [meta, "JSON"]
    if name == "meta_without_model_config":
        meta.write_text('{"step": 400}')
        return base, {}, [meta, "model_config"]
    if name == "meta_with_unknown_config_key":
        _write_meta(base, n_expert=8)
        return base, {}, [meta, "n_expert"]
    if name == "meta_with_bad_value":
        _write_meta(base, n_layer="4")
        return base, {}, [meta, "n_layer"]
    if name == "meta_with_indivisible_heads":
        _write_meta(base, n_head=3, n_kv_head=3)
        return base, {}, [meta, "n_head"]
    if name == "corrupt_pt":
        model.write_bytes(random.Random(0).randbytes(4096))
        return base, {}, [model, "corrupt"]
    if name == "truncated_pt":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
        return base, {}, [model, "truncated"]
    if name == "pt_without_state_dict":
        torch.save([torch.zeros(3)], model)
        return base, {}, [model, "state dict"]
    if name == "unknown_key":
        _edit_sd(base, lambda sd: sd.update({"transformer.h.4.attn.c_q.weight": torch.zeros(128, 128)}))
        return base, {}, [model, "transformer.h.4.attn.c_q.weight"]
    if name == "missing_key":
        _edit_sd(base, lambda sd: sd.pop("value_embeds.3.weight"))
        return base, {}, [model, "value_embeds.3.weight"]
    if name == "wrong_shape":
        _edit_sd(base, lambda sd: sd.update({"transformer.h.2.mlp.c_fc.weight": torch.zeros(384, 128)}))
        return base, {}, [model, "transformer.h.2.mlp.c_fc.weight", "(384, 128)", "(512, 128)"]
    if name == "meta_vocab_beyond_embedding":
        _write_meta(base, vocab_size=3000)
        return base, {}, [model, "3000"]
    if name == "tokenizer_vocab_mismatch":
        _write_meta(base, vocab_size=1990)  # still fits the 2048 embedding rows, but not the tokenizer
        return base, {}, [base / "tokenizer" / "tokenizer.pkl", meta, "1990", "2000"]
    if name == "missing_tokenizer":
        (base / "tokenizer" / "tokenizer.pkl").unlink()
        return base, {}, ["tokenizer.pkl", base / "tokenizer"]
    if name == "corrupt_tokenizer":
        (base / "tokenizer" / "tokenizer.pkl").write_bytes(b"\x80\x04garbage")
        return base, {}, [base / "tokenizer" / "tokenizer.pkl"]
    if name == "unknown_phase":
        return base, {"phase": "pretrain"}, ["pretrain"]
    if name == "missing_phase":
        return base, {"phase": "rl"}, [base, "chatrl_checkpoints"]
    if name == "missing_step":
        return base, {"step": 399}, [base / D4, "model_000399.pt", "400"]
    if name == "unknown_generation":
        return base, {"generation": "v7"}, ["v7", "current"]
    if name == "wrong_generation":
        return base, {"generation": "v0"}, [model, "'v0'", "--generation"]
    raise AssertionError(name)


BAD_INPUTS = [
    "missing_path",
    "dir_without_checkpoints",
    "phase_dir_without_tags",
    "not_a_model_file",
    "missing_meta",
    "corrupt_meta",
    "meta_without_model_config",
    "meta_with_unknown_config_key",
    "meta_with_bad_value",
    "meta_with_indivisible_heads",
    "corrupt_pt",
    "truncated_pt",
    "pt_without_state_dict",
    "unknown_key",
    "missing_key",
    "wrong_shape",
    "meta_vocab_beyond_embedding",
    "tokenizer_vocab_mismatch",
    "missing_tokenizer",
    "corrupt_tokenizer",
    "unknown_phase",
    "missing_phase",
    "missing_step",
    "unknown_generation",
    "wrong_generation",
]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_gives_one_line_error_naming_the_file(base, name):
    path, kwargs, names = _setup(name, base)
    with pytest.raises(NanosaeError) as e:
        load_model(path, **kwargs)
    _one_line_error(e, *names)


def test_any_damaged_checkpoint_is_called_corrupt(tmp_path):
    """Random bytes fail in many different places inside the unpickler; every one must read as a damaged file."""
    from nanosae.checkpoint import read_state_dict

    path = tmp_path / "model_000001.pt"
    for seed in range(200):
        rng = random.Random(seed)
        path.write_bytes(rng.randbytes(rng.randint(1, 8192)))
        with pytest.raises(NanosaeError) as e:
            read_state_dict(path)
        _one_line_error(e, path, "corrupt")


def test_cli_prints_the_error_and_exits_2(tmp_path, capsys):
    assert cli_main(["sample", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanosae: error: ") and str(tmp_path / "missing") in err and err.count("\n") == 1
