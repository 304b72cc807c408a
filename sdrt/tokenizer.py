"""The runtime CLIP tokenizer: the ids diffusers feeds the text encoder, without transformers.

Reads a diffusers ``tokenizer/`` folder: ``tokenizer.json`` (the ``tokenizers`` library's fast
tokenizer) for the BPE, ``tokenizer_config.json`` / ``special_tokens_map.json`` for the maximum
length and the special tokens (SD1.x pads with ``<|endoftext|>``, SD2 with ``!``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from sdrt.errors import ArtifactError

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 77


def _token(value) -> str | None:
    """A special token as written in a config: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


class ClipTokenizer:
    """``tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`` as int32 arrays."""

    def __init__(self, tokenizer, max_length: int, bos_id: int, eos_id: int, pad_id: int):
        self._tok = tokenizer
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    @classmethod
    def from_dir(cls, path) -> "ClipTokenizer":
        """Load from a folder holding tokenizer.json and tokenizer_config.json."""
        from tokenizers import Tokenizer

        folder = Path(path)
        fix = "re-export the model (or restore the tokenizer/ folder of its diffusers model)"
        if not (folder / "tokenizer.json").is_file():
            raise ArtifactError(f"no tokenizer.json in {folder}; {fix}")
        config: dict = {}
        try:
            for name in ("special_tokens_map.json", "tokenizer_config.json"):
                if (folder / name).is_file():
                    data = json.loads((folder / name).read_text(encoding="utf-8"))
                    if not isinstance(data, dict):
                        raise ValueError(f"{name} is not a JSON object")
                    config.update(data)
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception for a missing or invalid file
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ArtifactError(f"cannot load the tokenizer in {folder} ({reason}); {fix}") from None

        max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
        if not isinstance(max_length, int) or not 2 < max_length <= 4096:
            max_length = DEFAULT_MAX_LENGTH
        names = {k: _token(config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        names["bos_token"] = names["bos_token"] or "<|startoftext|>"
        names["eos_token"] = names["eos_token"] or "<|endoftext|>"
        names["pad_token"] = names["pad_token"] or names["eos_token"]
        ids = {k: tok.token_to_id(v) for k, v in names.items()}
        missing = [names[k] for k, v in ids.items() if v is None]
        if missing:
            raise ArtifactError(f"tokenizer in {folder} has no token {missing[0]!r}; {fix}")
        return cls(tok, max_length, ids["bos_token"], ids["eos_token"], ids["pad_token"])

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """Token ids, shape (len(prompts), max_length): BOS, tokens, EOS, pad; over-long prompts truncated."""
        if isinstance(prompts, str):
            prompts = [prompts]
        room = self.max_length - 2
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
        for row, enc in zip(out, self._tok.encode_batch(list(prompts), add_special_tokens=False)):
            ids = enc.ids
            if len(ids) > room:
                dropped = self._tok.decode(ids[room:]).replace("</w>", " ").strip()
                log.warning("prompt is %d tokens over the %d-token limit; dropped: %r",
                            len(ids) - room, room, dropped)
                ids = ids[:room]
            row[: len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
        return out
