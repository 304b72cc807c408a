"""sdrt.tokenizer.ClipTokenizer gives exactly the ids diffusers feeds the text encoder."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sdrt.errors import ArtifactError
from sdrt.tokenizer import ClipTokenizer

LONG = "a highly detailed oil painting of a majestic castle on a hill at sunset, " * 8
CORPUS = [
    "a photo of a cat",
    "A PHOTO OF A CAT, Trending On ArtStation",
    "café naïve Ångström résumé Straße",
    "一只猫的照片 猫の写真 고양이 사진",
    "🐱🚀 cat astronaut 👩‍🚀",
    "wow!!! ... ??? --- (((masterpiece))) [[best quality]] {x|y} @#$%^&*",
    "1234567 apples and 3.14 pies, 1,000,000 dollars; 2024-01-01",
    "   leading, trailing   and    repeated spaces   ",
    "tabs\tand\nnewlines\r\n here",
    "don't stop, it's fine, we're here, they'll go, I'd say, I'm ok, you've won",
    "",
    "<|endoftext|> special tokens <|startoftext|> inline",
    LONG,
    "x" * 1000,
]


@pytest.fixture(scope="module")
def tok_dir(tiny_model_dir):
    return tiny_model_dir / "tokenizer"


@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)


def _reference(hf, prompts):
    return np.array(hf(prompts, padding="max_length", max_length=77, truncation=True).input_ids, dtype=np.int32)


@pytest.mark.parametrize("prompt", CORPUS, ids=range(len(CORPUS)))
def test_matches_transformers(tok_dir, hf, prompt):
    ids = ClipTokenizer.from_dir(tok_dir)([prompt])
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    np.testing.assert_array_equal(ids, _reference(hf, [prompt]))


def test_batch_and_known_ids(tok_dir, hf):
    ids = ClipTokenizer.from_dir(tok_dir)(CORPUS)
    np.testing.assert_array_equal(ids, _reference(hf, CORPUS))
    assert list(ids[0, :8]) == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert list(ids[CORPUS.index(""), :3]) == [49406, 49407, 49407]


def test_truncation_warns_with_dropped_count(tok_dir, hf, caplog):
    dropped = len(hf(LONG).input_ids) - 77
    assert dropped > 0
    with caplog.at_level(logging.WARNING, logger="sdrt.tokenizer"):
        ids = ClipTokenizer.from_dir(tok_dir)([LONG, "a photo of a cat"])
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407
    warnings = [r.getMessage() for r in caplog.records if r.name == "sdrt.tokenizer"]
    assert len(warnings) == 1 and f" {dropped} tokens" in warnings[0] and "sunset" in warnings[0]


def test_sd2_style_pad_token(tok_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    sd2 = shutil.copytree(tok_dir, tmp_path / "tokenizer")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((sd2 / name).read_text())
        data["pad_token"] = "!"
        (sd2 / name).write_text(json.dumps(data))
    hf = transformers.CLIPTokenizer.from_pretrained(sd2, local_files_only=True)
    prompts = ["a photo of a cat", "", LONG]
    ids = ClipTokenizer.from_dir(sd2)(prompts)
    np.testing.assert_array_equal(ids, _reference(hf, prompts))
    assert list(ids[0, 6:9]) == [49407, 0, 0]


def test_missing_or_invalid_files(tok_dir, tmp_path):
    with pytest.raises(ArtifactError, match="no tokenizer.json"):
        ClipTokenizer.from_dir(tmp_path / "nowhere")
    bad = shutil.copytree(tok_dir, tmp_path / "bad")
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="re-export") as info:
        ClipTokenizer.from_dir(bad)
    assert "\n" not in str(info.value)
    (bad / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (bad / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|nope|>"}))
    with pytest.raises(ArtifactError, match="nope"):
        ClipTokenizer.from_dir(bad)


def test_runtime_import_is_torch_free():
    code = ("import sys, sdrt.tokenizer; bad = {'torch', 'transformers', 'diffusers'} & set(sys.modules); "
            "sys.exit(str(bad) if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)
