"""Tokenizer: HF `tokenizer.json` through the `tokenizers` library, the chat template, and an incremental
UTF-8-safe detokenizer (after mlx-lm's StreamingDetokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .errors import InputError, ModelLoadError


def _token_str(tok) -> str | None:
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


class Tokenizer:
    def __init__(self, folder: str | Path, generation_config: dict | None = None):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{path} not found: the model folder needs a tokenizer.json")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ModelLoadError(f"cannot read {path}: {e}") from None
        cfg: dict = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelLoadError(f"cannot parse {cfg_path}: {e}") from None
        self.chat_template: str | None = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # list of {"name", "template"}: take "default"
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.bos_id = self.token_to_id(self.bos_token)
        self._special_ids: set[int] = set()  # filled lazily by `special_ids`
        eos = set()
        gc = generation_config or {}
        gc_eos = gc.get("eos_token_id")
        if isinstance(gc_eos, int):
            eos.add(gc_eos)
        elif isinstance(gc_eos, list):
            eos.update(gc_eos)
        for name in (self.eos_token, "<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
            tid = self.token_to_id(name)
            if tid is not None and (name == self.eos_token or self._is_special(tid)):
                eos.add(tid)
        self.eos_ids: frozenset[int] = frozenset(eos)

    # ---- basics --------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def _is_special(self, tid: int) -> bool:
        return tid in self.special_ids

    @property
    def special_ids(self) -> set[int]:
        if not self._special_ids:
            self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        return self._special_ids

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Special tokens written in `text` (e.g. from a chat template) are recognised as such."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    # ---- chat ----------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from .chat_template import render_chat

        if not self.chat_template:
            raise InputError("this model has no chat template; use raw prompts (--raw)")
        return render_chat(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )


class StreamingDetokenizer:
    """Feed token ids one at a time; `add` returns only newly completed text.

    Decodes the ids not yet emitted (with one token of left context, so decoders that strip a leading
    space see it) and holds back text ending in an incomplete UTF-8 sequence (U+FFFD), so multi-token
    characters (emoji, CJK) come out whole. Cost per token is O(pending), not O(all).
    Invariant tested: ''.join(pieces) == tokenizer.decode(all_ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tok = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._start = 0  # ids[_start:] are not emitted yet

    def _pending_text(self) -> str:
        ctx = self.ids[max(0, self._start - 1) : self._start]
        full = self.tok.decode(ctx + self.ids[self._start :], skip_special=self.skip_special)
        head = self.tok.decode(ctx, skip_special=self.skip_special) if ctx else ""
        return full[len(head) :] if full.startswith(head) else full

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._pending_text()
        if text.endswith("\ufffd"):
            return ""
        self._start = len(self.ids)
        return text

    def finish(self) -> str:
        if self._start >= len(self.ids):
            return ""
        text = self._pending_text()
        self._start = len(self.ids)
        return text
