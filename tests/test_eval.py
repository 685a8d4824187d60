"""The evaluation harness: metrics against enumeration, exact scores on a scripted model, resume,
an OpenAI-compatible endpoint served from the test, and the `r1lab eval` command."""

import itertools
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch import nn

from r1lab.checkpoint import save_checkpoint
from r1lab.cli import main
from r1lab.engine import Engine, SamplingParams
from r1lab.eval import (
    MATH_INSTRUCTION,
    EvalError,
    bench_label,
    evaluate,
    load_examples,
    majority_vote,
    pass_at_k,
)
from r1lab.evalapi import EndpointError, _samples, evaluate_endpoint
from r1lab.evalreport import GREEDY, SAMPLED, BestDecoding, best_decoding, compare_results, default_ks, verdict
from r1lab.model import Transformer
from r1lab.sampling import question_text
from r1lab.tasks.benchmarks import BenchmarkNotFoundError, candidate_dirs
from r1lab.tokenizer import R1, R1_ZERO, R1_ZERO_PROMPT, Tokenizer, render_prompt, split_reasoning


# ------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("n, c", [(1, 0), (1, 1), (4, 1), (5, 2), (6, 3), (7, 0), (7, 7), (8, 5)])
def test_pass_at_k_equals_enumeration_over_k_subsets(n, c):
    outcomes = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(outcomes, k))
        exact = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)  # pass@1 is the mean correctness


def test_pass_at_k_is_stable_for_large_n_and_rejects_bad_arguments():
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert pass_at_k(1000, 10, 500) == pytest.approx(1 - math.comb(990, 500) / math.comb(1000, 500))
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_majority_vote_on_crafted_votes():
    clear = majority_vote(["3", "5", "5", None, "5", "3"])
    assert (clear.answer, clear.index, clear.votes, clear.tied) == ("5", 1, 3, 1)
    tie = majority_vote(["7", "2", "2", "7", "9"])  # 7 and 2 both have two votes: 7 came first
    assert (tie.answer, tie.index, tie.votes, tie.tied) == ("7", 0, 2, 2)
    same = majority_vote(["\\frac{1}{2}", "4", "0.5", "\\dfrac12", "4"])  # one half, written three ways
    assert (same.answer, same.index, same.votes, same.tied) == ("\\frac{1}{2}", 0, 3, 1)
    spaced = majority_vote(["x = 3", "2", "3"])
    assert (spaced.answer, spaced.votes) == ("x = 3", 2)
    none = majority_vote([None, None, " "])
    assert (none.answer, none.index, none.votes, none.tied) == (None, None, 0, 0)


# ------------------------------------------------------------------------------------- a scripted model
@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    corpus = [R1_ZERO_PROMPT, MATH_INSTRUCTION, "What is 12 + 34? The answer is \\boxed{46}.",
              "<think> reasoning here </think> <answer> answer here </answer>"] * 20
    return Tokenizer.train(corpus, vocab_size=320)


class ScriptCache:
    """Remembers every row's tokens, so the scripted decoder can look up what comes next."""

    def __init__(self, batch_size: int, max_len: int):
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_len(self) -> int:
        return self.tokens.shape[1]

    def select(self, rows):
        self.tokens = self.tokens[rows]

    def repeat_interleave(self, n):
        self.tokens = self.tokens.repeat_interleave(n, dim=0)

    def extend(self, other):  # the shorter cache's rows padded to the longer's slots
        width = max(self.max_len, other.max_len)
        self.tokens = torch.cat([F.pad(t, (0, width - t.shape[1])) for t in (self.tokens, other.tokens)])


class ScriptedDecoder(nn.Module):
    """Decoder protocol whose logits force `script[prompt]` after each prompt, then EOS."""

    def __init__(self, scripts: dict[tuple[int, ...], list[int]], vocab_size: int, eos_id: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, max_seq_len=2048)
        self.anchor = nn.Parameter(torch.zeros(1))  # the engine reads the device off a parameter
        self.eos_id = eos_id
        self.next = {}
        for prompt, completion in scripts.items():
            seq = list(prompt) + list(completion)
            for j in range(len(prompt), len(seq)):
                self.next[tuple(seq[:j])] = seq[j]

    def new_cache(self, batch_size, max_len=None):
        return ScriptCache(batch_size, max_len or self.config.max_seq_len)

    def forward(self, tokens, positions=None, cache=None, n_slots=None):
        B, T = tokens.shape
        cache.tokens[torch.arange(B)[:, None].expand(B, T), positions] = tokens
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            history = cache.tokens[b].tolist()
            for t in range(T):
                p = int(positions[b, t])
                logits[b, t, self.next.get(tuple(history[:p + 1]), self.eos_id)] = 100.0
        return logits


class CountingEngine(Engine):
    """An engine that counts the prompts it is asked for, and can fail on a chosen call."""

    def __init__(self, *args, fail_on_call: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts, self.calls, self.fail_on_call = 0, 0, fail_on_call

    def generate(self, prompts, params, first_index=0):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        self.prompts += len(prompts)
        return super().generate(prompts, params)


ZERO_ITEMS = [  # (question, gold, scripted completion under R1-Zero)
    ("What is 2 + 2?", "4", "<think> 2 plus 2 </think> <answer>4</answer>"),       # right, formatted
    ("What is 3 + 4?", "7", "<think> 3 plus 4 </think> <answer>8</answer>"),       # wrong, formatted
    ("What is 5 + 1?", "6", "<answer>6</answer>"),                                 # right, no <think>
    ("What is 9 + 9?", "18", "<think> " + "let me think again " * 12),             # cut off by the limit
]


def scripted_engine(tokenizer, items, template, instruction="", engine_cls=CountingEngine, **kw):
    examples = [{"id": f"q{i}", "prompt": q, "answer": gold} for i, (q, gold, _) in enumerate(items)]
    scripts = {tuple(render_prompt(tokenizer, question_text(ex, instruction), template)):
               tokenizer.encode(text) + [tokenizer.eos_id] for ex, (_, _, text) in zip(examples, items)}
    decoder = ScriptedDecoder(scripts, tokenizer.vocab_size, tokenizer.eos_id)
    return engine_cls(decoder, tokenizer.eos_id, **kw), examples


PARAMS = SamplingParams(max_new_tokens=30, temperature=0.6, top_p=0.95, seed=1)


def test_scripted_model_gives_exactly_known_scores(tokenizer, tmp_path):
    engine, examples = scripted_engine(tokenizer, ZERO_ITEMS, R1_ZERO)
    result = evaluate(engine, tokenizer, examples, k=3, params=PARAMS, template=R1_ZERO, ks=(1, 2, 3),
                      out_dir=tmp_path, peak_gflops=1.0)
    m = result.metrics
    assert (m["items"], m["samples"]) == (4, 12)
    assert m["pass@1"] == m["pass@2"] == m["pass@3"] == m["cons@3"] == 0.5
    assert m["format_rate"] == 0.5 and m["answer_rate"] == 0.75 and m["truncated"] == 0.25
    # R1-Zero stops right after </answer> (a stop id), so no EOS is generated there.
    lengths = [len(tokenizer.encode(text)) for _, _, text in ZERO_ITEMS[:3]] + [30]
    assert m["mean_tokens"] == pytest.approx(sum(lengths) / 4) and m["max_tokens"] == 30
    assert result.settings["instruction"] == "" and result.cost["flops"] is None  # not an r1lab model
    items = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [it["id"] for it in items] == ["q0", "q1", "q2", "q3"]
    first = items[0]["completions"][0]
    assert first["text"] == ZERO_ITEMS[0][2] and first["answer"] == "4" and first["correct"] == 1.0
    assert first["format"] == 1.0 and first["finish_reason"] == "stop"
    assert items[1]["cons"] == {"answer": "8", "votes": 3, "tied": 1, "correct": 0.0}
    assert items[3]["completions"][0]["finish_reason"] == "length" and items[3]["completions"][0]["answer"] is None
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"] == m and saved["settings"]["sampling"]["temperature"] == 0.6
    md = (tmp_path / "results.md").read_text()
    assert "| pass@1 (%) | 50.0 |" in md and "| cons@3 (majority vote) (%) | 50.0 |" in md


def test_r1_template_appends_the_instruction_and_grades_the_answer_part(tokenizer):
    items = [("What is 2 + 2?", "4", "2 plus 2 is 4.</think>\n\nThe answer is \\boxed{4}"),
             ("What is 3 + 3?", "6", "3 plus 3 is 6, let me check again and again")]  # never closes
    engine, examples = scripted_engine(tokenizer, items, R1, instruction=MATH_INSTRUCTION)
    result = evaluate(engine, tokenizer, examples, k=2, params=PARAMS, template=R1)
    assert result.settings["instruction"] == MATH_INSTRUCTION and result.settings["think_opened"] is True
    assert result.metrics["pass@1"] == 0.5 and result.metrics["format_rate"] == 0.0
    assert result.items[0]["completions"][0]["answer"] == "4" and result.items[1]["cons"]["answer"] is None
    whole = evaluate(engine, tokenizer, examples, k=2, params=PARAMS, template=R1, grade="completion")
    assert whole.metrics["pass@1"] == 1.0  # the last number of the unfinished reasoning counts


def test_resume_skips_finished_items_and_reproduces_an_uninterrupted_run(tokenizer, tmp_path):
    clean_engine, examples = scripted_engine(tokenizer, ZERO_ITEMS, R1_ZERO)
    clean = evaluate(clean_engine, tokenizer, examples, k=2, params=PARAMS, template=R1_ZERO,
                     chunk_size=2, out_dir=tmp_path / "clean", peak_gflops=1.0)
    broken, _ = scripted_engine(tokenizer, ZERO_ITEMS, R1_ZERO, fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(broken, tokenizer, examples, k=2, params=PARAMS, template=R1_ZERO, chunk_size=2,
                 out_dir=tmp_path / "run", peak_gflops=1.0)
    samples = tmp_path / "run" / "samples.jsonl"
    assert len(samples.read_text().splitlines()) == 2
    with open(samples, "a") as f:
        f.write('{"id": "q2", "prom')  # a write cut short by the interruption
    again, _ = scripted_engine(tokenizer, ZERO_ITEMS, R1_ZERO)
    resumed = evaluate(again, tokenizer, examples, k=2, params=PARAMS, template=R1_ZERO, chunk_size=2,
                       out_dir=tmp_path / "run", peak_gflops=1.0)
    assert again.prompts == 2 and resumed.metrics == clean.metrics
    assert [c["text"] for it in resumed.items for c in it["completions"]] == \
        [c["text"] for it in clean.items for c in it["completions"]]
    assert len(samples.read_text().splitlines()) == 4
    done, _ = scripted_engine(tokenizer, ZERO_ITEMS, R1_ZERO)
    evaluate(done, tokenizer, examples, k=2, params=PARAMS, template=R1_ZERO, chunk_size=2,
             out_dir=tmp_path / "run", peak_gflops=1.0)
    assert done.prompts == 0
    hotter = SamplingParams(max_new_tokens=30, temperature=1.0, seed=1)
    with pytest.raises(EvalError, match="temperature"):
        evaluate(done, tokenizer, examples, k=2, params=hotter, template=R1_ZERO, out_dir=tmp_path / "run")
    evaluate(done, tokenizer, examples, k=2, params=hotter, template=R1_ZERO, out_dir=tmp_path / "run",
             resume=False, peak_gflops=1.0)
    assert done.prompts == 4


def test_real_model_counts_flops_and_skips_prompts_that_do_not_fit(tokenizer):
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=128, original_seq_len=128)).eval()
    engine = Engine(model, tokenizer.eos_id, max_len=128)
    examples = [{"id": "short", "prompt": "What is 1 + 1?", "answer": "2"},
                {"id": "long", "prompt": "What is 1 + 1? " * 40, "answer": "2"}]
    result = evaluate(engine, tokenizer, examples, k=2, params=replace_tokens(PARAMS, 4), template=R1,
                      peak_gflops=10.0)
    assert result.metrics["skipped_items"] == 1 and "does not fit" in result.items[1]["skipped"]
    assert result.items[1]["cons"]["correct"] == 0.0
    cost = result.cost
    assert cost["flops"] > 0 and cost["cores"] == torch.get_num_threads()
    assert cost["mfu"] == pytest.approx(cost["flops"] / cost["wall_seconds"] / 10e9)
    assert cost["core_hours"] == pytest.approx(cost["wall_seconds"] * cost["cores"] / 3600)


def test_greedy_run_is_deterministic_and_attached_with_the_best_decoding(tokenizer, tmp_path):
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=96, original_seq_len=96)).eval()
    examples = [{"id": f"q{i}", "prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(5)]
    runs = []
    for name in ("a", "b"):
        engine = Engine(model, tokenizer.eos_id, max_len=96)
        runs.append(evaluate(engine, tokenizer, examples, k=4, params=replace_tokens(PARAMS, 12), template=R1,
                             out_dir=tmp_path / name, peak_gflops=1.0, greedy=True))
    a, b = runs
    assert a.greedy is not None and a.greedy.settings["sampling"]["temperature"] == 0.0
    texts = [[c["text"] for c in it["completions"]] for it in a.greedy.items]
    assert all(len(t) == 1 for t in texts) and texts == [[c["text"] for c in it["completions"]] for it in b.greedy.items]
    assert a.greedy.metrics == b.greedy.metrics
    best = a.best()
    assert best["pass@1"] == max(a.greedy.metrics["pass@1"], a.metrics["pass@1"])
    doc = json.loads((tmp_path / "a" / "results.json").read_text())
    assert doc["greedy"]["pass@1"] == a.greedy.metrics["pass@1"] and doc["best"] == best
    assert (tmp_path / "a" / "greedy" / "samples.jsonl").is_file()
    assert "| greedy pass@1 (%) |" in (tmp_path / "a" / "results.md").read_text()
    assert set(a.settings["ks"]) == {1, 2, 4}


def test_default_ks_are_powers_of_two_up_to_k():
    assert default_ks(1) == [1] and default_ks(4) == [1, 2, 4] and default_ks(32) == [1, 2, 4, 8, 16, 32]
    assert default_ks(12) == [1, 2, 4, 8, 12]


def _scores(n_right: int, n: int, value: float = 1.0) -> dict[str, float]:
    return {f"q{i}": (value if i < n_right else 0.0) for i in range(n)}


def test_verdict_is_decided_at_each_models_best_decoding():
    # What a fresh clone measured: at T=0.6 RL is ahead, but the control's greedy decoding wins.
    rl = best_decoding(greedy=_scores(177, 200), sampled=_scores(172, 200))
    control = best_decoding(greedy=_scores(199, 200), sampled=_scores(137, 200))
    assert (rl.decoding, control.decoding) == (GREEDY, GREEDY)
    v = verdict("RL", rl, "control", control)
    assert not v.beat and v.margin == pytest.approx((177 - 199) / 200)
    assert "did not beat" in v.sentence()
    # Compared at T=0.6 only, the same numbers would have looked like a win: that is what the verdict refuses.
    at_t06 = verdict("RL", BestDecoding(SAMPLED, 0.86, _scores(172, 200)), "control",
                     BestDecoding(SAMPLED, 0.685, _scores(137, 200)))
    assert at_t06.beat
    # A clear win at best decoding beats; a margin inside the noise does not.
    strong = verdict("RL", best_decoding(_scores(180, 200), _scores(170, 200)), "base",
                     best_decoding(_scores(100, 200), _scores(90, 200)))
    assert strong.beat and strong.margin == pytest.approx(0.4) and "RL beat base" in strong.sentence()
    noisy_a = {f"q{i}": float(i % 2) for i in range(20)}
    noisy_b = {f"q{i}": float((i + 1) % 2 if i < 2 else i % 2) for i in range(20)}  # differ on two items
    noisy = verdict("A", best_decoding(noisy_a, noisy_a), "B", best_decoding(noisy_b, noisy_b))
    assert noisy.margin == 0.0 and not noisy.beat
    one_item = verdict("A", best_decoding(_scores(11, 20), _scores(0, 20)), "B", best_decoding(_scores(10, 20), _scores(0, 20)))
    assert one_item.margin == pytest.approx(0.05) and not one_item.beat
    with pytest.raises(ValueError):
        verdict("A", best_decoding(_scores(1, 3), _scores(1, 3)), "B", best_decoding(_scores(1, 4), _scores(1, 4)))


def replace_tokens(params: SamplingParams, n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=params.temperature, top_p=params.top_p, seed=params.seed)


# ------------------------------------------------------------------------------------- data
def test_load_examples_task_family_held_out_split_and_errors(tmp_path):
    examples = load_examples("arithmetic", limit=5, seed=3, difficulty=2)
    assert len(examples) == 5 and all(ex["split"] == "test" and ex["family"] == "arithmetic" for ex in examples)
    assert bench_label("arithmetic", 2) == "arithmetic-d2" and bench_label("math500") == "math500"
    file = tmp_path / "mine.jsonl"
    file.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    assert load_examples(str(file))[0]["answer"] == "2" and bench_label(str(file)) == "mine"
    with pytest.raises(BenchmarkNotFoundError, match="task family"):
        load_examples("nosuchbench")
    with pytest.raises(EvalError, match="distinct test problems"):
        load_examples("arithmetic", limit=500, difficulty=1)
    everything = load_examples("arithmetic")  # no limit: all of the small held-out space at difficulty 1
    assert 0 < len(everything) < 200 and everything[:5] == load_examples("arithmetic", limit=5)


# ------------------------------------------------------------------------------------- an OpenAI-compatible endpoint
class FakeChatServer(ThreadingHTTPServer):
    """/v1/chat/completions with `reasoning_content`: right answers to even questions, none to odd ones."""

    def __init__(self, refuse_n=False, fail_first=0):
        super().__init__(("127.0.0.1", 0), FakeChatHandler)
        self.refuse_n, self.fail_first, self.requests = refuse_n, fail_first, []
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class FakeChatHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        if self.headers.get("Authorization") != "Bearer sk-test":
            return self.reply(401, {"error": {"message": "invalid api key"}})
        if self.path != "/v1/chat/completions" or body["model"] != "fake-r1":
            return self.reply(404, {"error": {"message": "no such model or route"}})
        with server.lock:
            server.requests.append(body)
            failing = server.fail_first > 0
            server.fail_first -= failing
        if failing:
            return self.reply(429, {"error": {"message": "slow down"}}, [("Retry-After", "0")])
        if server.refuse_n and body.get("n", 1) > 1:
            return self.reply(400, {"error": {"message": "n must be 1"}})
        question = body["messages"][-1]["content"]
        number = int(question.split()[1].rstrip(":"))  # "Question 3: ..."
        gold = str(number * 2)
        content = f"So the answer is \\boxed{{{gold}}}." if number % 2 == 0 else "I cannot tell."
        n = body.get("n", 1)
        choices = [{"index": i, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": content,
                                "reasoning_content": f"Twice {number} is \\boxed{{{gold}}}, I think."}}
                   for i in range(n)]
        self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "fake-r1",
                         "choices": choices, "usage": {"prompt_tokens": 12, "completion_tokens": 20 * n,
                                                       "total_tokens": 12 + 20 * n}})


@pytest.fixture
def chat_server():
    servers = []

    def start(**kw):
        server = FakeChatServer(**kw)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


API_EXAMPLES = [{"id": f"a{i}", "prompt": f"Question {i}: what is twice {i}?", "answer": str(2 * i)} for i in range(6)]


def test_endpoint_grades_the_content_and_counts_the_reasoning(chat_server, tmp_path):
    server = chat_server(fail_first=1)
    result = evaluate_endpoint(server.base, "fake-r1", API_EXAMPLES, k=4, api_key="sk-test", seed=5,
                               out_dir=tmp_path, concurrency=3, backoff=0.01)
    m = result.metrics
    assert m["pass@1"] == m["pass@4"] == m["cons@4"] == 0.5  # the reasoning's right answer is not graded
    assert m["mean_tokens"] == 20 and m["truncated"] == 0.0 and result.cost["flops"] is None
    completion = result.items[1]["completions"][0]
    assert completion["text"].startswith("<think>\nTwice 1 is") and completion["answer"] is None
    sent = server.requests[-1]
    assert sent["n"] == 4 and sent["temperature"] == 0.6 and sent["top_p"] == 0.95
    assert sent["messages"][-1]["content"].endswith(MATH_INSTRUCTION)
    assert len(server.requests) == 7  # one 429, retried, then one request per item
    assert (tmp_path / "results.json").is_file() and len((tmp_path / "samples.jsonl").read_text().splitlines()) == 6


def test_endpoint_refusing_n_gets_k_separate_requests(chat_server):
    server = chat_server(refuse_n=True)
    result = evaluate_endpoint(server.base, "fake-r1", API_EXAMPLES[:2], k=3, api_key="sk-test", concurrency=1)
    assert result.metrics["pass@1"] == 0.5
    single = [r for r in server.requests if r.get("n", 1) == 1]
    assert len(single) == 6 and len({r["seed"] for r in single}) == 6


def test_endpoint_auth_and_not_found_errors_are_clear(chat_server):
    server = chat_server()
    with pytest.raises(EndpointError, match="401 unauthorized"):
        evaluate_endpoint(server.base, "fake-r1", API_EXAMPLES[:1], k=1, api_key="wrong")
    with pytest.raises(EndpointError, match="404 not found"):
        evaluate_endpoint(server.base, "other-model", API_EXAMPLES[:1], k=1, api_key="sk-test")


def test_cli_eval_over_an_endpoint_and_its_errors(chat_server, tmp_path, capsys):
    server = chat_server()
    bench = tmp_path / "twice.jsonl"
    bench.write_text("".join(json.dumps(ex) + "\n" for ex in API_EXAMPLES[:4]))
    base = ["eval", "--api-base", server.base, "--api-model", "fake-r1", "--bench", str(bench), "--k", "2"]
    assert main(base + ["--api-key", "sk-test", "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metrics"]["pass@1"] == 0.5 and results["settings"]["bench"] == "twice"
    capsys.readouterr()
    assert main(base + ["--api-key", "nope", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "401 unauthorized" in err and len(err.splitlines()) == 1


def test_endpoint_lengths_charge_cut_choices_max_tokens_and_share_the_rest():
    def choice(i, content, reasoning, finish):
        return SimpleNamespace(index=i, finish_reason=finish,
                               message=SimpleNamespace(content=content, reasoning_content=reasoning, model_extra={}))
    reply = SimpleNamespace(usage=SimpleNamespace(completion_tokens=64 + 40), choices=[
        choice(0, "", "x" * 300, "length"), choice(1, "ab", "cd", "stop"), choice(2, "abcdef", "ghijkl", "stop")])
    cut, short, long = _samples(reply, max_tokens=64, example={"id": "q"})
    assert (cut.n_tokens, short.n_tokens, long.n_tokens) == (64, 10, 30)
    assert cut.text == "<think>\n" + "x" * 300 and split_reasoning(cut.text)[1] == ""  # the reasoning never closed
    assert short.text == "<think>\ncd\n</think>\n\nab" and split_reasoning(short.text)[1] == "ab"
    assert cut.example == {"id": "q"} and cut.token_ids == cut.prompt_ids == []


# ------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=512, original_seq_len=512))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", model, tokenizer,
                           metadata={"template": R1_ZERO})


def test_cli_eval_task_family_writes_results_and_compares(checkpoint, tmp_path, capsys):
    args = ["eval", "--model", str(checkpoint), "--bench", "arithmetic", "--limit", "4", "--k", "2",
            "--max-new-tokens", "6", "--peak-gflops", "20", "--ks", "1", "2"]
    assert main(args) == 0
    out_dir = checkpoint / "eval" / "arithmetic"
    results = json.loads((out_dir / "results.json").read_text())
    assert results["settings"]["template"] == R1_ZERO and results["settings"]["k"] == 2
    assert results["metrics"]["items"] == 4 and results["cost"]["mfu"] > 0 and "pass@2" in results["metrics"]
    lines = (out_dir / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(len(json.loads(line)["completions"]) == 2 for line in lines)
    assert "pass@1" in (out_dir / "results.md").read_text() and "pass@1" in capsys.readouterr().out
    assert main(args) == 0  # the same run again: every item is read back, and the user is told
    assert "r1lab eval: 8 of 8 evaluations were an earlier run's" in capsys.readouterr().err
    assert main(args + ["--fresh"]) == 0 and "earlier run's" not in capsys.readouterr().err
    other = tmp_path / "other"
    assert main(args + ["--seed", "1", "--out", str(other), "--template", "r1"]) == 0
    capsys.readouterr()
    assert main(["eval", "--compare", str(out_dir), str(other / "results.json")]) == 0
    table = capsys.readouterr().out
    a, b = json.loads((out_dir / "results.json").read_text()), json.loads((other / "results.json").read_text())
    row = next(line for line in table.splitlines() if line.startswith("| mean tokens"))
    assert f"{a['metrics']['mean_tokens']:.1f}" in row and f"{b['metrics']['mean_tokens']:.1f}" in row
    assert "differ in template" in table
    assert compare_results(out_dir, other) == table


def test_cli_eval_math500_with_breakdowns(checkpoint, tmp_path, capsys):
    if not any((d / "math500_test.jsonl").is_file() for d in candidate_dirs()):
        pytest.skip("MATH-500 data not found")
    assert main(["eval", "--model", str(checkpoint), "--bench", "math500", "--limit", "3", "--k", "2",
                 "--max-new-tokens", "4", "--template", "r1", "--out", str(tmp_path), "--peak-gflops", "20"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metrics"]["items"] == 3 and set(results["breakdown"]) == {"subject", "level"}
    first = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert first["id"] == "test/precalculus/807.json" and first["gold"] and "subject" in first
    assert results["settings"]["instruction"] == MATH_INSTRUCTION


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model", "--bench", "arithmetic"], "/no/such/model"),
    (["--model", "{ckpt}", "--bench", "nosuchbench"], "unknown bench 'nosuchbench'"),
    (["--bench", "arithmetic"], "--model"),
])
def test_cli_eval_user_errors_exit_2_with_one_line(checkpoint, capsys, args, message):
    assert main(["eval", *[a.replace("{ckpt}", str(checkpoint)) for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("r1lab: error:") and message in err and len(err.splitlines()) == 1
