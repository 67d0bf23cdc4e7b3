"""Tokenizers: load a Hugging Face tokenizer directory, or train a small one for the embedded data.

The text tower expects BERT-style framing, ``[CLS] text [SEP]`` padded with ``[PAD]``, as the ModernBERT
tokenizer produces. ``train_tokenizer`` builds the same kind of tokenizer (byte-level BPE, the same
special tokens and post-processor) on a corpus, with no download.

Captions are cleaned before tokenisation as open_clip's ``HFTokenizer`` cleans them (``clean="whitespace"``:
``ftfy.fix_text``, HTML entities unescaped twice, whitespace collapsed and stripped), so that training,
evaluation, ``load_model`` and open_clip on an export see the same tokens: ``CaptionTokenizer`` wraps the Hugging
Face tokenizer with the model's ``text_clean`` mode ("none" for runs from before it existed).
"""
from __future__ import annotations

import html
import logging
from collections.abc import Iterable
from pathlib import Path

from bmc_fast.errors import ConfigError

_logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def clean_caption(text: str, mode: str) -> str:
    """``text`` as the tokenizer should see it: unchanged (``"none"``) or open_clip's ``clean="whitespace"``
    (``open_clip/tokenizer.py``: ``whitespace_clean(basic_clean(text))``)."""
    if mode == "none":
        return text
    if mode != "whitespace":
        raise ConfigError(f"text_clean must be 'none' or 'whitespace', got {mode!r}")
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split())


class CaptionTokenizer:
    """A Hugging Face tokenizer that cleans every text first (``clean_caption``); everything else is the wrapped
    tokenizer's (``save_pretrained``, ``pad_token_id``, ``len`` ...).

    Called with keyword arguments it is the Hugging Face tokenizer (``tok(texts, padding=..., return_tensors="pt")``);
    called with the texts alone it is open_clip's: ``tok(list[str]) -> LongTensor(n, context_length)``, padded to
    the model's context with ``[PAD]``.
    """

    def __init__(self, tokenizer, clean: str = "none", context_length: int | None = None):
        clean_caption("", clean)  # an unknown mode stops here
        self.tokenizer, self.clean, self.context_length = tokenizer, clean, context_length

    def __call__(self, texts: str | list[str], **kwargs):
        texts = [clean_caption(t, self.clean) for t in ([texts] if isinstance(texts, str) else texts)]
        if kwargs:
            return self.tokenizer(texts, **kwargs)
        if self.context_length is None:
            raise ConfigError("CaptionTokenizer called open_clip's way (texts only) without a context_length")
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt")["input_ids"]

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name: str):
        if name == "tokenizer":  # not set yet (unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __repr__(self) -> str:
        return f"CaptionTokenizer({type(self.tokenizer).__name__}, clean={self.clean!r}, " \
               f"context_length={self.context_length})"


def load_tokenizer(path: str | Path, flag: str = "--tokenizer", clean: str = "none",
                   context_length: int | None = None) -> CaptionTokenizer:
    """``AutoTokenizer.from_pretrained(path)`` from a local directory, with errors that name ``flag``, cleaning
    captions by ``clean`` (``CaptionTokenizer``)."""
    from transformers import AutoTokenizer

    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is not a directory: pass a Hugging Face tokenizer directory "
                          "(one holding tokenizer.json), e.g. ../shared/data/tokenizers/modernbert")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{flag} {str(path)!r} holds no tokenizer (none of {list(TOKENIZER_FILES)}): point it "
                          "at a directory written by tokenizer.save_pretrained(...)")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    missing = [name for name in ("cls_token", "sep_token", "pad_token") if getattr(tokenizer, name) is None]
    if missing:
        raise ConfigError(f"{flag} {str(path)!r}: the tokenizer defines no {missing}; the text tower needs "
                          "[CLS], [SEP] and [PAD] (as in ModernBERT's tokenizer)")
    return CaptionTokenizer(tokenizer, clean, context_length)


def tokenize_captions(tokenizer, captions: list[str], context_length: int) -> dict:
    """Both loaders' caption tokenisation: ``[CLS] text [SEP]`` truncated to ``context_length`` tokens and
    padded to the batch's longest caption. ``{"input_ids": (B, L) int64, "attention_mask": (B, L)}``."""
    tokens = tokenizer(list(captions), padding="longest", truncation=True, max_length=context_length,
                       return_tensors="pt")
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2048, max_length: int = 512):
    """Train a byte-level BPE tokenizer with ModernBERT's framing; save it to ``out_dir`` and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        pad_token="[PAD]", mask_token="[MASK]", model_max_length=max_length)
    fast.save_pretrained(str(out_dir))
    _logger.info("trained a %d-id BPE tokenizer, saved to %s", len(fast), out_dir)
    return fast
