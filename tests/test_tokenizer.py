import json
import random

import pytest
from tokenizers import AddedToken, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from r1lab.tokenizer import (
    ANSWER_CLOSE, ANSWER_OPEN, ASSISTANT, BOS, EOS, PAD, R1_CHAT_TEMPLATE_JINJA, TAGS, THINK_CLOSE,
    THINK_OPEN, USER, IncrementalDecoder, Tokenizer, render_conversation, render_prompt,
    split_reasoning, strip_reasoning,
)

ALL_SPECIAL = (BOS, EOS, PAD, THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, USER, ASSISTANT)
R1_ZERO_TEXT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. User: What is 2+3?. Assistant:"
)
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "<think>\nsecret plan\n</think>\n\nHello!"},
    {"role": "user", "content": "What is 12+30?"},
]


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """ASCII words and arithmetic, a few accented words, no emoji (so emoji stay byte tokens)."""
    rng = random.Random(seed)
    words = "the cat sat on a mat and then we add numbers together carefully café naïve".split()
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        lines.append(f"{sentence}. {a} + {b} = {a + b}\n<think> {sentence} </think> "
                     f"<answer> {a + b} </answer>")
    return lines


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus(), vocab_size=512)


def test_train_respects_vocab_size_and_rejects_tiny_ones(tok):
    assert 300 < tok.vocab_size <= 512
    with pytest.raises(ValueError, match="vocab_size=100"):
        Tokenizer.train(["abc"], vocab_size=100)


def test_round_trip_is_exact(tok):
    texts = [
        "the cat sat on the mat",
        "  leading and trailing spaces  \n\n\ttabs\r\nand CRLF",
        "café naïve Ünïcödé ẞ 你好，世界 こんにちは Привет مرحبا",
        "emoji 😀 👩‍👩‍👧 🇫🇷 and combining e\u0301",
        "digits 0123456789 -3.14e10 1,000,000",
        "tags <think> inner </think> <answer> 42 </answer><｜User｜>x<｜Assistant｜>",
        "",
    ]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_digits_are_single_tokens(tok):
    digit_ids = [tok.token_to_id(d) for d in "0123456789"]
    assert None not in digit_ids
    assert tok.encode("9071") == [digit_ids[9], digit_ids[0], digit_ids[7], digit_ids[1]]
    for token_id in tok.encode("x 12345 + 67890 = 80235 in 2025"):
        piece = tok.decode([token_id])
        if any(c.isdigit() for c in piece):
            assert len(piece) == 1, piece


def test_every_special_token_is_one_id_and_round_trips(tok):
    ids = [tok.token_to_id(t) for t in ALL_SPECIAL]
    assert len(set(ids)) == len(ALL_SPECIAL) and None not in ids
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(ids[:3])
    for token, token_id in zip(ALL_SPECIAL, ids):
        assert tok.encode(token) == [token_id]
        assert tok.decode([token_id]) == token
        assert token_id in tok.encode(f"a{token}b")


def test_skip_special_drops_control_tokens_only(tok):
    body = "<think> 1 + 1 </think> <answer> 2 </answer>"
    ids = [tok.bos_id] + tok.encode(body) + [tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(ids, skip_special=True) == body
    assert tok.decode(ids) == BOS + body + EOS + PAD + PAD
    user = tok.token_to_id(USER)
    assert tok.decode([user], skip_special=True) == USER


def test_r1_zero_prompt_and_conversation(tok):
    prompt = render_prompt(tok, "What is 2+3?", "r1-zero")
    assert prompt[0] == tok.bos_id
    assert tok.decode(prompt) == BOS + R1_ZERO_TEXT
    completion = "<think> 2 plus 3 is 5 </think> <answer> 5 </answer>"
    messages = [{"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": completion}]
    ids, mask = render_conversation(tok, messages, "r1-zero")
    assert tok.decode(ids) == BOS + R1_ZERO_TEXT + completion + EOS
    assert ids[:len(prompt)] == prompt
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == completion + EOS


def test_r1_prompt_strips_history_reasoning(tok):
    ids = render_prompt(tok, HISTORY, "r1")
    assert tok.decode(ids) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi there<｜Assistant｜>Hello!"
        "<｜end▁of▁sentence｜><｜User｜>What is 12+30?<｜Assistant｜><think>\n"
    )
    assert "secret" not in tok.decode(ids)
    assert tok.decode(render_prompt(tok, "Hi", "r1")) == f"{BOS}{USER}Hi{ASSISTANT}{THINK_OPEN}\n"


def test_r1_conversation_masks_exactly_the_final_assistant_turn(tok):
    final = {"role": "assistant", "content": "<think>\n12 plus 30 is 42\n</think>\n\n42"}
    ids, mask = render_conversation(tok, HISTORY + [final], "r1")
    assert tok.decode(ids) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi there<｜Assistant｜>Hello!"
        "<｜end▁of▁sentence｜><｜User｜>What is 12+30?<｜Assistant｜><think>\n"
        "12 plus 30 is 42\n</think>\n\n42<｜end▁of▁sentence｜>"
    )
    prompt = render_prompt(tok, HISTORY, "r1")
    assert ids[:len(prompt)] == prompt
    assert len(ids) == len(mask)
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    assert ids[-1] == tok.eos_id and mask[-1] == 1
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "12 plus 30 is 42\n</think>\n\n42" + EOS
    # the history's EOS is not trained on
    eos_positions = [i for i, t in enumerate(ids) if t == tok.eos_id]
    assert len(eos_positions) == 2 and mask[eos_positions[0]] == 0


def test_r1_conversation_without_reasoning_gets_an_empty_think_block(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    ids, mask = render_conversation(tok, messages, "r1")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "</think>\n\nHello!" + EOS
    assert split_reasoning(tok.decode(ids[mask.index(1):], skip_special=True)) == ("", "Hello!")


def test_template_errors_name_the_problem(tok):
    with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
        render_prompt(tok, "q", "chatml")
    with pytest.raises(ValueError, match="last message must be from the user"):
        render_prompt(tok, HISTORY[:3], "r1")
    with pytest.raises(ValueError, match="r1-zero template takes one user question"):
        render_prompt(tok, HISTORY, "r1-zero")
    with pytest.raises(ValueError, match="message 0 has role 'tool'"):
        render_prompt(tok, [{"role": "tool", "content": "x"}], "r1")
    with pytest.raises(ValueError, match="last message must be from the assistant"):
        render_conversation(tok, HISTORY, "r1")


def test_split_reasoning():
    assert split_reasoning("<think> a\nb </think> <answer>5</answer>") == ("a\nb", "<answer>5</answer>")
    assert split_reasoning("opened by the prompt\n</think>\n\n42") == ("opened by the prompt", "42")
    assert split_reasoning("<think> still going") == ("still going", "")
    assert split_reasoning("still going", think_opened=True) == ("still going", "")
    assert split_reasoning("just an answer") == ("", "just an answer")
    assert split_reasoning("<think></think>x") == ("", "x")
    assert strip_reasoning("<think>r</think>\n\nans") == "ans"
    assert strip_reasoning("no tags") == "no tags"


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "tk")
    config = json.loads((tmp_path / "tk" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, EOS, PAD)
    for loaded in (Tokenizer.load(tmp_path / "tk"), Tokenizer.load(tmp_path / "tk" / "tokenizer.json")):
        assert loaded.vocab_size == tok.vocab_size
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
        assert loaded.backend.to_str() == tok.backend.to_str()
        for text in ["café 😀 123", R1_ZERO_TEXT, "".join(ALL_SPECIAL)]:
            assert loaded.encode(text) == tok.encode(text)
        assert render_prompt(loaded, HISTORY, "r1") == render_prompt(tok, HISTORY, "r1")


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def _foreign_tokenizer(directory, config: dict | None):
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "[PAD]": 3, "hello": 4, "world": 5}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>", "[PAD]")])
    directory.mkdir()
    backend.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))


def test_load_foreign_tokenizer_uses_its_special_tokens(tmp_path):
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True},
              "pad_token": "[PAD]"}
    _foreign_tokenizer(tmp_path / "hf", config)
    tok = Tokenizer.load(tmp_path / "hf")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.encode("hello world") == [4, 5]
    assert tok.vocab_size == 6 + len(TAGS)  # only our tags were added
    for tag in TAGS:
        assert tok.encode(tag) == [tok.token_to_id(tag)] and tok.token_to_id(tag) >= 6
    assert tok.decode([1, 4, 5, 2, 3], skip_special=True) == "hello world"
    ids = render_prompt(tok, "hello", "r1")
    assert ids[:3] == [1, tok.token_to_id(USER), 4]


def test_load_foreign_tokenizer_without_config_adds_ours(tmp_path):
    _foreign_tokenizer(tmp_path / "hf", None)
    tok = Tokenizer.load(tmp_path / "hf")
    assert tok.vocab_size == 6 + 3 + len(TAGS)
    assert tok.decode([tok.bos_id]) == BOS and tok.bos_id >= 6
    assert tok.encode(EOS) == [tok.eos_id]
    # the foreign tokenizer's own specials are still dropped when skipping
    assert tok.decode([1, 4, tok.eos_id], skip_special=True) == "hello"


def test_incremental_decoder_never_splits_a_character(tok):
    assert len(tok.encode("😀")) == 4  # the corpus had no emoji: one token per byte
    text = "ok 😀 done, 你好 👩‍👩‍👧 café 42"
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in tok.encode(text)]
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # something was held back mid-character
    assert "".join(pieces) + decoder.flush() == text


def test_incremental_decoder_skips_control_tokens_and_flushes_broken_tails(tok):
    decoder = IncrementalDecoder(tok, skip_special=True)
    ids = [tok.bos_id] + tok.encode("<think> hi </think>") + [tok.eos_id]
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "<think> hi </think>"
    decoder = IncrementalDecoder(tok)
    assert [decoder.push(i) for i in tok.encode("a😀")[:3]] == ["a", "", ""]
    assert decoder.flush() == "\ufffd"


def test_jinja_chat_template_matches_render_prompt(tok):
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(R1_CHAT_TEMPLATE_JINJA)
    for messages in (HISTORY, HISTORY[1:2]):
        text = template.render(messages=messages, bos_token=BOS, eos_token=EOS,
                               add_generation_prompt=True)
        assert text == tok.decode(render_prompt(tok, messages, "r1"))
