"""The embedded tiny checkpoints: plain transformers loads them and generates, with no project import."""

import subprocess
import sys

import pytest
import torch

from llava.model.tiny import build, build_tokenizer

PLAIN = r"""
import sys
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor
path = sys.argv[1]
processor = AutoProcessor.from_pretrained(path)
model = AutoModelForImageTextToText.from_pretrained(path)
image = Image.new("RGB", (90, 60), "white")
ImageDraw.Draw(image).ellipse([10, 10, 50, 50], fill="red")
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
new = out[0, inputs["input_ids"].shape[1]:]
assert len(new) > 0
with torch.no_grad():  # greedy decoding's first token is the plain forward's most likely next token
    assert new[0] == model(**inputs).logits[0, -1].argmax()
assert not any(m == "llava" or m.startswith("llava.") for m in sys.modules), "the project was imported"
print(type(model).__name__, type(processor).__name__, prompt.count("<image>"), repr(processor.decode(new)))
"""


@pytest.mark.parametrize("fixture,cls", [("tiny_llava_dir", "LlavaForConditionalGeneration LlavaProcessor"),
                                         ("tiny_next_dir", "LlavaNextForConditionalGeneration LlavaNextProcessor")])
def test_plain_transformers_loads_and_generates(fixture, cls, request, tmp_path):
    path = request.getfixturevalue(fixture)
    # -I: isolated mode, the repository is not on sys.path (the package is installed, but never imported)
    result = subprocess.run([sys.executable, "-I", "-c", PLAIN, str(path)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(cls + " 1 ")


def test_vicuna_prompt_of_the_chat_template(tiny_llava_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A."}]}]
    text = processor.apply_chat_template(messages)
    assert text == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                    "detailed, and polite answers to the user's questions. USER: <image>\nQ? ASSISTANT: A.</s>")


def test_tokenizer_has_the_vicuna_special_tokens():
    tok = build_tokenizer()
    for token in ("<s>", "</s>", "<unk>", "<image>", "<pad>"):
        assert token in tok.get_vocab()
    ids = tok("USER: <image>\nHi").input_ids
    assert ids[0] == tok.bos_token_id and tok.convert_tokens_to_ids("<image>") in ids
    assert tok.pad_token_id not in (tok.eos_token_id, tok.unk_token_id, tok.bos_token_id)
    assert tok.decode(tok("A red cat.", add_special_tokens=False).input_ids) == "A red cat."


def test_weights_are_seeded():
    a, _ = build("llava", seed=1)
    b, _ = build("llava", seed=1)
    c, _ = build("llava", seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_cli_writes_a_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llava.model.tiny", "--out", str(tmp_path / "m"), "--arch", "llava_next",
                             "--seed", "3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja"} <= names
