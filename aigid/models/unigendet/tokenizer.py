"""Tokenizers for UniGenDet: byte-level for tiny models, a local Qwen2 tokenizer for BAGEL.

Both expose BAGEL's four special tokens by role: ``im_start`` (BAGEL's bos, opens every text
turn and the answer), ``im_end`` (eos), ``vision_start`` / ``vision_end`` (wrap every image
split). Special tokens are never parsed out of user text: ``encode`` treats it as plain text.
The Qwen2 tokenizer is read from a local directory (``tokenizer.json`` through ``tokenizers``,
else ``transformers`` with ``local_files_only``); nothing is ever downloaded.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Protocol, Sequence, Union

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "ByteTokenizer", "Qwen2Tokenizer", "build_tokenizer"]

SPECIAL_TOKENS = {"im_start": "<|im_start|>", "im_end": "<|im_end|>",
                  "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"}


class Tokenizer(Protocol):
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; the special tokens follow (256..259)."""

    def __init__(self, vocab_size: int = 272):
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"a byte tokenizer needs vocab_size >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
        self.vocab_size = vocab_size
        for i, role in enumerate(SPECIAL_TOKENS):
            setattr(self, role, 256 + i)
        self._names = {256 + i: tok for i, tok in enumerate(SPECIAL_TOKENS.values())}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        out, buf = [], bytearray()
        for i in (int(x) for x in ids):
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special:
                out.append(self._names.get(i, f"<|{i}|>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class Qwen2Tokenizer:
    """Qwen2/2.5's BPE tokenizer from a local folder (BAGEL ships it beside its weights)."""

    def __init__(self, path: Union[str, os.PathLike]):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
        self._tok, self._hf = None, None
        tok_json = os.path.join(path, "tokenizer.json")
        try:
            import tokenizers
            if os.path.isfile(tok_json):
                self._tok = tokenizers.Tokenizer.from_file(tok_json)
        except ImportError:
            pass
        if self._tok is None:
            try:
                from transformers import AutoTokenizer
            except ImportError as e:
                raise ImportError("a Qwen2 tokenizer needs the 'tokenizers' package (with tokenizer.json) "
                                  "or 'transformers': pip install tokenizers") from e
            self._hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self._tok is not None:
            # Text that spells a special token stays text: a caption or question containing
            # "<|im_end|>" must not close the turn (tokenizers matches added tokens otherwise).
            self._tok.encode_special_tokens = True
        for role, tok in SPECIAL_TOKENS.items():
            i = self._tok.token_to_id(tok) if self._tok is not None else self._hf.convert_tokens_to_ids(tok)
            if i is None or (self._hf is not None and i == self._hf.unk_token_id):
                raise ValueError(f"tokenizer at {path!r} has no {tok} token")
            setattr(self, role, int(i))
        self.vocab_size = self._tok.get_vocab_size() if self._tok is not None else len(self._hf)

    def encode(self, text: str) -> list[int]:
        if self._tok is not None:
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        return list(self._hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=skip_special)
        return self._hf.decode(ids, skip_special_tokens=skip_special)


def build_tokenizer(spec: Optional[dict[str, Any]], vocab_size: int) -> Tokenizer:
    """``{"kind": "bytes"}`` (default) or ``{"kind": "qwen2", "path": local_dir}``."""
    spec = spec or {"kind": "bytes"}
    kind = spec.get("kind", "bytes")
    if kind == "bytes":
        return ByteTokenizer(vocab_size)
    if kind == "qwen2":
        if not spec.get("path"):
            raise ValueError("a qwen2 tokenizer needs a local 'path' (the BAGEL folder or its tokenizer)")
        tok = Qwen2Tokenizer(spec["path"])
        if tok.vocab_size > vocab_size:
            raise ValueError(f"tokenizer has {tok.vocab_size} tokens, the model's vocabulary only {vocab_size}")
        return tok
    raise ValueError(f"unknown tokenizer kind {kind!r} (bytes or qwen2)")
