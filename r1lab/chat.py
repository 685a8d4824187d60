"""Terminal chat with a checkpoint: `r1lab chat --model DIR`.

It drives the engine directly (no server) and streams each reply as it is generated: the chain of
thought first, dimmed when stdout is a terminal, or with every line prefixed ``thinking: `` when
it is not (so a piped transcript stays readable and greppable), then the answer. Commands:
``/reset`` forgets the conversation, ``/exit`` (or end of input) leaves. When stdin is not a
terminal it reads one message per line until EOF, so ``r1lab chat --model DIR < questions.txt``
works. Ctrl-C stops the reply being generated; a second Ctrl-C at the prompt leaves.

Earlier turns are sent back without their reasoning, as the server does (see r1lab.serve).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from r1lab.engine import SamplingParams
from r1lab.serve.assistant import REASONING, SampleDecoder, ServedModel, chat_prompt, make_engine
from r1lab.tokenizer import template_stop_ids

DIM, RESET = "\x1b[2m", "\x1b[0m"
PREFIX = "thinking: "
HELP = "commands: /reset (new conversation), /exit (leave)"


class _Printer:
    """Writes reasoning and answer pieces as they stream, in the style the output device wants."""

    def __init__(self, out: TextIO, color: bool):
        self.out, self.color = out, color
        self.part: str | None = None
        self.started = time.perf_counter()

    def write(self, kind: str, text: str) -> None:
        if kind != self.part:
            if self.part == REASONING:
                self._end_reasoning()
                self.out.write("\n")
            if kind == REASONING:
                self.out.write(DIM if self.color else PREFIX)
            self.part = kind
        if kind == REASONING and not self.color:
            text = text.replace("\n", "\n" + PREFIX)
        self.out.write(text)
        self.out.flush()

    def _end_reasoning(self) -> None:
        if self.color:
            self.out.write(f"{RESET}\n{DIM}(thought for {time.perf_counter() - self.started:.1f} s){RESET}\n")
        else:
            self.out.write("\n")

    def close(self, note: str | None = None) -> None:
        if self.part == REASONING:
            self._end_reasoning()
        elif self.part is not None:
            self.out.write("\n")
        if note:
            self.out.write(f"[{note}]\n")
        self.out.flush()


def run_chat(model: ServedModel, stdin: TextIO | None = None, stdout: TextIO | None = None, *,
             temperature: float = 0.6, top_p: float = 0.95, max_tokens: int | None = None,
             seed: int | None = None) -> int:
    """The read-reply loop; returns the exit code."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty() and stdout.isatty()
    color = stdout.isatty()
    engine = make_engine(model, max_batch_size=1)
    history: list[dict[str, str]] = []
    if interactive:
        stdout.write(f"r1lab chat with {model.name} ({model.template} template). {HELP}\n")
    turn = 0
    while True:
        try:
            line = _read(stdin, stdout, interactive)
        except KeyboardInterrupt:
            stdout.write("\n")
            return 0
        if line is None:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            stdout.write("[new conversation]\n")
            continue
        if text.startswith("/"):
            stdout.write(f"[unknown command {text.split()[0]}; {HELP}]\n")
            continue
        history.append({"role": "user", "content": text})
        prompt = chat_prompt(model, history)
        room = model.max_len - len(prompt)
        if room < 1:
            history.pop()
            stdout.write(f"[the conversation is {len(prompt)} tokens, over the model's {model.max_len}; /reset]\n")
            continue
        params = SamplingParams(max_new_tokens=min(max_tokens or room, room), temperature=temperature, top_p=top_p,
                                seed=None if seed is None else seed + turn,
                                stop_token_ids=template_stop_ids(model.tokenizer, model.template))
        turn += 1
        answer = _reply(engine, model, prompt, params, _Printer(stdout, color))
        history.append({"role": "assistant", "content": answer})


def _read(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    if interactive and stdin is sys.stdin:
        try:
            return input("you> ")
        except EOFError:
            stdout.write("\n")
            return None
    if interactive:
        stdout.write("you> ")
        stdout.flush()
    line = stdin.readline()
    return line if line else None


def _reply(engine, model: ServedModel, prompt: list[int], params: SamplingParams, printer: _Printer) -> str:
    sample = SampleDecoder(model.tokenizer, model.template)
    request_id = engine.add_request(prompt, params)
    note = None
    finished = False
    try:
        while not finished:
            for ev in engine.step():
                if ev.request_id != request_id:
                    continue
                pieces = [p for token in ev.token_ids for p in sample.push(token)]
                if ev.finish_reason is not None:
                    pieces += sample.finish()
                    finished = True
                    note = "stopped at the token limit" if ev.finish_reason == "length" else None
                for kind, text in pieces:
                    printer.write(kind, text)
    except KeyboardInterrupt:
        engine.cancel(request_id)
        while engine.has_work():
            engine.step()
        note = "stopped"
    printer.close(note)
    return sample.content_text
