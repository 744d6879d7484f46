"""Templates and label masking: only the answers and their closing end token are trained on."""

import pytest

from llava.constants import IGNORE_INDEX
from llava.conversation import (LabelMaskError, conv_templates, encode_answer, encode_conversation, encode_prompt,
                                get_template, image_question)
from llava.model.tiny import build_tokenizer

VICUNA = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def unmasked(ids, labels):
    return [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]


@pytest.mark.parametrize("answer", ["A red circle on the left.", "Chart of votes: three bars, the tallest is green.", "x"])
def test_labels_decode_to_exactly_the_answer_and_eos(tok, answer):
    ids, labels = encode_conversation(tok, get_template("v1"), [(image_question("What is shown?"), answer)])
    assert len(ids) == len(labels)
    assert tok.decode(unmasked(ids, labels)) == answer + "</s>"
    assert unmasked(ids, labels)[-1] == tok.eos_token_id
    # the masked part is exactly the prompt inference builds
    prompt = encode_prompt(tok, get_template("v1"), image_question("What is shown?"))
    assert ids[: len(prompt)] == prompt and all(l == IGNORE_INDEX for l in labels[: len(prompt)])


def test_multi_turn_trains_on_every_answer(tok):
    turns = [(image_question("First?"), "One."), ("Second?", "Two.")]
    ids, labels = encode_conversation(tok, get_template("v1"), turns)
    runs, run = [], []
    for t, l in zip(ids, labels):  # contiguous trained spans
        if l != IGNORE_INDEX:
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    runs.append(run)
    assert [tok.decode(r) for r in runs] == ["One.</s>", "Two.</s>"]
    assert tok.decode(ids, skip_special_tokens=False).count("USER:") == 2


def test_vicuna_v1_text_is_methods(tok):
    template = get_template("v1")
    text = template.human_text(image_question("Describe."), first=True) + template.answer_text("A cat.") + "</s>"
    assert text == f"{VICUNA} USER: <image>\nDescribe. ASSISTANT: A cat.</s>"
    conv = conv_templates["v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nDescribe.")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == f"{VICUNA} USER: <image>\nDescribe. ASSISTANT:"


@pytest.mark.parametrize("name", ["v1", "plain", "llava_llama_2", "mistral_instruct", "vicuna_v1", "llama_2"])
def test_every_template_masks_all_but_the_answer(tok, name):
    template = get_template(name)
    ids, labels = encode_conversation(tok, template, [(image_question("Q?"), "The answer.")])
    kept = tok.decode(unmasked(ids, labels))
    assert kept.startswith("The answer.") and "Q?" not in kept and "ASSISTANT" not in kept


def test_an_empty_answer_is_an_error_naming_the_record(tok):
    with pytest.raises(LabelMaskError, match="data.json, record 4: every label is masked"):
        encode_conversation(tok, get_template("v1"), [(image_question("Q?"), "  ")], record="data.json, record 4")


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown conversation template 'v9'"):
        get_template("v9")


def test_answer_ids_end_with_eos(tok):
    assert encode_answer(tok, get_template("v1"), "Hi.")[-1] == tok.eos_token_id
    assert tok.eos_token_id not in encode_answer(tok, get_template("plain"), "Hi.")
