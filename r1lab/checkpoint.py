"""Save and load a checkpoint directory, atomically.

A checkpoint is a directory:

    config.json                   {"format_version": 1, "model": {ModelConfig fields}, ...}
    model.safetensors             the weights, or past `max_shard_bytes`:
    model-00001-of-0000N.safetensors ... + model.safetensors.index.json (name -> file, as HF does)
    tokenizer.json, tokenizer_config.json    optional, written by `Tokenizer.save`
    trainer_state.pt              optional: whatever the trainer hands over (optimizer state,
                                  step, RNG states from `rng_state()`), loaded with weights_only
    trainer_state.json            the JSON-able top-level entries of the trainer state (humans, quick checks)

A Hugging Face model directory a stage trained (`train/policy.py`) is saved by the same protocol:
`save_pretrained`'s files, the tokenizer, the trainer state files and the run metadata in
`r1lab_metadata.json`; `read_model_metadata` reads either kind's metadata.

Tensors that share storage (a tied embedding) are stored once; config.json's `tied_weights` maps
each dropped name to the stored one.

Atomic save protocol (one writer per checkpoint path). For target `run/ckpt`:
  1. finish or roll back an interrupted earlier save (below), delete stale temp dirs;
  2. write everything into `run/.ckpt.tmp-<token>` and fsync every file and the directory;
  3. rename `run/ckpt` aside to `run/.ckpt.old-<token>` (only if it exists);
  4. rename the temp dir to `run/ckpt`, fsync `run/`;
  5. delete `run/.ckpt.old-<token>`.
A kill before step 3 leaves the old checkpoint in place and a stale temp dir. A kill between 3
and 4 leaves no `ckpt` but a complete `.ckpt.tmp-<token>` next to its `.ckpt.old-<token>`: the
pair proves the temp dir was complete, so loading reads it and the next save moves it into place.
A kill after 4 leaves only a stale `.old` dir. At no moment is a half-written directory read.
A write that fails (a full disk) deletes the temp dir and raises `CheckpointError`; the old
checkpoint was never touched. Weights and trainer state are serialised in memory and written by
Python's own file objects, because safetensors' and torch's writers report a full disk as their
own exception types (or "unexpected pos 576 vs 534"), which cannot be told from a bug.

This module knows the file layout and the model's state dict. It does not know how a model is
trained or run: a trainer passes its state as a plain dict and gets the same dict back.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from r1lab import __version__
from r1lab.config import ConfigError, ModelConfig, model_config_from_dict
from r1lab.model import Transformer
from r1lab.tokenizer import R1, TEMPLATES, TOKENIZER_FILE, Tokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TRAINER_STATE_FILE = "trainer_state.pt"
TRAINER_STATE_JSON = "trainer_state.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
METADATA_FILE = "r1lab_metadata.json"  # a run's metadata beside a Hugging Face model, which transformers ignores
_CONFIG_KEYS = {"format_version", "r1lab_version", "model", "tied_weights", "metadata"}


class CheckpointError(Exception):
    """A checkpoint that is missing, truncated or does not match its config; names the file."""


# -------------------------------------------------------------------- saving
def save_checkpoint(path: str | Path, model: Transformer, tokenizer: Tokenizer | None = None,
                    trainer_state: dict[str, Any] | None = None, *,
                    metadata: dict[str, Any] | None = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write `model` (+ tokenizer, trainer state, JSON-able `metadata`) to directory `path`.

    Replaces an existing checkpoint at `path` atomically (see the module docstring).
    """
    target = Path(path)
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"model.config must be a ModelConfig, got {type(config).__name__}")
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is "
                         f"{config.vocab_size}")
    if trainer_state is not None and not isinstance(trainer_state, dict):
        raise TypeError(f"trainer_state must be a dict, got {type(trainer_state).__name__}")
    if metadata is not None and not (isinstance(metadata, dict) and _is_jsonable(metadata)):
        raise TypeError("metadata must be a JSON-serialisable dict")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")

    def write(tmp: Path) -> None:
        tied = _write_weights(tmp, model.state_dict(), max_shard_bytes)
        doc = {"format_version": FORMAT_VERSION, "r1lab_version": __version__,
               "model": dataclasses.asdict(config), "tied_weights": tied,
               "metadata": metadata or {}}
        _write_json(tmp / CONFIG_FILE, doc)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if trainer_state is not None:
            write_trainer_state(tmp, trainer_state)

    return write_atomically(target, write)


def write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Have `write(tmp_dir)` fill a temp dir, then put it at `target` by the protocol above.

    Any directory with a config.json counts as a checkpoint here (an r1lab one or a Hugging Face
    one written by `save_pretrained`); a directory without one is never replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    if target.exists() and not (target / CONFIG_FILE).is_file():
        raise CheckpointError(f"{target}: exists and is not a checkpoint (no {CONFIG_FILE}); "
                              f"refusing to replace it")

    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = _sibling(target, "tmp", token)
    old = _sibling(target, "old", token)
    try:
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
    except OSError as e:  # a full disk, a quota, a read-only file system: the user's to fix
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{target}: cannot save ({e.strerror or e}); "
                              f"{'the previous checkpoint is unchanged' if target.exists() else 'nothing written'}"
                              ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    moved_aside = target.exists()
    if moved_aside:
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if moved_aside and not target.exists():
            os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)
    return target


def write_trainer_state(directory: Path, trainer_state: dict[str, Any]) -> None:
    """trainer_state.pt (everything) and trainer_state.json (its JSON-able top-level entries)."""
    buffer = io.BytesIO()
    torch.save(trainer_state, buffer)
    _write_bytes(directory / TRAINER_STATE_FILE, buffer.getbuffer())
    _write_json(directory / TRAINER_STATE_JSON, {k: v for k, v in trainer_state.items() if _is_jsonable(v)})


def _write_weights(directory: Path, state: dict[str, torch.Tensor], max_shard_bytes: int
                   ) -> dict[str, str]:
    """Write the state dict as one or more safetensors files; return {dropped alias: stored name}."""
    unique, tied = _dedupe(state)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in unique.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS_FILE, metadata={"format": "pt"})
        return tied
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in unique.values())
    _write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return tied


def save_file(tensors: dict[str, torch.Tensor], filename: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, with the bytes written by Python (see the module docstring)."""
    _write_bytes(Path(filename), safetensors_bytes(tensors, metadata=metadata))


def _write_bytes(file: Path, data: bytes | memoryview) -> None:
    with open(file, "wb") as f:
        f.write(data)


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep the first name of each set of identical tensor views; safetensors refuses shared
    storage, so other overlapping views are copied."""
    unique: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first_name: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach()
        if tensor.numel() > 0:
            key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                   tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
            if key in first_name:
                tied[name] = first_name[key]
                continue
            first_name[key] = name
            if not tensor.is_contiguous():
                tensor = tensor.contiguous()
            elif tensor.untyped_storage().data_ptr() in storages:
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
        unique[name] = tensor
    return unique, tied


# -------------------------------------------------------------------- loading
def load_checkpoint(path: str | Path, device: torch.device | None = None
                    ) -> tuple[Transformer, Tokenizer | None, dict[str, Any] | None]:
    """(model, tokenizer or None, trainer state or None) from a checkpoint directory.

    The model is built from config.json (on `device` if given) and every stored tensor is
    checked against it before any is read. Building does not disturb the global CPU RNG.
    """
    root = _committed_dir(Path(path))
    doc = _read_config(root)
    config = _model_config(root, doc)
    tokenizer = load_tokenizer(root)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{root / TOKENIZER_FILE}: {tokenizer.vocab_size} ids exceed "
                              f"model.vocab_size={config.vocab_size} in {CONFIG_FILE}")
    model = new_model(config, device)
    _load_weights(root, model, doc["tied_weights"])
    return model, tokenizer, _read_trainer_state(root)


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer saved with a checkpoint (None if it has none), without reading the weights."""
    root = _committed_dir(Path(path))
    if not (root / TOKENIZER_FILE).is_file():
        return None
    try:
        return Tokenizer.load(root)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def committed_checkpoint(path: str | Path) -> Path | None:
    """Where the last committed checkpoint for `path` is, or None when no save to it ever finished.

    A save killed before its first commit leaves only a temp dir: that is no checkpoint."""
    try:
        return _committed_dir(Path(path))
    except CheckpointError:
        return None


def new_model(config: ModelConfig, device: torch.device | None = None) -> Transformer:
    """An untrained Transformer on `device`, built without touching the global RNG (weights follow)."""
    with torch.random.fork_rng(devices=[]):
        if device is None:
            return Transformer(config)
        with torch.device(device):
            return Transformer(config)


def load_model_config(path: str | Path) -> ModelConfig:
    """The validated ModelConfig stored in a checkpoint's config.json."""
    root = _committed_dir(Path(path))
    return _model_config(root, _read_config(root))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The `metadata` dict given to `save_checkpoint` (empty if none)."""
    root = _committed_dir(Path(path))
    return _read_config(root)["metadata"]


def read_model_metadata(path: str | Path) -> dict[str, Any]:
    """The run metadata of any model directory: an r1lab checkpoint's (`read_metadata`), else the
    `r1lab_metadata.json` beside a Hugging Face model ({} when it has none)."""
    root = _committed_dir(Path(path))
    try:
        doc = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and "format_version" in doc:
        return read_metadata(root)
    file = root / METADATA_FILE
    return read_json_object(file) if file.is_file() else {}


def model_metadata(path: str | Path) -> dict[str, Any]:
    """`read_model_metadata`, or empty when a directory has none that can be read."""
    try:
        return read_model_metadata(path)
    except CheckpointError:
        return {}


def model_template(path: str | Path) -> str:
    """The chat template a model directory was trained with: its metadata's "template" (an r1lab
    checkpoint's, or r1lab_metadata.json beside a Hugging Face model r1lab trained), else "r1"."""
    template = model_metadata(path).get("template", R1)
    if template not in TEMPLATES:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE}: metadata template {template!r} is not one of {TEMPLATES}")
    return template


def read_trainer_state(path: str | Path) -> dict[str, Any] | None:
    """The trainer state dict of a checkpoint, or None if it was saved without one."""
    return _read_trainer_state(_committed_dir(Path(path)))


def read_trainer_summary(path: str | Path) -> dict[str, Any]:
    """The JSON-able top-level entries of the trainer state (step, ...), read without its tensors."""
    file = _committed_dir(Path(path)) / TRAINER_STATE_JSON
    return read_json_object(file) if file.is_file() else {}


def read_json_object(file: Path, error: type[Exception] = CheckpointError) -> dict[str, Any]:
    """The JSON object in `file`; `error` naming the file if it is not valid JSON or not an object."""
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{file}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise error(f"{file}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _read_config(root: Path) -> dict[str, Any]:
    file = root / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; not an r1lab checkpoint directory")
    doc = read_json_object(file)
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {doc.get('format_version')!r} is not "
                              f"supported (this r1lab reads {FORMAT_VERSION})")
    unknown = sorted(set(doc) - _CONFIG_KEYS)
    if unknown:
        raise CheckpointError(f"{file}: unknown key(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(_CONFIG_KEYS))}")
    doc.setdefault("tied_weights", {})
    doc.setdefault("metadata", {})
    tied = doc["tied_weights"]
    if not (isinstance(tied, dict) and all(isinstance(v, str) for v in tied.values())):
        raise CheckpointError(f"{file}: tied_weights must map tensor names to tensor names")
    if not isinstance(doc["metadata"], dict):
        raise CheckpointError(f"{file}: metadata must be a JSON object")
    return doc


def _model_config(root: Path, doc: dict[str, Any]) -> ModelConfig:
    if not isinstance(doc.get("model"), dict):
        raise CheckpointError(f"{root / CONFIG_FILE}: missing the 'model' object")
    try:
        return model_config_from_dict(doc["model"])
    except ConfigError as e:
        raise CheckpointError(f"{root / CONFIG_FILE}: {e}") from None


def _load_weights(root: Path, model: Transformer, tied: dict[str, str]) -> None:
    """Check every tensor's presence and shape against the model, then copy them in."""
    stored, listing = _stored_tensors(root)  # name -> (file, shape); the index or weights file
    expected = model.state_dict()
    # Names that share storage in the freshly built model are filled by any one of them.
    partners: dict[tuple, list[str]] = {}
    for name, tensor in expected.items():
        if tensor.numel() > 0:
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            partners.setdefault(key, []).append(name)
    aliases_of = {name: group for group in partners.values() for name in group}

    sources: dict[str, str] = {}  # model name -> stored name
    for name in expected:
        source = name if name in stored else tied.get(name)
        if source is None:
            source = next((n for n in aliases_of.get(name, ()) if n in stored), None)
        if source is None or source not in stored:
            raise CheckpointError(f"{root / listing}: tensor {name!r} is missing "
                                  f"(the model built from {CONFIG_FILE} needs it)")
        file, shape = stored[source]
        if shape != tuple(expected[name].shape):
            raise CheckpointError(f"{root / file}: tensor {source!r} has shape {list(shape)}, "
                                  f"{CONFIG_FILE} implies {list(expected[name].shape)}")
        sources[name] = source
    for name, (file, _) in stored.items():
        if name not in expected:
            raise CheckpointError(f"{root / file}: unexpected tensor {name!r} "
                                  f"(not in the model built from {CONFIG_FILE})")
    for alias in tied:
        if alias not in expected:
            raise CheckpointError(f"{root / CONFIG_FILE}: tied_weights names unknown tensor {alias!r}")

    by_file: dict[str, list[str]] = {}
    for name, source in sources.items():
        by_file.setdefault(stored[source][0], []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            try:
                with safe_open(root / file, framework="pt") as f:
                    for name in names:
                        expected[name].copy_(f.get_tensor(sources[name]))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{root / file}: cannot be read ({e})") from None


def _stored_tensors(root: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], str]:
    """name -> (file, shape) over the single weights file or all shards named by the index,
    and the file that lists them (the index, or the single weights file)."""
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
    elif (root / WEIGHTS_FILE).is_file():
        weight_map, files = None, [WEIGHTS_FILE]
    else:
        raise CheckpointError(f"{root / WEIGHTS_FILE}: missing (and no {INDEX_FILE})")
    stored = {}
    for file in files:
        if not (root / file).is_file():
            raise CheckpointError(f"{root / file}: missing (listed in {INDEX_FILE})")
        for name, shape in _safetensors_header(root / file).items():
            if weight_map is not None and weight_map.get(name) != file:
                raise CheckpointError(f"{root / file}: tensor {name!r} is not mapped to this "
                                      f"file by {INDEX_FILE}")
            stored[name] = (file, shape)
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in stored:
                raise CheckpointError(f"{root / file}: tensor {name!r} listed in {INDEX_FILE} "
                                      f"is not in the file")
    return stored, INDEX_FILE if weight_map is not None else WEIGHTS_FILE


def _safetensors_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, after checking the file is whole.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the data; each tensor's
    `data_offsets` are relative to the data start, so the file must be 8 + N + max(end) bytes.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated ({size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{file}: truncated ({size} bytes, header alone needs {8 + n})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        shapes, end = {}, 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shapes[name] = tuple(int(d) for d in info["shape"])
            _, stop = (int(x) for x in info["data_offsets"])
            end = max(end, stop)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError,
            AttributeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e!r})") from None
    if size < 8 + n + end:
        raise CheckpointError(f"{file}: truncated ({size} bytes, header says {8 + n + end})")
    if size > 8 + n + end:
        raise CheckpointError(f"{file}: corrupt ({size} bytes, header says {8 + n + end})")
    return shapes


def _read_trainer_state(root: Path) -> dict[str, Any] | None:
    file = root / TRAINER_STATE_FILE
    if not file.is_file():
        return None
    try:
        # Keep storages on the CPU: torch.set_rng_state needs CPU tensors, and
        # Optimizer.load_state_dict moves its state to the parameters' device itself.
        state = torch.load(file, map_location=lambda storage, _: storage, weights_only=True)
    except Exception as e:  # truncated pickles raise EOFError, RuntimeError, UnpicklingError, ...
        raise CheckpointError(f"{file}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dict, got {type(state).__name__}")
    return state


# -------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU, and CUDA if initialised) RNG states, in plain types."""
    import numpy as np

    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(),
                                        "pos": int(np_state["state"]["pos"])}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured, so the next random draws repeat."""
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
                         "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------- the atomic protocol
def _sibling(target: Path, kind: str, token: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{token}"


def _leftovers(target: Path) -> dict[str, dict[str, Path]]:
    """{"tmp": {token: dir}, "old": {token: dir}} left by interrupted saves to `target`."""
    found: dict[str, dict[str, Path]] = {"tmp": {}, "old": {}}
    if not target.parent.is_dir():
        return found
    for kind in found:
        prefix = f".{target.name}.{kind}-"
        for entry in target.parent.iterdir():
            if entry.name.startswith(prefix) and entry.is_dir():
                found[kind][entry.name[len(prefix):]] = entry
    return found


def _committed_dir(target: Path) -> Path:
    """The directory holding the last committed checkpoint for `target`, without changing disk."""
    if target.is_dir():
        return target
    left = _leftovers(target)
    for token, old in left["old"].items():
        tmp = left["tmp"].get(token)  # an .old dir exists only once its .tmp partner is complete
        return tmp if tmp is not None and (tmp / CONFIG_FILE).is_file() else old
    if target.exists():
        raise CheckpointError(f"{target}: not a checkpoint directory (a file)")
    raise CheckpointError(f"{target}: no checkpoint here (directory missing)")


def _recover(target: Path) -> None:
    """Finish a save killed between its two renames, then delete every stale temp dir."""
    left = _leftovers(target)
    if not target.exists() and left["old"]:
        os.rename(_committed_dir(target), target)
        _fsync_dir(target.parent)
    for kind in ("tmp", "old"):
        for path in left[kind].values():
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a file's contents so that a kill leaves either the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(file: Path, obj: Any) -> None:
    file.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _is_jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _fsync_tree(directory: Path) -> None:
    for file in directory.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows) need no directory fsync
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
