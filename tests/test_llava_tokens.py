"""Token-exact with the released run: a Llama/Vicuna SentencePiece tokenizer, loaded as transformers 5
loads it, gives through this package the ids and labels that LLaVA's ``tokenizer_image_token`` +
``preprocess_v1`` give with the slow ``LlamaTokenizer`` of transformers 4.3x (``use_fast=False``).

Both sides of the comparison are written here from scratch over the ``sentencepiece`` library: the
slow tokenizer's behaviour for ``legacy`` true and false, and LLaVA's algorithm (the conversation as
one string, split at ``<image>``, pieces tokenized alone, labels masked by round lengths). The
SentencePiece model is trained locally in Llama's configuration (BPE, byte fallback, dummy prefix,
no whitespace normalisation, split digits). Vicuna's vocabulary holds ``USER`` as a piece but not
``▁USER`` (so a later round's ``USER`` costs one piece less after ``</s>`` than alone, which is what
LLaVA's non-legacy shift assumes); the locally trained model is given the same property by editing
its pieces (``USER`` and its parts added as ordinary pieces, pieces starting ``▁U`` removed).
"""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import sentencepiece as spm
from PIL import Image
from sentencepiece import sentencepiece_model_pb2

from llava.conversation import is_legacy, keep_legacy_on_save
from llava.data import negatives, show
from llava.model.tiny import tokenizer_corpus
from tests.conftest import SEED_DATA

SEED = SEED_DATA
SPIECE = "\u2581"
SPECIAL = ("<unk>", "<s>", "</s>")
IMAGE = -200
IGNORE = -100

VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.")
LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the human's questions.")


# ---------------------------------------------------------------------------------------------
# The slow transformers 4.3x LlamaTokenizer, over sentencepiece


class SlowLlamaTokenizer:
    """``LlamaTokenizer(use_fast=False)`` of transformers 4.3x: BOS, special tokens split out, and

    * ``legacy=True``: every piece of text between special tokens encoded with the dummy prefix;
    * ``legacy=False``: the model loaded without the dummy prefix; ``"▁"`` written before the whole
      text only; a piece that starts with a space encoded after ``<unk>`` (then dropped) so that its
      leading space stays a word boundary; a lone leading ``"▁"`` before a special token dropped.
    """

    def __init__(self, model_file: Path, legacy: bool):
        self.legacy = legacy
        self.with_prefix = spm.SentencePieceProcessor(model_file=str(model_file))
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_file.read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False
        self.without_prefix = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.unk_length = len(self.without_prefix.encode("<unk>", out_type=str))

    def tokenize(self, text: str) -> list[str]:
        if not self.legacy and text:
            text = SPIECE + text.replace(SPIECE, " ")
        tokens: list[str] = []
        for part in (p for p in re.split("(<unk>|<s>|</s>)", text) if p):
            if part in SPECIAL:
                tokens.append(part)
            elif self.legacy:
                tokens += self.with_prefix.encode(part, out_type=str)
            elif not part.startswith((SPIECE, " ")):
                tokens += self.without_prefix.encode(part, out_type=str)
            else:
                tokens += self.without_prefix.encode("<unk>" + part, out_type=str)[self.unk_length:]
        if not self.legacy and len(tokens) > 1 and tokens[0] == SPIECE and tokens[1] in SPECIAL:
            tokens = tokens[1:]
        return tokens

    def __call__(self, text: str) -> list[int]:
        return [self.with_prefix.piece_to_id("<s>")] + [self.with_prefix.piece_to_id(t) for t in self.tokenize(text)]


# ---------------------------------------------------------------------------------------------
# LLaVA's algorithm


def llava_tokenizer_image_token(tok: SlowLlamaTokenizer, prompt: str) -> list[int]:
    chunks = [tok(c) for c in prompt.split("<image>")]
    ids = [chunks[0][0]]  # the BOS, once
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE)
        ids += chunk[1:]
    return ids


def llava_v1_prompt(system: str, messages: list[str | None]) -> str:
    """``conv_vicuna_v1`` / ``conv_llava_v1``: ``sep=" "``, ``sep2="</s>"``, roles USER / ASSISTANT."""
    text = system + " "
    for i, message in enumerate(messages):
        role = ("USER", "ASSISTANT")[i % 2]
        text += f"{role}: {message}{(' ', '</s>')[i % 2]}" if message else f"{role}:"
    return text


def llava_preprocess_v1(tok: SlowLlamaTokenizer, conversation: str) -> tuple[list[int], list[int]]:
    ids = llava_tokenizer_image_token(tok, conversation)
    labels = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    labels[:1] = [IGNORE]
    for i, rou in enumerate(conversation.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = len(llava_tokenizer_image_token(tok, rou))
        instruction_len = len(llava_tokenizer_image_token(tok, parts[0] + sep)) - 2
        if i != 0 and not tok.legacy:
            round_len -= 1
            instruction_len -= 1
        labels[cur:cur + instruction_len] = [IGNORE] * len(labels[cur:cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE] * len(labels[cur:])
    assert cur == len(ids), "tokenization mismatch: the reference itself would train on nothing"
    return ids, labels


def first_difference(ref: SlowLlamaTokenizer, got: tuple[list[int], list[int]], want: tuple[list[int], list[int]]) -> str:
    """Where two (ids, labels) pairs part, with the pieces around it: the assertion message."""
    piece = lambda t: "<image>" if t == IMAGE else ref.with_prefix.id_to_piece(t)  # noqa: E731
    for what, a, b in (("input_ids", got[0], want[0]), ("labels", got[1], want[1])):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if a != b:
            show = lambda seq: [piece(t) if t != IGNORE else "-100" for t in seq[max(k - 4, 0):k + 4]]  # noqa: E731
            return f"{what} differ at {k} (lengths {len(a)} vs {len(b)}): got {show(a)}, LLaVA {show(b)}"
    return "equal"


def multimodal(value: str) -> str:
    """LLaVA's ``preprocess_multimodal`` on a message that holds the image."""
    return "<image>\n" + value.replace("<image>", "").strip()


# ---------------------------------------------------------------------------------------------
# Fixtures: the SentencePiece model and a model directory that loads it as transformers 5 does


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        input=str(tokenizer_corpus()), model_prefix=str(out / "llama"), model_type="bpe", vocab_size=1500,
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((out / "llama.model").read_bytes())
    pieces = [p for p in proto.pieces if not p.piece.startswith(SPIECE + "U")]
    known, lowest = {p.piece for p in pieces}, min(p.score for p in pieces)
    for k, piece in enumerate(x for x in ("U", "S", "E", "R", "US", "SE", "ER", "USE", "SER", "USER") if x not in known):
        pieces.append(sentencepiece_model_pb2.ModelProto.SentencePiece(piece=piece, score=lowest - 1 - k))
    del proto.pieces[:]
    proto.pieces.extend(pieces)
    (out / "llama.model").write_bytes(proto.SerializeToString())
    return out / "llama.model"


@pytest.fixture(scope="module", params=[False, True], ids=["legacy_false", "legacy_true"])
def vicuna_like(request, sentencepiece_model, tiny_llava_dir, tmp_path_factory):
    """``(model_dir, slow_reference)``: a processor whose tokenizer is the SentencePiece model, loaded from
    ``tokenizer.model`` + ``tokenizer_config.json`` as a Vicuna checkpoint is, ``<image>`` added as llava-hf adds it."""
    from transformers import AutoProcessor, AutoTokenizer

    legacy = request.param
    spdir = tmp_path_factory.mktemp(f"vicuna_tok_{legacy}")
    (spdir / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    (spdir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": legacy,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
        "clean_up_tokenization_spaces": False, "model_max_length": 2048, "padding_side": "right"}))
    tok = AutoTokenizer.from_pretrained(spdir)
    assert tok.legacy is legacy
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    keep_legacy_on_save(tok)  # as this package's loaders do, so that the saved directory keeps the setting
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    processor.tokenizer = tok
    model_dir = tmp_path_factory.mktemp(f"vicuna_like_{legacy}")
    processor.save_pretrained(model_dir)
    (model_dir / "config.json").write_bytes((tiny_llava_dir / "config.json").read_bytes())  # an HF-format model directory
    assert is_legacy(AutoProcessor.from_pretrained(model_dir).tokenizer) is legacy
    return model_dir, SlowLlamaTokenizer(sentencepiece_model, legacy)


def run_show(*argv) -> list[dict]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert show.main([*map(str, argv), "--json", "--all"]) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def read_array(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]


def preference_texts(row: dict) -> dict:
    return json.loads(row["text"]) if isinstance(row.get("text"), str) else row


needs_seed = pytest.mark.skipif(not SEED.is_dir(), reason=f"the published samples are not at {SEED}")


# ---------------------------------------------------------------------------------------------
# The tests


def test_the_reference_shows_what_the_legacy_setting_changes(sentencepiece_model):
    """The reference itself: the first piece after ``</s>`` is a word boundary only for legacy."""
    legacy, modern = SlowLlamaTokenizer(sentencepiece_model, True), SlowLlamaTokenizer(sentencepiece_model, False)
    after = lambda tok: tok.tokenize("answer</s>USER: next")[tok.tokenize("answer</s>USER: next").index("</s>") + 1:]  # noqa: E731
    assert after(legacy)[:3] == [SPIECE, "USER", ":"]
    assert after(modern)[:2] == ["USER", ":"]
    for tok in (legacy, modern):  # text after the image starts with the word-boundary piece (29871 in Vicuna)
        assert tok.tokenize("\nGiven")[:2] == [SPIECE, "<0x0A>"]


@needs_seed
@pytest.mark.parametrize("dataset", ["twitter", "pinterest"])
def test_preference_conditions_and_sft_equal_llavas(vicuna_like, dataset):
    model_dir, ref = vicuna_like
    path, images = SEED / dataset / f"{dataset}_train.json", SEED / dataset / "image" / f"{dataset}_train"
    rows = [preference_texts(r) for r in read_array(path)]
    shown = run_show(path, "--model", model_dir, "--image_folder", images, "--task", "preference")
    sft = run_show(path, "--model", model_dir, "--image_folder", images, "--task", "sft")
    assert len(shown) == len(sft) == len(rows) == 10
    for i, (row, got, got_sft) in enumerate(zip(rows, shown, sft)):
        swapped = rows[negatives.swapped_context_index(i, len(rows), 42)]["question"]
        for name, seq in got.items():
            question = row["question"] if name.startswith("cw") else swapped
            answer = row["chosen"] if name.endswith("yw") else row["rejected"]
            want = llava_preprocess_v1(ref, llava_v1_prompt(VICUNA_V1, [multimodal(question), answer]))
            got_pair = (seq["input_ids"], seq["labels"])
            assert got_pair == want, f"{dataset} record {i} {name}: {first_difference(ref, got_pair, want)}"
        want = llava_preprocess_v1(ref, llava_v1_prompt(VICUNA_V1, [multimodal(row["question"]), row["chosen"]]))
        got_pair = (got_sft["sft"]["input_ids"], got_sft["sft"]["labels"])
        assert got_pair == want, f"{dataset} record {i} sft: {first_difference(ref, got_pair, want)}"
        assert len(got) == 8


@needs_seed
@pytest.mark.parametrize("dataset", ["twitter", "pinterest"])
def test_inference_prompts_equal_the_released_scripts(vicuna_like, dataset):
    """``mcmdpo_inference.py``: ``llava_v1``, ``<image>\\n{question}\\n``, the question as it is."""
    model_dir, ref = vicuna_like
    path = SEED / dataset / f"{dataset}_test.json"
    rows = read_array(path)
    shown = run_show(path, "--model", model_dir, "--task", "test")
    assert len(shown) == len(rows) == 10
    for i, (row, got) in enumerate(zip(rows, shown)):
        prompt = llava_v1_prompt(LLAVA_V1, ["<image>\n" + row["question"] + "\n", None])
        want = llava_tokenizer_image_token(ref, prompt)
        ids = got["prompt"]["input_ids"]
        assert ids == want, f"{dataset} record {i}: {first_difference(ref, (ids, []), (want, []))}"


def test_a_three_turn_conversation_equals_llavas(vicuna_like, tmp_path):
    model_dir, ref = vicuna_like
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    turns = [("What is in this picture?\n<image>", "A red rectangle."), ("What colour is it?", "Red, nearly pure."),
             ("Describe it for a screen reader.", "A plain red rectangle, wider than it is tall.")]
    conversation = [{"from": f, "value": v} for human, gpt in turns for f, v in (("human", human), ("gpt", gpt))]
    data = tmp_path / "conversations.json"
    data.write_text(json.dumps([{"id": "a", "image": "red.png", "conversations": conversation}]))
    (got,) = run_show(data, "--model", model_dir, "--image_folder", tmp_path, "--task", "sft")
    messages = [multimodal(turns[0][0]), turns[0][1], turns[1][0], turns[1][1], turns[2][0], turns[2][1]]
    ids, labels = llava_preprocess_v1(ref, llava_v1_prompt(VICUNA_V1, messages))
    got_pair = (got["sft"]["input_ids"], got["sft"]["labels"])
    assert got_pair == (ids, labels), first_difference(ref, got_pair, (ids, labels))
    assert sum(1 for a, b in zip(labels, labels[1:]) if a == IGNORE and b != IGNORE) == 3  # three answers trained


def test_a_legacy_tokenizer_stays_legacy_through_load_and_save(vicuna_like, tiny_llava_dir, tmp_path):
    """transformers 5 saves ``"legacy": null`` and reloads as non-legacy; the package's loaders keep it."""
    import shutil

    from transformers import AutoProcessor

    from llava.model.load import load_model, save_model

    model_dir, ref = vicuna_like
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_llava_dir, checkpoint)
    for f in model_dir.iterdir():  # the Vicuna-like processor over the tiny model's weights
        shutil.copy(f, checkpoint / f.name)
    model, processor = load_model(checkpoint)  # beside a LLaVA config.json transformers picks its generic class
    assert is_legacy(processor.tokenizer) is ref.legacy
    save_model(model, processor, tmp_path / "saved")
    for reloaded in (AutoProcessor.from_pretrained(tmp_path / "saved").tokenizer, load_model(tmp_path / "saved")[1].tokenizer):
        assert is_legacy(reloaded) is ref.legacy
        text = "An answer.</s>USER: next ASSISTANT:"
        assert reloaded(text).input_ids == processor.tokenizer(text).input_ids == ref(text)
