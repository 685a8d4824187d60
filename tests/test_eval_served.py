"""Served and local evaluation agree: a small trained checkpoint asked through `r1lab serve` with the
`openai` SDK at temperature 0 gets the same answers, item by item, as `r1lab eval` on the checkpoint."""

import json
import socket
import threading
import time

import pytest
import uvicorn

from r1lab.eval import evaluate_checkpoint
from r1lab.evalapi import evaluate_endpoint
from r1lab.recipe import load_recipe
from r1lab.serve import ServeSettings, create_app, load_served_model
from r1lab.tasks import get_family
from r1lab.tasks.benchmarks import load_benchmark
from r1lab.train.stages import run_pretrain

RECIPE = ["--model.dim=64", "--model.inter_dim=128", "--model.moe_inter_dim=32", "--model.n_layers=2",
          "--model.n_routed_experts=4", "--model.kv_lora_rank=32", "--model.qk_nope_head_dim=16",
          "--model.qk_rope_head_dim=8", "--model.v_head_dim=16", "--model.max_seq_len=128",
          "--model.original_seq_len=128", "--model.vocab_size=512", "--data.task=arithmetic", "--data.difficulty=2",
          "--data.n_problems=1500", "--data.scratchpad_share=0.0", "--data.seq_len=64", "--data.template=r1",
          "--pretrain.steps=150", "--pretrain.batch_size=16", "--pretrain.log_every=50", "--pretrain.eval_every=0",
          "--pretrain.save_every=0", "--pretrain.optim.warmup_steps=10"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint that adds two-digit numbers directly, some right and some wrong, and its held-out set."""
    run = tmp_path_factory.mktemp("served")
    recipe = load_recipe(None, RECIPE + ["--data.task_options={ops = [\"+\"]}"])
    run_pretrain(recipe, run, peak_flops=1e11, quiet=True)
    examples = get_family("arithmetic").generate(40, seed=3, split="test", difficulty=2, ops=["+"])
    heldout = run / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"id": ex["id"], "prompt": ex["prompt"], "answer": ex["answer"]}) + "\n"
                               for ex in examples))
    return run / "base" / "checkpoint", heldout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_greedy_answers_equal_local_greedy_eval(trained, tmp_path):
    checkpoint, heldout = trained
    local = evaluate_checkpoint(checkpoint, str(heldout), k=1, temperature=0.0, max_new_tokens=24, instruction="",
                                out_dir=tmp_path / "local", peak_gflops=100.0, greedy=True)
    right = [it["completions"][0]["correct"] for it in local.items]
    assert 0 < sum(right) < len(right)  # a mix of right and wrong answers, so agreement means something

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(load_served_model(checkpoint, name="tiny"), ServeSettings()),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        served = evaluate_endpoint(f"http://127.0.0.1:{port}/v1", "tiny", load_benchmark(str(heldout)), k=1,
                                   temperature=0.0, max_new_tokens=24, instruction="", out_dir=tmp_path / "served",
                                   concurrency=4, greedy=True)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert [it["id"] for it in served.items] == [it["id"] for it in local.items]
    assert [it["completions"][0]["answer"] for it in served.items] == \
        [it["completions"][0]["answer"] for it in local.items]
    assert [it["completions"][0]["correct"] for it in served.items] == right
    assert served.best()["pass@1"] == local.best()["pass@1"] == sum(right) / len(right)
