import dataclasses

import pytest
import torch

from r1lab.engine import Engine, SamplingParams, _mix_seed, sample_tokens
from r1lab.model import Transformer


def letters(ids: list[int]) -> str:
    """A toy detokenizer: one letter per id."""
    return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture
def model(make_config):
    # A larger init so that a random model's greedy continuations are not constant.
    return Transformer(make_config(init_std=0.1)).eval()


def argmax_continuation(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_greedy_equals_argmax_over_full_forwards(make_config, impl):
    model = Transformer(make_config(init_std=0.1, attn_impl=impl)).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]
    outs = Engine(model, eos_id=None).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == argmax_continuation(model, prompt, 12)
        assert out.finish_reason == "length"


def test_shared_prefill_expanded_equals_independent_prefills(model):
    prompt = torch.randint(0, 97, (1, 9))
    n = 3
    nxt = torch.randint(0, 97, (n, 1))
    with torch.no_grad():
        shared = model.new_cache(1, 32)
        model(prompt, positions=torch.arange(9)[None], cache=shared)
        shared.select(torch.zeros(n, dtype=torch.long))  # the prompt's row, n times
        expanded = model(nxt, positions=torch.full((n, 1), 9), cache=shared)
        separate = model.new_cache(n, 32)
        model(prompt.expand(n, 9), positions=torch.arange(9).expand(n, 9), cache=separate)
        independent = model(nxt, positions=torch.full((n, 1), 9), cache=separate)
    torch.testing.assert_close(expanded, independent, atol=1e-5, rtol=0)


def test_n_samples_share_the_prompt_and_greedy_samples_agree(model):
    engine = Engine(model, eos_id=None)
    outs = engine.generate([[3, 1, 4, 1, 5]], SamplingParams(max_new_tokens=6, temperature=0, n=3))
    assert len(outs) == 3 and [o.sample_index for o in outs] == [0, 1, 2]
    assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids == argmax_continuation(model, [3, 1, 4, 1, 5], 6)


def test_a_request_gets_its_own_settings_after_earlier_requests_finish(model):
    # A finished row's object is freed and its id() often reused by the next request's row: the
    # engine's cached per-row settings must not carry the earlier request's temperature over.
    fresh = Engine(model, eos_id=None).generate([[1, 2, 3]], SamplingParams(max_new_tokens=12, temperature=1.0, seed=5))
    engine = Engine(model, eos_id=None)
    for _ in range(5):
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=12, temperature=0))
        again = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=12, temperature=1.0, seed=5))
        assert again[0].token_ids == fresh[0].token_ids


def test_same_seed_same_samples_and_other_seed_differs(model):
    engine = Engine(model, eos_id=None)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, n=4, seed=123)
    a = engine.generate([[1, 2, 3], [4, 5]], params)
    b = engine.generate([[1, 2, 3], [4, 5]], params)
    c = engine.generate([[1, 2, 3], [4, 5]], dataclasses.replace(params, seed=124))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    assert len({tuple(o.token_ids) for o in a[:4]}) > 1  # the n samples of a prompt differ


def test_the_sampling_kernel_gives_the_eager_draws(model):
    # A compiled engine draws with the CPU backend's sampling kernel; forced on an eager engine, the same
    # samples and log-probs under mixed settings (EOS banned for some rows).
    from r1lab.backends.cpu import ops
    if ops.load() is not None:
        pytest.skip("the sampling kernel is not built here")
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    settings = [SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, n=3, seed=5),
                SamplingParams(max_new_tokens=12, temperature=1.2, top_k=7, n=2, seed=6, ignore_eos=True),
                SamplingParams(max_new_tokens=12, temperature=0.0, seed=7)]
    outs = []
    for use_kernel in (False, True):
        engine = Engine(model, eos_id=2)
        engine._sample_kernel = ops.sample if use_kernel else None
        for prompt, params in zip(prompts, settings):
            engine.add_request(prompt, params)
        events = []
        while engine.has_work():
            events += [(e.request_id, e.sample_index, e.token_ids, e.finish_reason) for e in engine.step()]
        outs.append(events)
    assert outs[0] == outs[1]


def test_ragged_batch_equals_each_prompt_alone(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    engine = Engine(model, eos_id=None)
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    ids = [engine.add_request(p, dataclasses.replace(params, seed=100 + i)) for i, p in enumerate(prompts)]
    together: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for ev in engine.step():
            together[ev.request_id] += ev.token_ids
    for i, p in enumerate(prompts):
        alone = Engine(model, eos_id=None)
        alone.add_request(p, dataclasses.replace(params, seed=100 + i))
        tokens = []
        while alone.has_work():
            tokens += [t for ev in alone.step() for t in ev.token_ids]
        assert together[ids[i]] == tokens


def test_request_joining_a_running_batch_gets_the_same_output(model):
    engine = Engine(model, eos_id=None)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    first = engine.add_request([1, 2, 3, 4], params)
    out: dict[int, list[int]] = {first: []}
    for _ in range(5):
        for ev in engine.step():
            out[ev.request_id] += ev.token_ids
    # The late request needs more cache slots (3 + 20) than the running batch has (4 + 12): it grows.
    late_params = dataclasses.replace(params, seed=4, max_new_tokens=20)
    late = engine.add_request([9, 8, 7], late_params)
    out[late] = []
    while engine.has_work():
        for ev in engine.step():
            out[ev.request_id] += ev.token_ids
    ref0 = Engine(model, eos_id=None)
    ref0.add_request([1, 2, 3, 4], params)
    tokens0 = []
    while ref0.has_work():
        tokens0 += [t for ev in ref0.step() for t in ev.token_ids]
    assert out[first] == tokens0
    ref = Engine(model, eos_id=None)
    ref.add_request([9, 8, 7], late_params)
    tokens = []
    while ref.has_work():
        tokens += [t for ev in ref.step() for t in ev.token_ids]
    assert out[late] == tokens and len(tokens) == 20


def test_eos_and_stop_token_ids_finish_with_stop(model):
    prompt = [1, 2, 3]
    free = argmax_continuation(model, prompt, 10)
    stop_at = 4
    eos = free[stop_at]
    if eos in free[:stop_at]:
        pytest.skip("the chosen token occurs earlier")
    out = Engine(model, eos_id=eos).generate([prompt], SamplingParams(max_new_tokens=10, temperature=0))[0]
    assert out.token_ids == free[:stop_at + 1] and out.finish_reason == "stop"
    out = Engine(model, eos_id=None).generate(
        [prompt], SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=(eos,)))[0]
    assert out.token_ids == free[:stop_at + 1] and out.finish_reason == "stop"
    out = Engine(model, eos_id=eos).generate([prompt], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 10 and eos not in out.token_ids


def test_stop_strings_cut_exactly(model):
    prompt = [2, 7, 1, 8]
    free = letters(argmax_continuation(model, prompt, 16))
    stop = free[5:7]
    end = free.find(stop) + len(stop)
    engine = Engine(model, eos_id=None, decode=letters)
    out = engine.generate([prompt], SamplingParams(max_new_tokens=16, temperature=0, stop_strings=(stop, "zzzz")))[0]
    assert out.finish_reason == "stop"
    assert out.text == free[:end] and out.text.endswith(stop)
    assert len(out.token_ids) == end  # one letter per token: the token completing the stop string is the last


def test_logprobs_are_the_model_log_probabilities(model):
    prompt = [4, 4, 2]
    out = Engine(model, eos_id=None).generate([prompt], SamplingParams(max_new_tokens=5, temperature=1.0, seed=1))[0]
    seq = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logp = model(seq)[0, len(prompt) - 1:-1].log_softmax(-1)
    expected = logp.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=1e-5, rtol=0)


def test_finished_rows_leave_the_batch_and_cancel_aborts(model):
    engine = Engine(model, eos_id=None, compact_fraction=0.25)
    short = engine.add_request([1, 2], SamplingParams(max_new_tokens=2, temperature=0))
    long = engine.add_request([3, 4], SamplingParams(max_new_tokens=30, temperature=0, n=2))
    sizes = []
    while engine.has_work():
        engine.step()
        sizes.append(engine._batch.cache.batch_size if engine._batch is not None else 0)
        if len(sizes) == 5:
            engine.cancel(long)
    assert sizes[0] == 3 and sizes[2] == 2  # the short request left after its second token
    assert len(sizes) <= 7  # the cancelled request stopped early


def test_sampling_matches_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4).contiguous()
    gens = 1 - torch.rand(4000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(4000)
    draws = sample_tokens(logits, ones, torch.zeros(4000, dtype=torch.long), ones, gens)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    # top-p 0.7 keeps {0.5, 0.3}; top-k 1 is greedy.
    draws = sample_tokens(logits, ones, torch.zeros(4000, dtype=torch.long), torch.full((4000,), 0.7), gens)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.625) < 0.03
    draws = sample_tokens(logits, ones, torch.ones(4000, dtype=torch.long), ones, gens)
    assert (draws == 0).all()


def test_sampling_never_draws_a_token_of_probability_zero():
    # u = 1 (the largest draw) and u tiny, with top-k and top-p masking the tail and a zero-mass head.
    logits = torch.tensor([[-float("inf"), 2.0, 1.0, 0.5, 0.1, -1.0]]).expand(6, 6).contiguous()
    u = torch.tensor([1.0, 1e-300, 0.5, 1.0, 1.0, 1e-300], dtype=torch.float64)
    top_k = torch.tensor([2, 2, 0, 0, 3, 0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.6, 1.0, 1.0])  # 0.6 keeps tokens 1 and 2 (0.56 + 0.21)
    draws = sample_tokens(logits, torch.ones(6), top_k, top_p, u)
    assert draws.tolist() == [2, 1, draws[2].item(), 2, 3, 1] and draws[2] in (1, 2, 3)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(n=0), dict(max_new_tokens=0), dict(top_k=-2)])
def test_bad_sampling_params_are_rejected(model, bad):
    with pytest.raises(ValueError):
        Engine(model, eos_id=None).add_request([1], SamplingParams(**bad))


def test_stop_strings_need_decode_and_prompts_must_fit(model):
    with pytest.raises(ValueError, match="decode"):
        Engine(model, eos_id=None).add_request([1], SamplingParams(stop_strings=("x",)))
    with pytest.raises(ValueError, match="max_len"):
        Engine(model, eos_id=None).add_request(list(range(64)), SamplingParams())
    out = Engine(model, eos_id=None).generate([list(range(60))], SamplingParams(max_new_tokens=50, temperature=0))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4  # the cache ends at max_seq_len


@pytest.mark.parametrize("change", ["float64", "naive"])
def test_compile_on_a_model_the_backend_cannot_run_warns_and_decodes_eagerly(make_config, change):
    config = make_config(init_std=0.1, attn_impl="naive" if change == "naive" else "absorb")
    model = Transformer(config).eval()
    if change == "float64":
        model = model.double()
    params = SamplingParams(max_new_tokens=6, temperature=0)
    with pytest.warns(UserWarning, match="torch.float64" if change == "float64" else "attn_impl 'naive'"):
        engine = Engine(model, eos_id=None, compile=True)
    assert engine.steps.sample is None  # the eager steps
    prompts = [[5, 6, 7], [1, 2]]
    assert [o.token_ids for o in engine.generate(prompts, params)] == [argmax_continuation(model, p, 6) for p in prompts]


def test_generate_returns_what_the_step_events_say(model):
    # generate() collects the events of its steps: tokens, log-probs, finish reasons and cut text.
    prompts, params = [[2, 7, 1], [8, 2]], SamplingParams(max_new_tokens=9, temperature=1.0, seed=4, n=2,
                                                          stop_strings=("c",))
    engine = Engine(model, eos_id=3, decode=letters)
    outs = engine.generate(prompts, params)
    stepped = Engine(model, eos_id=3, decode=letters)
    ids = [stepped.add_request(p, dataclasses.replace(params, seed=_mix_seed(params.seed, i)))
           for i, p in enumerate(prompts)]
    seen: dict[tuple[int, int], list] = {}
    while stepped.has_work():
        for ev in stepped.step():
            tokens, logps, *_ = seen.setdefault((ev.request_id, ev.sample_index), [[], [], None, None])
            tokens += ev.token_ids
            logps += ev.logprobs
            if ev.finish_reason is not None:
                seen[(ev.request_id, ev.sample_index)][2:] = [ev.finish_reason, ev.text or letters(tokens)]
    assert [[o.token_ids, o.logprobs, o.finish_reason, o.text] for o in outs] == [
        seen[(ids[i], j)] for i in range(2) for j in range(2)]
    assert any(o.finish_reason == "stop" for o in outs)


def train_on_strides(model, steps: int = 120) -> None:
    """Teach the model (and its MTP module) sequences t, t+k, t+2k, ... so that drafts get accepted."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        start = torch.randint(0, 97, (16, 1), generator=g)
        stride = torch.randint(1, 4, (16, 1), generator=g)
        seq = (start + stride * torch.arange(24)) % 97
        out = model.loss(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("trained", [False, True])
def test_speculative_greedy_equals_plain_greedy(make_config, trained):
    model = Transformer(make_config(init_std=0.1, n_mtp_modules=1))
    if trained:
        train_on_strides(model)
    model.eval()
    prompts = [[5, 7, 9], [40, 41, 42, 43, 44], [1, 2]]
    params = SamplingParams(max_new_tokens=20, temperature=0, n=2)
    plain = Engine(model, eos_id=None).generate(prompts, params)
    engine = Engine(model, eos_id=None, speculative=True)
    fast = engine.generate(prompts, params)
    assert [o.token_ids for o in fast] == [o.token_ids for o in plain]
    assert all(len(o.token_ids) == 20 and o.finish_reason == "length" for o in fast)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    if trained:
        assert engine.speculation.acceptance_rate > 0.5


def test_speculative_sampling_is_reproducible_and_stops(make_config):
    model = Transformer(make_config(init_std=0.1, n_mtp_modules=1)).eval()
    engine = Engine(model, eos_id=None, speculative=True)
    params = SamplingParams(max_new_tokens=15, temperature=1.0, seed=9, n=3)
    a = engine.generate([[1, 2, 3]], params)
    b = engine.generate([[1, 2, 3]], params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(len(o.token_ids) == 15 for o in a)


def test_speculative_needs_an_mtp_module(make_config):
    with pytest.raises(ValueError, match="MTP"):
        Engine(Transformer(make_config(n_mtp_modules=0)), eos_id=None, speculative=True)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_tokens(make_config):
    # MoE on. One package per row class of the CPU backend's table: 36, 12 and 4 rows (the C++ products), one
    # row (fused reductions), and the prefills of one and of several prompts (one of a single token); ragged
    # prompts; minutes of compiling.
    model = Transformer(make_config(init_std=0.1)).eval()
    ragged = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]
    batches = [ragged * 12, ragged * 4, ragged + [[6]], [[3, 1, 4, 1, 5]]]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    eager_engine, compiled_engine = Engine(model, eos_id=None), Engine(model, eos_id=None, compile=True)
    before = [o.token_ids for o in eager_engine.generate(batches[0], params)]
    for update in range(2):
        for prompts in batches:
            eager = eager_engine.generate(prompts, params)
            compiled = compiled_engine.generate(prompts, params)
            assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
            for a, b in zip(compiled, eager):
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
        if update == 0:  # an optimiser step changes the weights in place: the compiled step must see it
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            assert [o.token_ids for o in eager_engine.generate(batches[0], params)] != before


@pytest.mark.slow
def test_compiled_speculative_greedy_equals_plain_greedy(make_config):
    model = Transformer(make_config(init_std=0.1, n_mtp_modules=1))
    train_on_strides(model)
    model.eval()
    prompts = [[5, 7, 9], [40, 41, 42, 43, 44], [1, 2]]
    params = SamplingParams(max_new_tokens=20, temperature=0, n=2)
    plain = Engine(model, eos_id=None).generate(prompts, params)
    engine = Engine(model, eos_id=None, speculative=True, compile=True)
    fast = engine.generate(prompts, params)
    assert [o.token_ids for o in fast] == [o.token_ids for o in plain]
    assert engine.speculation.acceptance_rate > 0.5
