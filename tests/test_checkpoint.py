import errno
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from r1lab import checkpoint
from r1lab.checkpoint import (
    CheckpointError, committed_checkpoint, load_checkpoint, load_model_config, load_tokenizer, read_metadata,
    read_trainer_state, read_trainer_summary, rng_state, save_checkpoint, set_rng_state,
)
from r1lab.config import ModelConfig
from r1lab.model import Transformer
from r1lab.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def tiny_config() -> ModelConfig:
    return ModelConfig(vocab_size=300, dim=64, n_layers=2, n_dense_layers=1, n_heads=4,
                       inter_dim=128, moe_inter_dim=32, n_routed_experts=4, n_shared_experts=1,
                       n_activated_experts=2, kv_lora_rank=32, qk_nope_head_dim=16,
                       qk_rope_head_dim=8, v_head_dim=16, max_seq_len=64, n_mtp_modules=1)


def make_model(seed: int = 0) -> Transformer:
    """A tiny model whose every parameter and persistent buffer holds seed-specific values."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config())
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.01)
    return model


def logits(model: Transformer) -> torch.Tensor:
    tokens = torch.arange(24).reshape(2, 12) * 7 % 300
    with torch.no_grad():
        return model(tokens)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([f"{i} + {i} = {2 * i} the cat sat" for i in range(300)], vocab_size=300)


@pytest.fixture
def saved(tmp_path):
    model = make_model()
    path = save_checkpoint(tmp_path / "ckpt", model)
    return path, logits(model)


def test_round_trip_gives_identical_logits_and_tokenizer(tmp_path, tok):
    model = make_model()
    path = save_checkpoint(tmp_path / "ckpt", model, tok, metadata={"stage": "sft"})
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    doc = json.loads((path / "config.json").read_text())
    assert doc["format_version"] == 1 and doc["model"]["dim"] == 64
    loaded, loaded_tok, state = load_checkpoint(path)
    assert state is None
    assert loaded.config == model.config == load_model_config(path)
    assert read_metadata(path) == {"stage": "sft"}
    assert torch.equal(logits(loaded), logits(model))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded_tok.backend.to_str() == tok.backend.to_str()
    assert loaded_tok.encode("12 + 12 = 24 😀") == tok.encode("12 + 12 = 24 😀")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind
    on_device = load_checkpoint(path, device=torch.device("cpu"))[0]
    assert torch.equal(logits(on_device), logits(model))


def test_loading_does_not_disturb_the_global_rng(saved):
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    load_checkpoint(saved[0])
    assert torch.equal(torch.rand(4), expected)


def test_sharded_save_round_trips(tmp_path):
    model = make_model()
    path = save_checkpoint(tmp_path / "ckpt", model, max_shard_bytes=100_000)
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (path / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        names = load_file(path / shard).keys()
        assert all(index["weight_map"][n] == shard for n in names)
    assert torch.equal(logits(load_checkpoint(path)[0]), logits(model))


def test_tied_tensors_are_stored_once(tmp_path):
    model = make_model()
    model.head.weight = model.embed.weight  # same (vocab, dim) Parameter under two names
    path = save_checkpoint(tmp_path / "ckpt", model)
    stored = load_file(path / "model.safetensors")
    assert "embed.weight" in stored and "head.weight" not in stored
    assert json.loads((path / "config.json").read_text())["tied_weights"] == {"head.weight": "embed.weight"}
    loaded = load_checkpoint(path)[0]
    assert torch.equal(loaded.head.weight, model.embed.weight)
    assert torch.equal(logits(loaded), logits(model))


def test_trainer_state_round_trips(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.loss(torch.randint(0, 300, (2, 9)), torch.randint(0, 300, (2, 9))).lm_loss.backward()
    opt.step()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": rng_state(), "metrics": {"loss": 1.5}}
    path = save_checkpoint(tmp_path / "ckpt", model, trainer_state=state)
    draws = (random.random(), np.random.rand(3), torch.rand(3))

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    loaded, _, restored = load_checkpoint(path)
    assert restored["step"] == 7 and restored["metrics"] == {"loss": 1.5}
    set_rng_state(restored["rng"])
    assert random.random() == draws[0]
    assert np.array_equal(np.random.rand(3), draws[1])
    assert torch.equal(torch.rand(3), draws[2])

    new_opt = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    new_opt.load_state_dict(restored["optimizer"])
    for (_, a), (_, b) in zip(sorted(opt.state_dict()["state"].items()),
                              sorted(new_opt.state_dict()["state"].items())):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert read_trainer_state(path)["step"] == 7
    human = json.loads((path / "trainer_state.json").read_text())
    assert human == {"step": 7, "metrics": {"loss": 1.5}} == read_trainer_summary(path)
    assert read_trainer_summary(save_checkpoint(tmp_path / "bare", model)) == {}


def test_truncated_safetensors_names_the_file(saved):
    path, _ = saved
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_checkpoint(path)
    weights.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_checkpoint(path)
    (n,) = struct.unpack("<Q", data[:8])
    weights.write_bytes(data[:8] + b"{" * n + data[8 + n:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        load_checkpoint(path)


def test_truncated_shard_names_the_shard(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", make_model(), max_shard_bytes=100_000)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated"):
        load_checkpoint(path)


def test_missing_config_and_bad_config_are_clear(saved):
    path, _ = saved
    config_file = path / "config.json"
    doc = json.loads(config_file.read_text())

    config_file.write_text(json.dumps({**doc, "format_version": 2}))
    with pytest.raises(CheckpointError, match=r"config\.json: format_version 2 is not supported"):
        load_checkpoint(path)
    config_file.write_text(json.dumps({**doc, "model": {**doc["model"], "n_layer": 3}}))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown key 'model\.n_layer'"):
        load_checkpoint(path)
    config_file.write_text(json.dumps({**doc, "optimizer": "adamw"}))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown key\(s\) optimizer"):
        load_checkpoint(path)
    config_file.write_text("{")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(path)
    config_file.unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        load_checkpoint(path.parent / "nowhere")


def test_shape_mismatch_missing_and_unexpected_tensors(saved):
    path, _ = saved
    config_file = path / "config.json"
    doc = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**doc, "model": {**doc["model"], "vocab_size": 320}}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'embed\.weight' has "
                                              r"shape \[300, 64\], config\.json implies \[320, 64\]"):
        load_checkpoint(path)
    config_file.write_text(json.dumps(doc))

    weights = path / "model.safetensors"
    tensors = load_file(weights)
    del tensors["layers.1.ffn.gate.expert_bias"]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor "
                                              r"'layers\.1\.ffn\.gate\.expert_bias' is missing"):
        load_checkpoint(path)
    tensors["layers.1.ffn.gate.expert_bias"] = torch.zeros(4)
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'extra\.weight'"):
        load_checkpoint(path)


def test_tokenizer_larger_than_the_model_is_refused(tmp_path, tok):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(300)]
    big = Tokenizer.train(words * 3, vocab_size=400)
    assert big.vocab_size > 300
    with pytest.raises(ValueError, match="model.vocab_size is 300"):
        save_checkpoint(tmp_path / "ckpt", make_model(), big)
    assert not (tmp_path / "ckpt").exists()


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        save_checkpoint(tmp_path / "run", make_model())
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"


def test_error_inside_the_writer_keeps_the_previous_checkpoint(saved, monkeypatch):
    path, old_logits = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(checkpoint, "save_file", half_write)
    with pytest.raises(CheckpointError, match=r"ckpt: cannot save \(No space left on device\); "
                                              r"the previous checkpoint is unchanged"):
        save_checkpoint(path, make_model(seed=1))
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert torch.equal(logits(load_checkpoint(path)[0]), old_logits)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


def test_failed_swap_rolls_back(saved, monkeypatch):
    path, old_logits = saved
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise PermissionError("denied")
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    with pytest.raises(PermissionError):
        save_checkpoint(path, make_model(seed=1))
    monkeypatch.undo()
    assert torch.equal(logits(load_checkpoint(path)[0]), old_logits)


KILL_SCRIPT = """
import os, shutil, sys
import torch
sys.path.insert(0, {tests!r})
from test_checkpoint import make_model
from r1lab.checkpoint import save_checkpoint

torch.set_num_threads(1)
path, point = sys.argv[1], sys.argv[2]
save_checkpoint(path, make_model(seed=0), trainer_state={{"step": 0}})
if point == "write":  # die with the temp dir half written (weights there, trainer state not)
    torch.save = lambda *a, **k: os._exit(17)
if point == "swap":  # die after the old checkpoint was moved aside, before the new one moves in
    real_rename = os.rename
    def rename(src, dst):
        if ".tmp-" in str(src):
            os._exit(17)
        real_rename(src, dst)
    os.rename = rename
if point == "cleanup":  # die after the swap, before the old copy is deleted
    real_rmtree = shutil.rmtree
    def rmtree(p, *a, **k):
        if ".old-" in str(p):
            os._exit(17)
        real_rmtree(p, *a, **k)
    shutil.rmtree = rmtree
save_checkpoint(path, make_model(seed=1), trainer_state={{"step": 1}})
"""


def test_a_first_save_killed_mid_write_is_no_checkpoint(tmp_path, monkeypatch, tok):
    path = tmp_path / "ckpt"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_fsync_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, make_model(), tok)
    assert committed_checkpoint(path) is None
    stale = tmp_path / ".ckpt.tmp-1-deadbeef"  # what a SIGKILL (no cleanup) leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert committed_checkpoint(path) is None
    monkeypatch.undo()
    save_checkpoint(path, make_model(), tok)
    assert committed_checkpoint(path) == path and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert load_tokenizer(path).encode("12 + 12") == tok.encode("12 + 12")
    assert load_tokenizer(save_checkpoint(tmp_path / "bare", make_model())) is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_model_config(tmp_path / "file")


@pytest.mark.parametrize("point, survivor", [("write", 0), ("swap", 1), ("cleanup", 1)])
def test_kill_mid_save_leaves_a_whole_checkpoint(tmp_path, point, survivor):
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(tests=str(REPO / "tests")))
    path = tmp_path / "runs" / "ckpt"
    result = subprocess.run([sys.executable, str(script), str(path), point], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 17, result.stderr
    leftovers = [p.name for p in path.parent.iterdir() if p.name != "ckpt"]
    assert leftovers  # the kill did leave debris behind
    assert path.exists() == (point != "swap")

    model, _, state = load_checkpoint(path)
    assert state == {"step": survivor}
    assert torch.equal(logits(model), logits(make_model(seed=survivor)))

    # the next save finishes or discards the interrupted one and cleans up
    save_checkpoint(path, make_model(seed=2))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]
    assert torch.equal(logits(load_checkpoint(path)[0]), logits(make_model(seed=2)))
