"""How Embed pools a prompt: read from the checkpoint's sentence-transformers files; torch-free.

Qwen3-Embedding checkpoints ship a sentence-transformers config: ``modules.json`` lists the modules
(``Transformer``, then ``Pooling`` in ``1_Pooling/``, then ``Normalize``), and ``1_Pooling/config.json``
sets ``pooling_mode_lasttoken: true``. What this engine honours:

- the pooling mode: only last-token pooling is implemented; a Pooling config that sets another mode
  (cls, mean, max, ...), alone or beside ``pooling_mode_lasttoken``, is refused when the engine loads
  (ValueError naming the file and key), rather than served with the wrong pooling;
- normalisation: on by default when ``modules.json`` lists a ``Normalize`` module, off when it lists modules
  without one; a checkpoint without ``modules.json`` (any Qwen3 causal LM) is normalised, as Qwen3-Embedding
  expects. ``EmbedRequest.normalize`` overrides it per request.

Ignored: ``include_prompt`` (meaningless for last-token pooling), ``word_embedding_dimension`` (the embedding
is the model's hidden size), prompts in ``config_sentence_transformers.json`` (the caller tokenizes, so any
instruction prefix is the caller's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

_POOLING_TYPE = "sentence_transformers.models.Pooling"
_NORMALIZE_TYPE = "sentence_transformers.models.Normalize"
_DEFAULT_POOLING_DIR = "1_Pooling"
_LAST = "pooling_mode_lasttoken"


@dataclass(frozen=True)
class PoolingConfig:
    """What Embed computes: the last token's final-norm hidden state, L2-normalised when ``normalize``."""

    normalize: bool = True  # the default when the request leaves EmbedRequest.normalize unset
    source: str = "default (no modules.json)"  # where this came from, for the log line at load

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> PoolingConfig:
        """Read ``modules.json`` and its Pooling module's ``config.json`` (if present). Raises ValueError
        naming the file and key for a pooling mode other than last-token, or for unreadable JSON."""
        model_dir = Path(model_dir)
        modules_path = model_dir / "modules.json"
        if not modules_path.is_file():
            pooling_path = model_dir / _DEFAULT_POOLING_DIR / "config.json"
            if pooling_path.is_file():
                _check_pooling(pooling_path)
            return cls()
        modules = _read_json(modules_path)
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise ValueError(f"{modules_path}: expected a list of modules (objects with 'type' and 'path')")
        types = [str(m.get("type", "")) for m in modules]
        for module in modules:
            if module.get("type") == _POOLING_TYPE:
                _check_pooling(model_dir / str(module.get("path", _DEFAULT_POOLING_DIR)) / "config.json")
        return cls(normalize=_NORMALIZE_TYPE in types, source=str(modules_path))


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it as JSON: {exc}") from None


def _check_pooling(path: Path) -> None:
    if not path.is_file():
        return  # a Pooling module without a config: sentence-transformers' default needs the module's own args
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    others = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v is True and k != _LAST)
    if others:  # alone, or beside last-token (sentence-transformers then concatenates the pooled vectors)
        raise ValueError(
            f"{path}: {', '.join(others)} is set, but this engine implements last-token pooling only "
            f"({_LAST}, what Qwen3-Embedding uses)"
        )
