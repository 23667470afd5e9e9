"""A Hugging Face CLIP tokenizer built offline from the BPE file that open_clip ships.

No pretrained tokenizer can be downloaded here, but ``open_clip`` carries OpenAI's CLIP BPE
merges (``bpe_simple_vocab_16e6.txt.gz``). Rebuilding the vocabulary the way open_clip's
``SimpleTokenizer`` does gives a ``transformers.CLIPTokenizer`` whose ids match open_clip's
exactly (except the padding id: open_clip pads with 0, Hugging Face with ``<|endoftext|>``).

Heavy imports (transformers, open_clip) happen inside the function so this module stays cheap.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import transformers

# open_clip keeps the first 49152 - 256 - 2 merges: 256 byte tokens + 256 end-of-word byte
# tokens + the merges + 2 special tokens = 49408 ids.
_N_MERGES = 49152 - 256 - 2
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"


def _clip_vocab_and_merges(bpe_path: str) -> tuple[list[str], list[str]]:
    """Return (tokens in id order, merge lines) exactly as open_clip's SimpleTokenizer builds them."""
    from open_clip.tokenizer import bytes_to_unicode

    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]  # line 0 is the "#version" header
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [_BOS, _EOS]
    return vocab, merges


def clip_bpe_tokenizer(model_max_length: int = 77) -> "transformers.CLIPTokenizer":
    """Build a ``transformers.CLIPTokenizer`` from ``open_clip.tokenizer.default_bpe()``.

    Args:
        model_max_length: the context length; ``tokenizer(..., padding="max_length",
            truncation=True)`` then yields exactly this many ids, like ``open_clip.tokenize``.

    Returns:
        A tokenizer with 49,408 ids, bos ``<|startoftext|>`` (49406), eos and pad
        ``<|endoftext|>`` (49407). Ids equal open_clip's for every non-padding position.
    """
    from open_clip.tokenizer import default_bpe
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges(default_bpe())
    with tempfile.TemporaryDirectory(prefix="clip_bpe_") as tmp:
        vocab_path = Path(tmp) / "vocab.json"
        merges_path = Path(tmp) / "merges.txt"
        vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
        merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        # Positional on purpose: transformers 4 names these vocab_file/merges_file, 5 names them
        # vocab/merges; a wrong keyword is swallowed by **kwargs and yields a garbage tokenizer.
        # The files are read here, so the temporary directory may go away afterwards.
        tokenizer = CLIPTokenizer(
            str(vocab_path),
            str(merges_path),
            pad_token=_EOS,
            model_max_length=model_max_length,
        )
    if len(tokenizer) != len(vocab):
        raise RuntimeError(
            f"CLIP BPE tokenizer has {len(tokenizer)} ids, expected {len(vocab)}; "
            "the transformers CLIPTokenizer constructor may have changed."
        )
    return tokenizer
