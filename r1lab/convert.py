"""`r1lab export` and `r1lab import`: an r1lab checkpoint directory <-> a Hugging Face directory.

`export_checkpoint` loads a checkpoint and writes it through `hf.export_hf` as a
`DeepseekV3ForCausalLM` directory (config.json, model.safetensors, the tokenizer with its chat
template) that `transformers` opens with `AutoModelForCausalLM.from_pretrained`. What the HF
architecture cannot express (softmax routing, MoE layers without shared experts, another norm eps)
is refused with a `ConfigError` naming the field, before anything is written. The checkpoint's
r1lab metadata (its chat template, task) rides along in `r1lab_metadata.json`, which transformers
ignores and `import_checkpoint` reads back, so a round trip keeps how the model is prompted.

`import_checkpoint` reads a DeepseekV3-format HF directory through `hf.import_hf` and saves an
r1lab checkpoint (atomic, as every checkpoint). Other architectures are refused with one line:
r1lab's model cannot run them, though `eval`, `serve` and `chat` open them as they are.

This module moves files between two layouts; it knows no training, sampling or chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from r1lab.checkpoint import METADATA_FILE, load_checkpoint, read_metadata, read_model_metadata, save_checkpoint
from r1lab.config import ConfigError
from r1lab.hf import CONFIG_FILE, export_hf, hf_config_from_model_config, import_hf, read_hf_config
from r1lab.tokenizer import TOKENIZER_FILE, Tokenizer


def _empty_target(out_dir: Path) -> None:
    """Refuse to write into a file or a directory that already holds something (no silent mixing)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ConfigError(f"--out {out_dir} is not empty; choose a new directory")


def export_checkpoint(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the r1lab checkpoint at `model_dir` as a Hugging Face DeepseekV3 directory `out_dir`."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    try:
        import transformers  # noqa: F401 - only whether it is installed
    except ImportError:
        raise ConfigError("export needs the transformers package: pip install transformers") from None
    _empty_target(out_dir)
    model, tokenizer, _ = load_checkpoint(model_dir)
    metadata = read_metadata(model_dir)
    try:
        hf_config_from_model_config(model.config)  # checked before a byte is written
    except ConfigError as e:
        raise ConfigError(f"{model_dir}: cannot export to Hugging Face DeepseekV3: {e}") from None
    export_hf(model.eval(), out_dir, tokenizer=tokenizer)
    if metadata:
        (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return out_dir


def import_checkpoint(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Save the Hugging Face DeepseekV3 directory `hf_dir` as an r1lab checkpoint at `out_dir`."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir}: no such model directory")
    config_file = hf_dir / CONFIG_FILE
    doc = read_hf_config(hf_dir)
    if "format_version" in doc:
        raise ConfigError(f"{hf_dir} is already an r1lab checkpoint; nothing to import")
    if doc.get("model_type") != "deepseek_v3":
        raise ConfigError(f"{config_file}: model_type {doc.get('model_type')!r} does not map onto r1lab's model "
                          f"(only 'deepseek_v3' does); eval, serve and chat open {hf_dir} as it is")
    _empty_target(out_dir)
    model = import_hf(hf_dir)
    tokenizer = None
    if (hf_dir / TOKENIZER_FILE).is_file():
        try:
            tokenizer = Tokenizer.load(hf_dir)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(f"{hf_dir / TOKENIZER_FILE}: {tokenizer.vocab_size} ids exceed vocab_size "
                              f"{model.config.vocab_size} in {config_file}")
    metadata = read_model_metadata(hf_dir)
    return save_checkpoint(out_dir, model, tokenizer, metadata=metadata)

