"""The data flows one way (STYLE.md): read every module's imports with `ast` and check who may import whom."""

import ast
import re
from pathlib import Path

import r1lab

PACKAGE = Path(r1lab.__file__).parent

# module (or package prefix) -> r1lab modules it must never import
FORBIDDEN = {
    "r1lab.config": {"r1lab."},  # describes only
    "r1lab.backends": {"r1lab.engine", "r1lab.tokenizer", "r1lab.train", "r1lab.rewards", "r1lab.eval",
                       "r1lab.serve", "r1lab.tasks", "r1lab.checkpoint"},
    "r1lab.engine": {"r1lab.tokenizer", "r1lab.train", "r1lab.rewards", "r1lab.eval", "r1lab.serve", "r1lab.tasks",
                     "r1lab.sampling"},
    "r1lab.tokenizer": {"r1lab.model", "r1lab.engine", "r1lab.train", "r1lab.eval", "r1lab.serve"},
    "r1lab.mathcheck": {"r1lab.model", "r1lab.engine", "r1lab.tokenizer", "r1lab.train", "r1lab.eval", "r1lab.serve"},
    "r1lab.sandbox": {"r1lab."},  # runs untrusted code: depends on nothing of ours
    "r1lab.rewards": {"r1lab.model", "r1lab.engine", "r1lab.tokenizer", "r1lab.train", "r1lab.eval", "r1lab.serve",
                      "r1lab.sampling"},
    "r1lab.tasks": {"r1lab.model", "r1lab.engine", "r1lab.tokenizer", "r1lab.train", "r1lab.eval", "r1lab.serve",
                    "r1lab.rewards"},
    "r1lab.cost": {"r1lab.model", "r1lab.engine", "r1lab.train", "r1lab.eval", "r1lab.serve"},
    "r1lab.checkpoint": {"r1lab.engine", "r1lab.sampling", "r1lab.train", "r1lab.eval", "r1lab.serve"},
    # sample-and-grade sits on the engine, tokenizer and rewards; RL, eval and the demo use it
    "r1lab.sampling": {"r1lab.checkpoint", "r1lab.hf", "r1lab.train", "r1lab.eval", "r1lab.serve", "r1lab.demo"},
    "r1lab.eval": {"r1lab.train", "r1lab.serve"},
    "r1lab.serve": {"r1lab.train", "r1lab.eval", "r1lab.sampling"},  # serving grades nothing
    "r1lab.device": {"r1lab.model", "r1lab.engine", "r1lab.tokenizer", "r1lab.checkpoint", "r1lab.recipe",
                     "r1lab.train", "r1lab.eval", "r1lab.serve", "r1lab.tasks"},  # torch's device API and ConfigError
    # rejection sampling's filter judges graded text: it generates, tokenizes and grades nothing itself
    "r1lab.train.rejection": {"r1lab.model", "r1lab.engine", "r1lab.tokenizer", "r1lab.rewards", "r1lab.checkpoint",
                              "r1lab.eval", "r1lab.serve", "r1lab.backends", "r1lab.sampling"},
    "r1lab.convert": {"r1lab.train", "r1lab.eval", "r1lab.serve", "r1lab.engine"},  # file layouts only
    # the vLLM rollout adapter: ids and weights in, engine records out; it grades and trains nothing
    "r1lab.train.vllm_rollout": {"r1lab.rewards", "r1lab.sampling", "r1lab.eval", "r1lab.serve", "r1lab.tasks",
                                 "r1lab.model", "r1lab.train.rl", "r1lab.train.grpo", "r1lab.train.stages",
                                 "r1lab.train.common", "r1lab.train.data"},
    # the model a stage trains and its files: no sampling, rewards, optimiser or loop
    "r1lab.train.policy": {"r1lab.engine", "r1lab.rewards", "r1lab.eval", "r1lab.serve", "r1lab.tasks",
                           "r1lab.train.rl", "r1lab.train.grpo", "r1lab.train.pretrain", "r1lab.train.stages",
                           "r1lab.train.common", "r1lab.train.data"},
    # generate-grade-filter-write knows models, endpoints and rewards, no training step
    "r1lab.train.generate": {"r1lab.serve", "r1lab.train.rl", "r1lab.train.grpo", "r1lab.train.pretrain",
                             "r1lab.train.stages", "r1lab.train.distill", "r1lab.pipeline", "r1lab.demo"},
    # the stages the pipeline orders know nothing of it (nor of the demo)
    "r1lab.train": {"r1lab.pipeline", "r1lab.demo"},
    "r1lab.pipeline": {"r1lab.demo", "r1lab.serve"},
    "r1lab.": {"r1lab.cli"},  # nothing imports the command line
}
TORCH_FREE = {"r1lab.config", "r1lab.rewards", "r1lab.mathcheck", "r1lab.sandbox", "r1lab.tasks", "r1lab.cost",
              "r1lab.tokenizer", "r1lab.train.rejection"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + ".") or (
        prefix.endswith(".") and name.startswith(prefix))


def test_imports_flow_one_way():
    modules = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}
    assert "r1lab.model" in modules
    violations = []
    for name, imported in modules.items():
        if name == "r1lab.cli":
            continue
        for owner, banned in FORBIDDEN.items():
            if not matches(name, owner):
                continue
            for imp in imported:
                if any(matches(imp, b) for b in banned) and not matches(imp, owner.rstrip(".")):
                    violations.append(f"{name} imports {imp}")
        if any(matches(name, t) for t in TORCH_FREE) and any(i == "torch" or i.startswith("torch.") for i in imported):
            violations.append(f"{name} imports torch")
    assert not violations, violations


def test_the_model_imports_nothing_of_r1lab_but_config():
    # The pure-torch reference: what FSDP, CUDA and Hugging Face export start from.
    ours = {name for name in imports_of(PACKAGE / "model.py") if name == "r1lab" or name.startswith("r1lab.")}
    assert ours == {"r1lab.config"}, ours


def test_only_the_engine_imports_the_backend():
    importers = {module_name(p) for p in PACKAGE.rglob("*.py")
                 if not matches(module_name(p), "r1lab.backends")
                 and any(matches(name, "r1lab.backends") for name in imports_of(p))}
    assert importers == {"r1lab.engine"}, importers


def test_only_the_distributed_module_knows_torch_distributed():
    knowers = {module_name(p) for p in PACKAGE.rglob("*.py")
               if any(matches(name, "torch.distributed") for name in imports_of(p))}
    assert knowers == {"r1lab.train.distributed"}, knowers


def test_only_the_rollout_adapter_imports_vllm_and_only_when_used():
    importers = {module_name(p) for p in PACKAGE.rglob("*.py") if any(matches(n, "vllm") for n in imports_of(p))}
    assert importers == {"r1lab.train.vllm_rollout"}, importers
    top_level = [node for node in ast.parse((PACKAGE / "train" / "vllm_rollout.py").read_text()).body
                 if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not any(matches(alias.name, "vllm") for node in top_level if isinstance(node, ast.Import)
                   for alias in node.names)  # an optional extra: importing r1lab never needs it


def test_no_device_strings_in_library_code():
    device_use = re.compile(r"""(device\s*=\s*|torch\.device\(\s*|\.to\(\s*)["'](cuda|cpu|mps)|\.cuda\(\)""")
    offenders = [str(p) for p in PACKAGE.rglob("*.py") if device_use.search(p.read_text())]
    assert not offenders, offenders
