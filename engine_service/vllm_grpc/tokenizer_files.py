"""GetTokenizer: the checkpoint's tokenizer files as one zip, streamed in chunks, its SHA-256 on the last
chunk, so SMG builds the tokenizer (and chat template) without a disk shared with the engine."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

from qwen3serve.smg import common_pb2

#: What a Hugging Face tokenizer (and its chat template) is made of; those present are sent.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)
CHUNK_BYTES = 1 << 20


def tokenizer_zip(model_dir: Path) -> bytes:
    """The tokenizer files of ``model_dir`` zipped (flat names). FileNotFoundError without tokenizer.json."""
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                archive.write(model_dir / name, name)
    return buffer.getvalue()


def tokenizer_chunks(model_dir: Path) -> list[common_pb2.GetTokenizerChunk]:
    """The zip as GetTokenizer's chunks; only the last carries ``sha256`` (hex) of the whole zip."""
    data = tokenizer_zip(model_dir)
    chunks = [common_pb2.GetTokenizerChunk(data=data[i : i + CHUNK_BYTES]) for i in range(0, len(data), CHUNK_BYTES)]
    chunks[-1].sha256 = hashlib.sha256(data).hexdigest()
    return chunks
