"""Templates and label masking: only the answers and their closing end token are trained on."""

import pytest

from llava.constants import IGNORE_INDEX
from llava.conversation import (LabelMaskError, conv_templates, encode_conversation, encode_prompt, get_template,
                                image_question)
from llava.model.tiny import build_tokenizer

# LLaVA's conv_vicuna_v1 (training, --version v1) says "user"; conv_llava_v1 (released inference) says "human".
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
LLAVA_V1 = VICUNA.replace("user", "human")


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


@pytest.mark.parametrize("name, system", [("v1", VICUNA), ("vicuna_v1", VICUNA), ("llava_v1", LLAVA_V1)])
def test_vicuna_style_text_is_llavas(tok, name, system):
    template = get_template(name)
    text = template.render([(image_question("Describe."), "A cat."), ("More?", "No.")])
    assert text == f"{system} USER: <image>\nDescribe. ASSISTANT: A cat.</s>USER: More? ASSISTANT: No.</s>"
    conv = conv_templates[name].copy()
    conv.append_message(conv.roles[0], "<image>\nDescribe.")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == f"{system} USER: <image>\nDescribe. ASSISTANT:"
    assert (conv.sep, conv.sep2, conv.version) == (" ", "</s>", "v1")


def test_plain_and_llama_2_text_is_llavas():
    assert get_template("plain").render([("<image>\nignored", "A cat.")]) == "<image>A cat.\n"
    text = get_template("llava_llama_2").render([("<image>\nQ?", "A."), ("R?", "B.")])
    system = get_template("llava_llama_2").system
    assert text == f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n<image>\nQ? [/INST] A. </s><s>[INST] R? [/INST] B. </s>"
    assert get_template("mistral_instruct").render([("Q?", "A."), ("R?", None)]) == "[INST] Q? [/INST] A. </s>[INST] R? [/INST]"


@pytest.mark.parametrize("name", ["v1", "plain", "llava_llama_2", "mistral_instruct", "vicuna_v1", "llava_v1"])
def test_every_template_masks_all_but_the_answer(tok, name):
    template = get_template(name)
    ids, labels = encode_conversation(tok, template, [(image_question("Q?"), "The answer.")])
    kept = tok.decode(unmasked(ids, labels))
    assert kept.startswith("The answer.") and "Q?" not in kept and "ASSISTANT" not in kept


def test_an_empty_answer_is_an_error_naming_the_record(tok):
    with pytest.raises(LabelMaskError, match="data.json, record 4: every label is masked"):
        encode_conversation(tok, get_template("v1"), [(image_question("Q?"), "  ")], record="data.json, record 4")


@pytest.mark.parametrize("name", ["v9", "llama_2"])  # LLaVA's llama_2 (another system prompt) is not offered
def test_unknown_template(name):
    with pytest.raises(ValueError, match=f"unknown conversation template '{name}'"):
        get_template(name)


def test_plain_trains_on_the_caption_and_newline_without_eos(tok):
    ids, labels = encode_conversation(tok, get_template("plain"), [(image_question("Q?"), "Hi.")])
    kept = unmasked(ids, labels)
    assert tok.eos_token_id not in kept and tok.decode(kept) == "Hi.\n"
    assert labels[:2] == [IGNORE_INDEX, IGNORE_INDEX] and ids[0] == tok.bos_token_id  # BOS and the image
