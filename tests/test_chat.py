"""The terminal chat: streamed reasoning (dimmed on a terminal, "thinking:" lines when piped), /reset, /exit, EOF."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import torch
from test_serve import fake_model, train_tokenizer

from r1lab.chat import DIM, RESET, run_chat
from r1lab.checkpoint import save_checkpoint
from r1lab.model import Transformer


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def chat(lines: list[str], stdout=None, **kw):
    tok = train_tokenizer()
    model = fake_model(tok)
    out = stdout or io.StringIO()
    code = run_chat(model, io.StringIO("".join(line + "\n" for line in lines)), out, **kw)
    return code, out.getvalue(), model.decoder.prompts


def test_piped_chat_prefixes_reasoning_and_prints_answers_until_eof():
    code, out, prompts = chat(["What is 6 times 7?", "", "What is 2 plus 1?"])
    assert code == 0
    assert out == ("thinking: step\n\nThe answer is 42.\n"
                   "thinking: 2 plus one.\n\nThe answer is 3.\n")
    assert "\x1b[" not in out
    # The second prompt carries the first turn's answer but not its reasoning.
    assert "The answer is 42." in prompts[1] and "step" not in prompts[1]


def test_reset_forgets_and_exit_stops_reading():
    code, out, prompts = chat(["What is 6 times 7?", "/reset", "What is 4 plus 1?", "/exit", "What is 8 plus 1?"])
    assert code == 0
    assert "[new conversation]" in out and "The answer is 5." in out and "The answer is 9." not in out
    assert "The answer is 42." not in prompts[1]  # forgotten by /reset
    _, out, _ = chat(["/help"])
    assert "unknown command /help" in out


def test_multiline_reasoning_is_prefixed_on_every_line():
    tok = train_tokenizer()
    model = fake_model(tok, reply=lambda prompt: "one\ntwo\n</think>\n\nthree")
    out = io.StringIO()
    run_chat(model, io.StringIO("hi\n"), out)
    assert out.getvalue() == "thinking: one\nthinking: two\n\nthree\n"


def test_terminal_output_dims_the_reasoning():
    _, out, _ = chat(["What is 6 times 7?"], stdout=FakeTTY())
    assert out.startswith(DIM + "step" + RESET) and "thought for" in out
    assert out.rstrip().endswith("The answer is 42.") and "thinking:" not in out


def test_token_limit_is_reported():
    _, out, _ = chat(["please ramble"], max_tokens=5)
    assert out == "thinking: and so\n[stopped at the token limit]\n"


def test_r1lab_chat_command_on_a_real_checkpoint(tmp_path, make_config):
    tok = train_tokenizer()
    torch.manual_seed(0)
    model = Transformer(make_config(vocab_size=tok.vocab_size, max_seq_len=128, original_seq_len=128)).eval()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-m", "r1lab.cli", "chat", "--model", str(tmp_path / "ckpt"),
                          "--max-tokens", "6", "--seed", "0"], input="hello\n/reset\nagain\n", capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("[stopped at the token limit]") == 2 and "[new conversation]" in run.stdout
    missing = subprocess.run([sys.executable, "-m", "r1lab.cli", "chat", "--model", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120, env=env)
    assert missing.returncode == 2 and "no such model directory" in missing.stderr
