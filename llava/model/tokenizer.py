"""The tokenizer of a checkpoint: one loader for every path (HF layout, original layout, ``compose``, LoRA
adapters), so training, inference, ``llava.data.show`` and a saved checkpoint all tokenize alike.

* A SentencePiece checkpoint (``tokenizer.model`` and no ``tokenizer.json``, or a ``tokenizer_config.json``
  naming ``LlamaTokenizer``, as ``liuhaotian/llava-*``, ``lmsys/vicuna-*`` and ``llava-v1.6-mistral-7b`` ship
  theirs) is read from ``tokenizer.model`` by transformers' own SentencePiece conversion
  (``TokenizersBackend``): BPE merges ranked by piece score, the model's normaliser settings, and the dummy
  prefix where the slow ``LlamaTokenizer`` of the released run puts it for its ``legacy`` setting. The
  ``LlamaTokenizer`` class of transformers 5 would rank the merges by piece id, which LLaMA's and Mistral's
  vocabularies are not sorted by (``'a  b'``: ``▁a ▁▁ b`` where sentencepiece gives ``▁a ▁ ▁b``), and drops
  the dummy prefix of a text that starts with a space.
* A ``tokenizer.json`` is read as it is (``TokenizersBackend``), as plain transformers' ``AutoProcessor`` reads
  a LLaVA directory: a checkpoint this package saves reloads to the same tokens here and there.
* Anything else goes to ``AutoTokenizer``.

With ``legacy`` false the slow tokenizer puts one ``▁`` before the whole text, also where the text starts
with a space, and none after a special token. ``tokenizers``' ``Metaspace`` skips its prefix where the text
starts with a space; the pipeline is given a first ``Metaspace`` that prefixes a plain space to the first
piece only (the normaliser has made every space ``▁`` already, so nothing makes it skip) and a second that
turns it into ``▁`` (``_prefix_whole_text``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from llava.conversation import keep_legacy_on_save

SENTENCEPIECE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
# The classes whose checkpoints the released run read with the slow, sentencepiece-backed tokenizer.
SENTENCEPIECE_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
# What a SentencePiece tokenizer needs besides tokenizer.model (never tokenizer.json: see _from_sentencepiece).
_SETTINGS_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


def tokenizer_settings(path: Path) -> dict:
    """The checkpoint's tokenizer_config.json ({} without one); a broken one stops, naming the file."""
    f = Path(path) / "tokenizer_config.json"
    if not f.is_file():
        return {}
    try:
        settings = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: cannot read ({e})") from e
    if not isinstance(settings, dict):
        raise ValueError(f"{f}: not a JSON object")
    return settings


def is_sentencepiece_checkpoint(path: str | Path) -> bool:
    """Whether ``path``'s tokenizer is its ``tokenizer.model`` (see the module docstring)."""
    path = Path(path)
    if not (path / SENTENCEPIECE).is_file():
        return False
    return not (path / TOKENIZER_JSON).is_file() or tokenizer_settings(path).get("tokenizer_class") in SENTENCEPIECE_CLASSES


def load_tokenizer(path: str | Path):
    """The tokenizer of the checkpoint directory ``path``, set to save its ``legacy`` setting."""
    from transformers import AutoTokenizer, TokenizersBackend

    path = Path(path)
    if is_sentencepiece_checkpoint(path):
        tokenizer = _from_sentencepiece(path)
    elif (path / TOKENIZER_JSON).is_file():
        tokenizer = TokenizersBackend.from_pretrained(str(path))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    keep_legacy_on_save(tokenizer)
    return tokenizer


def _from_sentencepiece(path: Path):
    """``tokenizer.model`` through transformers' SentencePiece conversion, with the checkpoint's settings.

    transformers reads a ``tokenizer.json`` whenever one lies beside the model file (a checkpoint saved
    by an older release of this package has one with id-ranked merges), so only the model and the
    settings files are handed to it.
    """
    from transformers import TokenizersBackend

    settings = tokenizer_settings(path)
    legacy = settings.get("legacy")
    kwargs = {
        # the slow LlamaTokenizer of the released run took an unset legacy as true
        "legacy": True if legacy is None else bool(legacy),
        "add_bos_token": settings.get("add_bos_token", True),
        "add_eos_token": settings.get("add_eos_token", False),
    }
    with tempfile.TemporaryDirectory(prefix="llava-tokenizer-") as tmp:
        for name in (SENTENCEPIECE, *_SETTINGS_FILES):
            if (path / name).is_file():
                shutil.copyfile(path / name, Path(tmp) / name)
        tokenizer = TokenizersBackend.from_pretrained(tmp, **kwargs)
    tokenizer.name_or_path = str(path)
    if not kwargs["legacy"]:
        _prefix_whole_text(tokenizer.backend_tokenizer)
    return tokenizer


# What transformers' SentencePiece conversion pre-tokenizes with for legacy false (and a model without
# user-defined pieces): the dummy prefix on the first piece unless it starts with a space.
_FIRST_PIECE_PREFIX = {"type": "Sequence", "pretokenizers": [
    {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}]}


def _prefix_whole_text(backend) -> None:
    """Give the first piece its ``▁`` also where it starts with a space, as the slow tokenizer does (the
    module docstring); any other pre-tokenizer is left as it is."""
    from tokenizers import pre_tokenizers

    if json.loads(backend.to_str()).get("pre_tokenizer") != _FIRST_PIECE_PREFIX:
        return
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=" ", prepend_scheme="first", split=False),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False),
    ])


def load_processor(path: str | Path):
    """The processor of an HF-format directory (``AutoProcessor``), its tokenizer from ``load_tokenizer``."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path), tokenizer=load_tokenizer(path))
