"""Randomly initialised BLIP models built locally with the real classes: for tests, offline smoke runs and benchmarks.

A build is an ordinary `save_pretrained` directory per role plus a marker file, so the loader
(models.py) reads it exactly as it reads real weights, and every decision made on it says `random`.
No network: the tokenizer is a BERT WordPiece tokenizer over a generated vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, get_args

import torch
from transformers import BertTokenizer, BlipConfig, BlipImageProcessorPil, BlipProcessor

from core.errors import ConfigError, ModelError
from worker.families.blip.models import MODEL_CLASSES
from worker.families.blip.presets import RANDOM_BUILD_VERSION, RANDOM_MARKER, ROLES, RandomSize
from worker.families.blip.wordlist import COMMON_WORDS, SUFFIX_PIECES

_BUILD_LOCK = threading.Lock()


def build_random_models(dest: Path, size: RandomSize, seed: int = 0) -> Path:
    """Build randomly initialised caption, VQA and ITM models with the real classes into `dest`.

    No network: the tokenizer is a BERT WordPiece tokenizer over a generated vocabulary with the
    `[DEC]` bos and `[ENC]` tokens of the Salesforce checkpoints. Deterministic per (size, seed).
    Atomic: built in a temporary directory beside `dest` and renamed, so concurrent builders are safe
    and a crash never leaves a half-built `dest`. An existing build with the same recipe is reused.
    """
    if size not in get_args(RandomSize):
        raise ConfigError(f"random model size must be tiny or base, not {size!r}", code="model_size_unknown")
    dest = Path(dest)
    marker = {"random": True, "size": size, "seed": seed, "version": RANDOM_BUILD_VERSION}
    if dest.exists():
        _check_existing_build(dest, marker)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".building", dir=dest.parent))
    try:
        # Weight init draws from torch's global RNG: builds in one process take turns.
        with _BUILD_LOCK:
            _write_random_models(tmp, size, seed, marker)
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process finished first: its build is identical, keep it.
            if not (dest / RANDOM_MARKER).is_file():
                raise
            _check_existing_build(dest, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# Helpers.


def _check_existing_build(dest: Path, marker: dict[str, Any]) -> None:
    try:
        found = json.loads((dest / RANDOM_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = None
    if found != marker:
        raise ModelError(
            f"{dest} exists but is not a random model build of {marker} (found {found}); remove it to rebuild",
            code="model_dir_conflict",
        )


def _write_random_models(root: Path, size: RandomSize, seed: int, marker: dict[str, Any]) -> None:
    tokenizer = _random_tokenizer(size)
    dims = _BASE_DIMS if size == "base" else _TINY_DIMS
    image_processor = BlipImageProcessorPil(size={"height": dims["image_size"], "width": dims["image_size"]})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = _random_config(dims, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id)
    marker_text = json.dumps(marker, sort_keys=True) + "\n"
    for index, role in enumerate(ROLES):
        # The global RNG drives transformers' weight init; fork it so callers' random state is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * len(ROLES) + index)
            model = MODEL_CLASSES[role](config)
        model.eval()
        model.save_pretrained(root / role)
        processor.save_pretrained(root / role)
        (root / role / RANDOM_MARKER).write_text(marker_text, encoding="utf-8")
        del model
    (root / RANDOM_MARKER).write_text(marker_text, encoding="utf-8")


# Real base sizes (Salesforce/blip-*-base); tiny ones with weights initialised wider than BERT's 0.02
# so that random outputs differ visibly between images and texts (tests compare them).
_BASE_DIMS: dict[str, Any] = {
    "hidden": 768, "intermediate": 3072, "layers": 12, "heads": 12, "image_size": 384, "patch": 16,
    "projection": 512, "text_projection": 768, "itm_hidden": 256, "init": 0.02,
}  # fmt: skip
_TINY_DIMS: dict[str, Any] = {
    "hidden": 32, "intermediate": 64, "layers": 2, "heads": 4, "image_size": 32, "patch": 8,
    "projection": 32, "text_projection": 32, "itm_hidden": 16, "init": 0.3,
}  # fmt: skip


def _random_config(dims: dict[str, Any], *, vocab_size: int, bos_token_id: int) -> BlipConfig:
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": dims["hidden"],
        "encoder_hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"],
        "projection_dim": dims["text_projection"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "max_position_embeddings": 512,
        "initializer_range": dims["init"],
        "bos_token_id": bos_token_id,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "sep_token_id": 102,
    }
    vision_config = {
        "hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"],
        "projection_dim": dims["projection"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "image_size": dims["image_size"],
        "patch_size": dims["patch"],
        "initializer_range": dims["init"],
    }
    return BlipConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=dims["projection"],
        image_text_hidden_size=dims["itm_hidden"],
        initializer_range=dims["init"],
    )


def _random_tokenizer(size: RandomSize) -> BertTokenizer:
    vocab = _random_vocab(size)
    tokenizer = BertTokenizer(
        vocab={token: index for index, token in enumerate(vocab)},
        do_lower_case=True,
        bos_token=_DEC_TOKEN,
        additional_special_tokens=[_ENC_TOKEN],
        model_max_length=512,
    )
    if tokenizer.convert_tokens_to_ids(_DEC_TOKEN) != len(vocab):
        raise RuntimeError("the [DEC] token must follow the WordPiece vocabulary, as in the BLIP checkpoints")
    return tokenizer


def _random_vocab(size: RandomSize) -> list[str]:
    # Single characters and their "##" continuations make every text tokenizable (like BERT's vocab).
    characters = [*_PUNCTUATION, *"0123456789", *"abcdefghijklmnopqrstuvwxyz"]
    vocab = list(_HEAD_TOKENS)
    vocab += characters
    vocab += [f"##{char}" for char in characters]
    seen = set(vocab)
    for word in (*COMMON_WORDS, *SUFFIX_PIECES):
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    if size == "base":
        vocab += [f"[unused{index}]" for index in range(99, 99 + _BERT_VOCAB_SIZE - len(vocab))]
    return vocab


# Specials at the ids of bert-base-uncased, which the BLIP checkpoints use: pad 0, unk 100, cls 101, sep 102.
_HEAD_TOKENS = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BERT_VOCAB_SIZE = 30522
_DEC_TOKEN = "[DEC]"
_ENC_TOKEN = "[ENC]"
_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
