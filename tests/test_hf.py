"""Hugging Face interop: config mapping, export/import parity, the HF decoder adapter, the loader.

Every model here is tiny and randomly initialised in the test; nothing comes from a hub.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_hf_model
from safetensors.torch import load_file, save_file

from r1lab import hf
from r1lab.checkpoint import CheckpointError, save_checkpoint
from r1lab.config import ConfigError, ModelConfig
from r1lab.model import Transformer
from r1lab.tokenizer import R1, THINK_OPEN, Tokenizer, render_prompt

VOCAB = 320
YARN = dict(q_lora_rank=16, rope_factor=4.0, original_seq_len=16, mscale=0.707)  # low-rank queries, YaRN on
REPO = Path(__file__).resolve().parents[1]


def moe_config(**changes) -> ModelConfig:
    """Group-limited sigmoid routing with route_scale 2.5, one dense layer, one MTP module."""
    base = dict(vocab_size=VOCAB, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=3, n_dense_layers=1,
                n_heads=4, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                n_expert_groups=4, n_limited_groups=2, route_scale=2.5, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_seq_len=64,
                original_seq_len=64, n_mtp_modules=1, init_std=0.1)
    base.update(changes)
    return ModelConfig(**base)


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Weights large enough that the logits are O(1), norms off 1 and a nonzero expert bias."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for gate in model.moe_gates():
            gate.expert_bias.normal_(0, 0.3)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def exported(tf, tok, tmp_path_factory):
    """(r1lab model, its export dir) for q_lora_rank > 0 with YaRN on."""
    model = random_model(moe_config(**YARN))
    return model, hf.export_hf(model, tmp_path_factory.mktemp("ds") / "hf", tokenizer=tok)


@pytest.fixture(scope="module")
def qwen_dir(tf, tok, tmp_path_factory) -> Path:
    return tiny_hf_model(tf, "qwen2", tmp_path_factory.mktemp("qwen") / "hf", tok)


def no_grad_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


# ------------------------------------------------------------------ optional dependency
def test_module_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import r1lab.hf as h\n"
            "try:\n    h.hf_config_from_model_config(h.ModelConfig())\n"
            "except ImportError:\n    print('needs transformers')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "needs transformers"


# ------------------------------------------------------------------ config mapping
def test_hf_config_has_the_same_shape(tf):
    cfg = moe_config(q_lora_rank=0)
    c = hf.hf_config_from_model_config(cfg)
    assert isinstance(c, tf.DeepseekV3Config)
    assert (c.hidden_size, c.intermediate_size, c.moe_intermediate_size, c.num_hidden_layers) == (64, 128, 32, 3)
    assert (c.first_k_dense_replace, c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok) == (1, 8, 1, 2)
    assert (c.n_group, c.topk_group, c.routed_scaling_factor, c.norm_topk_prob) == (4, 2, 2.5, True)
    assert c.q_lora_rank is None and c.kv_lora_rank == 32 and c.num_key_value_heads == 4
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (16, 8, 16)
    assert c.rope_parameters["rope_type"] == "default" and c.rope_interleave is True
    assert c.tie_word_embeddings is False and c.max_position_embeddings == 64 and c.vocab_size == VOCAB

    yarn = hf.hf_config_from_model_config(moe_config(**YARN))
    assert yarn.q_lora_rank == 16
    rope = yarn.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, 16)
    assert rope["mscale"] == rope["mscale_all_dim"] == 0.707

    dense = hf.hf_config_from_model_config(moe_config(n_routed_experts=0))
    assert dense.first_k_dense_replace == 3


@pytest.mark.parametrize("changes", [dict(q_lora_rank=0), YARN, dict(n_routed_experts=0)])
def test_config_round_trips(tf, changes):
    cfg = moe_config(**changes)
    back = hf.model_config_from_hf_config(hf.hf_config_from_model_config(cfg).to_dict())
    training_only = {"n_mtp_modules", "attn_impl", "bias_update_speed", "seq_aux_alpha", "mtp_loss_weight"}
    for field in ModelConfig.__dataclass_fields__:
        if field not in training_only and not (field == "n_dense_layers" and cfg.n_routed_experts == 0):
            assert getattr(back, field) == getattr(cfg, field), field
    assert back.n_mtp_modules == 0 and back.n_moe_layers == cfg.n_moe_layers


@pytest.mark.parametrize("changes, field", [
    (dict(score_func="softmax"), "score_func"),
    (dict(norm_eps=1e-5), "norm_eps"),
    (dict(n_shared_experts=0), "n_shared_experts"),
    (dict(n_routed_experts=1, n_activated_experts=1), "n_routed_experts"),
])
def test_what_hf_cannot_express_is_a_value_error(tf, changes, field):
    cfg = moe_config(**{**dict(n_expert_groups=1, n_limited_groups=1), **changes})
    with pytest.raises(ValueError, match=field):
        hf.hf_config_from_model_config(cfg)


@pytest.mark.parametrize("changes, key", [
    (dict(model_type="llama"), "model_type"),
    (dict(norm_topk_prob=False), "norm_topk_prob"),
    (dict(quantization_config={"quant_method": "fp8"}), "quantization_config"),
    (dict(rope_interleave=False), "rope_interleave"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
])
def test_unsupported_hf_configs_are_refused(tf, changes, key):
    doc = hf.hf_config_from_model_config(moe_config()).to_dict()
    with pytest.raises(ValueError, match=key):
        hf.model_config_from_hf_config({**doc, **changes})


def test_legacy_rope_scaling_is_read():
    """DeepSeek-V3's released config.json: rope_theta + rope_scaling, remote-code keys."""
    doc = {"model_type": "deepseek_v3", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
           "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 4, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
           "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "q_lora_rank": 16, "kv_lora_rank": 32,
           "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "first_k_dense_replace": 1,
           "max_position_embeddings": 163840, "rope_theta": 10000, "scoring_func": "sigmoid",
           "topk_method": "noaux_tc", "num_nextn_predict_layers": 1,
           "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}
    cfg = hf.model_config_from_hf_config(doc)
    assert (cfg.rope_factor, cfg.original_seq_len, cfg.max_seq_len, cfg.mscale) == (40.0, 4096, 163840, 1.0)
    assert (cfg.q_lora_rank, cfg.n_expert_groups, cfg.route_scale, cfg.n_mtp_modules) == (16, 4, 2.5, 0)
    with pytest.raises(ValueError, match="mscale"):
        hf.model_config_from_hf_config({**doc, "rope_scaling": {**doc["rope_scaling"], "mscale": 0.5}})
    with pytest.raises(ValueError, match="n_group"):
        hf.model_config_from_hf_config({k: v for k, v in doc.items() if k != "n_group"})


# ------------------------------------------------------------------ export
@pytest.mark.parametrize("changes", [dict(q_lora_rank=0), YARN])
def test_exported_model_gives_the_same_logits_in_transformers(tf, tmp_path, changes):
    model = random_model(moe_config(**changes))
    out = hf.export_hf(model, tmp_path / "hf")
    twin = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(twin).__name__ == "DeepseekV3ForCausalLM" and twin.dtype == torch.float32
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    ours, theirs = no_grad_logits(model, tokens), no_grad_logits(twin, tokens)
    assert ours.abs().max() > 1.0  # logits of a size that a mapping mistake would show in
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

    # The test can fail: the expert bias and the interleaved RoPE layout both change the result.
    biases = [layer.mlp.gate.e_score_correction_bias for layer in twin.model.layers[1:]]
    with torch.no_grad():
        for bias in biases:
            bias.zero_()
    assert (no_grad_logits(twin, tokens) - ours).abs().max() > 1e-3
    with torch.no_grad():
        for bias, gate in zip(biases, model.moe_gates()):
            bias.copy_(gate.expert_bias)
    torch.testing.assert_close(no_grad_logits(twin, tokens), ours, atol=1e-4, rtol=1e-4)
    for layer in twin.model.layers:
        layer.self_attn.config.rope_interleave = False
    assert (no_grad_logits(twin, tokens) - ours).abs().max() > 1e-3


def test_export_writes_per_expert_tensors_and_drops_mtp(exported):
    model, out = exported
    names = set(load_file(out / hf.HF_WEIGHTS_FILE))
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in names
    assert not any("mtp" in n or n.startswith("model.layers.3.") for n in names)
    expected = {hf.hf_name(n) for n in model.state_dict()} - {None}
    assert names == expected


def test_exported_tokenizer_loads_in_transformers(tf, exported, tok):
    _, out = exported
    auto = tf.AutoTokenizer.from_pretrained(out, local_files_only=True)
    for text in ["12 + 7 = 19", "the cat <think> sat </think> on 3 mats", "über 🙂"]:
        assert auto.encode(text, add_special_tokens=False) == tok.encode(text)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert auto.apply_chat_template(chat, add_generation_prompt=True, tokenize=False).endswith(THINK_OPEN + "\n")
    ids = auto.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == render_prompt(tok, chat, R1)
    doc = json.loads((out / "config.json").read_text())
    assert (doc["bos_token_id"], doc["eos_token_id"], doc["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)


# ------------------------------------------------------------------ import
def test_import_round_trip_gives_identical_logits(exported):
    model, out = exported
    back = hf.import_hf(out)
    assert back.config.n_mtp_modules == 0 and back.config.q_lora_rank == 16 and back.config.rope_factor == 4.0
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    assert torch.equal(no_grad_logits(back, tokens), no_grad_logits(model, tokens))
    for gate, orig in zip(back.moe_gates(), model.moe_gates()):
        assert torch.equal(gate.expert_bias, orig.expert_bias)


@pytest.mark.parametrize("fused", [False, True])
def test_import_of_a_transformers_model(tf, tmp_path, fused):
    """A DeepseekV3 saved by transformers itself, and the same weights with fused expert tensors."""
    torch.manual_seed(5)
    config = hf.hf_config_from_model_config(moe_config(q_lora_rank=16))
    config.initializer_range = 0.1
    twin = tf.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, buf in twin.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.3)
    out = tmp_path / "hf"
    twin.save_pretrained(out)
    if fused:  # the in-memory layout: experts stacked into gate_up_proj / down_proj
        (out / hf.HF_WEIGHTS_FILE).unlink()
        save_file({k: v.contiguous() for k, v in twin.state_dict().items()}, out / hf.HF_WEIGHTS_FILE)
        assert "model.layers.1.mlp.experts.gate_up_proj" in load_file(out / hf.HF_WEIGHTS_FILE)
    model = hf.import_hf(out)
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(no_grad_logits(model, tokens), no_grad_logits(twin, tokens), atol=1e-4, rtol=1e-4)


def test_import_errors_name_the_problem(exported, tmp_path):
    _, out = exported
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.import_hf(tmp_path / "nowhere")
    tensors = load_file(out / hf.HF_WEIGHTS_FILE)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((out / "config.json").read_text())
    missing = "model.layers.2.mlp.experts.3.up_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != missing}, broken / hf.HF_WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        hf.import_hf(broken)
    save_file({**tensors, "model.layers.0.mlp.surprise": torch.zeros(2)}, broken / hf.HF_WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="surprise"):
        hf.import_hf(broken)
    save_file({**tensors, "model.norm.weight": torch.ones(3)}, broken / hf.HF_WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="shape"):
        hf.import_hf(broken)
    doc = json.loads((out / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**doc, "norm_topk_prob": False}))
    with pytest.raises(ConfigError, match="norm_topk_prob"):
        hf.import_hf(broken)


# ------------------------------------------------------------------ the decoder protocol
PROMPTS = [[5, 9, 3, 7, 1, 2, 8], [4, 6], [11, 12, 13, 14]]
PAD = 17


@pytest.fixture(scope="module", params=["r1lab", "qwen2", "deepseek_v3"])
def decoder_and_reference(request, tf, exported, qwen_dir):
    """(decoder driven through the protocol, full forward of one sequence -> its logits (T, V))."""
    if request.param == "r1lab":
        model = exported[0]
        return model, lambda seq: no_grad_logits(model, torch.tensor([seq]))[0]
    path = qwen_dir if request.param == "qwen2" else exported[1]
    decoder = hf.HFDecoder.from_pretrained(path, dtype=torch.float32)
    reference = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    return decoder, lambda seq: no_grad_logits(reference, torch.tensor([seq]))[0]


def prefill(decoder, prompts):
    """Right-padded prefill at positions arange(T); returns (cache, each row's real logits)."""
    B, T = len(prompts), max(map(len, prompts))
    tokens = torch.full((B, T), PAD)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
    cache = decoder.new_cache(B, 40)
    with torch.no_grad():
        logits = decoder(tokens, positions=torch.arange(T).expand(B, T), cache=cache)
    return cache, [logits[b, :len(p)] for b, p in enumerate(prompts)]


def decode(decoder, cache, seqs, logits, step, frozen=()):
    """One token per row at position len(seq); rows in `frozen` re-feed their last token instead."""
    feed, pos = [], []
    for b, seq in enumerate(seqs):
        if b in frozen:
            feed.append(seq[-1])
            pos.append(len(seq) - 1)
        else:
            seq.append((7 * step + 3 * b + 1) % VOCAB)
            feed.append(seq[-1])
            pos.append(len(seq) - 1)
    with torch.no_grad():
        out = decoder(torch.tensor(feed)[:, None], positions=torch.tensor(pos)[:, None], cache=cache)[:, 0]
    for b in range(len(seqs)):
        if b in frozen:
            torch.testing.assert_close(out[b], logits[b][-1], atol=1e-4, rtol=1e-4)
        else:
            logits[b] = torch.cat([logits[b], out[b][None]])


def check(reference, seqs, logits):
    for seq, got in zip(seqs, logits):
        assert got.shape[0] == len(seq)
        torch.testing.assert_close(got, reference(seq), atol=1e-4, rtol=1e-4)


def test_ragged_prefill_then_decode_matches_full_forwards(decoder_and_reference):
    decoder, reference = decoder_and_reference
    assert decoder.config.vocab_size == VOCAB and decoder.config.max_seq_len == 64
    cache, logits = prefill(decoder, PROMPTS)
    seqs = [list(p) for p in PROMPTS]
    for step in range(4):
        decode(decoder, cache, seqs, logits, step, frozen={1} if step == 2 else ())
    check(reference, seqs, logits)
    assert cache.batch_size == 3


def test_select_repeating_rows_keeps_decoding_right(decoder_and_reference):
    decoder, reference = decoder_and_reference
    cache, logits = prefill(decoder, PROMPTS[:2])
    cache.select(torch.tensor([0, 0, 1, 1]))  # rows: p0, p0, p1, p1
    seqs = [list(PROMPTS[0]), list(PROMPTS[0]), list(PROMPTS[1]), list(PROMPTS[1])]
    logits = [logits[0], logits[0], logits[1], logits[1]]
    for step in range(2):
        decode(decoder, cache, seqs, logits, step)
    keep = [3, 0, 2]
    cache.select(torch.tensor(keep))
    seqs, logits = [seqs[i] for i in keep], [logits[i] for i in keep]
    assert cache.batch_size == 3
    for step in range(2, 4):
        decode(decoder, cache, seqs, logits, step)
    check(reference, seqs, logits)


def test_extend_joins_caches_of_different_lengths(decoder_and_reference):
    decoder, reference = decoder_and_reference
    cache, logits = prefill(decoder, PROMPTS[:2])
    seqs = [list(p) for p in PROMPTS[:2]]
    decode(decoder, cache, seqs, logits, 0)
    joining, more = prefill(decoder, PROMPTS[2:])
    cache.extend(joining)
    seqs.append(list(PROMPTS[2]))
    logits += more
    assert cache.batch_size == 3
    for step in range(1, 4):
        decode(decoder, cache, seqs, logits, step)
    check(reference, seqs, logits)


def test_hf_decoder_without_cache_and_limits(tf, qwen_dir):
    decoder = hf.HFDecoder.from_pretrained(qwen_dir)
    reference = tf.AutoModelForCausalLM.from_pretrained(qwen_dir, local_files_only=True).eval()
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(decoder(tokens), reference(tokens).logits, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="position 64"):
            decoder(tokens[:, :1], positions=torch.tensor([[64]]))
    assert decoder.vocab_size == VOCAB and decoder.max_seq_len == 64
    assert not hasattr(decoder.config, "n_layers")
    assert sum(p.numel() for p in decoder.parameters()) == sum(p.numel() for p in reference.parameters())

    sliding = tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, use_sliding_window=True,
                                                 sliding_window=8, max_window_layers=0))
    with pytest.raises(ValueError, match="sliding"):
        hf.HFDecoder(sliding)


# ------------------------------------------------------------------ one loader
def test_load_causal_lm_opens_both_kinds(tf, tok, qwen_dir, tmp_path):
    model = random_model(moe_config())
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok)
    loaded, loaded_tok = hf.load_causal_lm(ckpt)
    assert isinstance(loaded, Transformer) and loaded_tok.encode("12 cats") == tok.encode("12 cats")
    tokens = torch.tensor([PROMPTS[0]])
    assert torch.equal(no_grad_logits(loaded, tokens), no_grad_logits(model, tokens))

    decoder, hf_tok = hf.load_causal_lm(qwen_dir)
    assert isinstance(decoder, hf.HFDecoder) and hf_tok.encode("12 cats") == tok.encode("12 cats")
    assert decoder.config.vocab_size == VOCAB

    with pytest.raises(FileNotFoundError, match="nowhere"):
        hf.load_causal_lm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_causal_lm(tmp_path / "empty")


# ------------------------------------------------------------------ r1lab export / r1lab import
def cli(capsys, *argv: str) -> tuple[int, str, str]:
    from r1lab.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_export_and_import_commands_round_trip(tf, tok, tmp_path, capsys):
    """A checkpoint exported by `r1lab export` gives the same logits in transformers; `r1lab import`
    brings it back with identical logits, its tokenizer and its metadata."""
    model = random_model(moe_config(**YARN))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok, metadata={"template": "r1-zero", "task": "arithmetic"})
    code, out, err = cli(capsys, "export", "--model", str(ckpt), "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert "exported" in out
    twin = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert twin.dtype == torch.float32
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    ours = no_grad_logits(model, tokens)
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(no_grad_logits(twin, tokens), ours, atol=1e-4, rtol=1e-4)

    code, _, err = cli(capsys, "import", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert code == 0, err
    from r1lab.checkpoint import load_checkpoint, read_metadata

    back, back_tok, _ = load_checkpoint(tmp_path / "back")
    assert torch.equal(no_grad_logits(back.eval(), tokens), ours)
    assert back_tok.encode("12 + 7 = 19") == tok.encode("12 + 7 = 19")
    assert read_metadata(tmp_path / "back") == {"template": "r1-zero", "task": "arithmetic"}


def test_export_and_import_commands_refuse_bad_input(tf, tok, tmp_path, capsys, qwen_dir):
    softmax = save_checkpoint(tmp_path / "softmax", random_model(moe_config(score_func="softmax", n_expert_groups=1,
                                                                            n_limited_groups=1)), tok)
    cases = [
        (["export", "--model", str(softmax), "--out", str(tmp_path / "a")], "score_func"),
        (["export", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")], "nowhere"),
        (["export", "--model", str(softmax), "--out", str(qwen_dir)], "not empty"),
        (["import", "--model", str(qwen_dir), "--out", str(tmp_path / "c")], "model_type 'qwen2'"),
        (["import", "--model", str(softmax), "--out", str(tmp_path / "d")], "already an r1lab checkpoint"),
        (["import", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e")], "nowhere"),
    ]
    for argv, message in cases:
        code, _, err = cli(capsys, *argv)
        assert code == 2, argv
        assert err.startswith("r1lab: error:") and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
