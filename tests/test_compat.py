"""LLaVA-compatible names (llava.model.builder, llava.mm_utils): a script written for haotian-liu/LLaVA runs
unchanged on this package's models and writes what the package's own inference path writes."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image, ImageDraw

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates, encode_prompt, get_template, image_question
from llava.data.images import ImageProcessor
from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
from llava.model.forward import embed

QUESTION = "Given an image and context, generate alt-text for the image.Context:\nOur new logo!"
# LLaVA's conv_vicuna_v1 ("v1"), the wording of training.
VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions. USER: <image>\n{question} ASSISTANT:")

pytestmark = pytest.mark.filterwarnings("ignore:load_pretrained_model. CUDA is not available")


def picture(size=(80, 50), colour=(200, 30, 40)) -> Image.Image:
    img = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(img)
    draw.ellipse((10, 8, 45, 40), fill=(10, 200, 30))
    draw.rectangle((50, 15, 75, 45), fill=(20, 40, 220))
    return img


def llava_script(model_path, image, question, model_base=None):
    """The body of a researcher's script for haotian-liu/LLaVA, as written there."""
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, context_len = load_pretrained_model(model_path, model_base, get_model_name_from_path(model_path))
    conv = conv_templates["v1"].copy(); conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + question); conv.append_message(conv.roles[1], None)  # noqa: E702
    input_ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    image_tensor = process_images([image], image_processor, model.config)
    output_ids = model.generate(input_ids, images=image_tensor, image_sizes=[image.size], do_sample=False, num_beams=3, max_new_tokens=64, use_cache=True)
    text = tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()
    return dict(text=text, output_ids=output_ids, tokenizer=tokenizer, model=model, image_processor=image_processor,
                context_len=context_len, input_ids=input_ids, image_tensor=image_tensor)


def own_path(hf_model, processor, image, question, aspect_ratio="pad", **gen):
    """This package's inference: encode_prompt, <image> expanded to num_tokens copies, embed, generate."""
    tok = processor.tokenizer
    processed = ImageProcessor(processor, aspect_ratio)(image)
    ids = encode_prompt(tok, get_template("v1"), image_question(question))
    image_id = hf_model.config.image_token_id
    k = ids.index(image_id)
    ids = ids[:k] + [image_id] * processed.num_tokens + ids[k + 1:]
    input_ids = torch.tensor([ids])
    sizes = torch.tensor([processed.image_size]) if aspect_ratio == "anyres" else None
    with torch.no_grad():
        embeds = embed(hf_model, input_ids, processed.pixel_values[None], sizes)
        out = hf_model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), **gen)
    return out, tok.batch_decode(out, skip_special_tokens=True)[0].strip()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: on a shared 2-core machine extra threads only wait on each other (10x slower beams)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ran(one_thread, tiny_llava_dir, tiny_next_dir):
    """The script run once on each tiny model (the loads dominate these tests' time)."""
    from transformers import AutoProcessor

    out = {}
    for arch, path in (("llava", tiny_llava_dir), ("next", tiny_next_dir)):
        run = llava_script(str(path), picture(), QUESTION)
        run["processor"] = AutoProcessor.from_pretrained(path)
        out[arch] = run
    return out


# ---------------------------------------------------------------------------------------------
# Names and prompt


def test_v1_prompt_is_the_vicuna_v1_string_of_method_md():
    conv = conv_templates["v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + QUESTION)
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == VICUNA_V1.format(question=QUESTION)
    assert conv_templates["v1"].messages == []  # copy() left the template untouched


@pytest.mark.parametrize("path, name", [
    ("/ckpts/llava-v1.5-7b", "llava-v1.5-7b"),
    ("/ckpts/llava-v1.5-7b/", "llava-v1.5-7b"),
    ("liuhaotian/llava-v1.6-vicuna-7b", "llava-v1.6-vicuna-7b"),
    ("/runs/mcmdpo-lora/checkpoint-500", "mcmdpo-lora_checkpoint-500"),
    ("/runs/mcmdpo-lora/checkpoint-500/", "mcmdpo-lora_checkpoint-500"),
    ("model", "model"),
])
def test_get_model_name_from_path(path, name):
    assert get_model_name_from_path(path) == name


def test_tokenizer_image_token_on_a_known_prompt(tiny_llava_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llava_dir)
    prompt = VICUNA_V1.format(question="What is it?")
    ids = tokenizer_image_token(prompt, tok, IMAGE_TOKEN_INDEX)
    expected = [IMAGE_TOKEN_INDEX if t == tok.convert_tokens_to_ids("<image>") else t
                for t in encode_prompt(tok, get_template("v1"), image_question("What is it?"))]
    assert ids == expected  # the ids training and the package's inference use
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert tok.decode([t for t in ids if t != IMAGE_TOKEN_INDEX], skip_special_tokens=True).startswith("A chat")
    tensor = tokenizer_image_token(prompt, tok, IMAGE_TOKEN_INDEX, return_tensors="pt")
    assert tensor.dtype == torch.long and tensor.tolist() == ids
    two = tokenizer_image_token("USER: <image>\n<image>\nSame? ASSISTANT:", tok)
    assert two.count(IMAGE_TOKEN_INDEX) == 2 and two.count(tok.bos_token_id) == 1
    with pytest.raises(ValueError, match="Unsupported tensor type"):
        tokenizer_image_token(prompt, tok, return_tensors="tf")


class CharTokenizer:
    """A tokenizer without an <image> token: one id per character, BOS = 1 (as LLaVA's original tokenizer)."""

    bos_token_id, unk_token_id = 1, 0

    def convert_tokens_to_ids(self, token):
        return self.unk_token_id

    def __call__(self, text):
        class Out:
            input_ids = [1] + [ord(c) + 10 for c in text]
        return Out()


def test_tokenizer_image_token_piecewise_for_a_tokenizer_without_image_token():
    ids = tokenizer_image_token("ab<image>c<image>", CharTokenizer(), IMAGE_TOKEN_INDEX)
    assert ids == [1, ord("a") + 10, ord("b") + 10, IMAGE_TOKEN_INDEX, ord("c") + 10, IMAGE_TOKEN_INDEX]


# ---------------------------------------------------------------------------------------------
# The script, end to end


@pytest.mark.parametrize("arch", ["llava", "next"])
def test_llava_script_writes_what_the_own_path_writes(ran, arch):
    run = ran[arch]
    model = run["model"]
    assert model.config.image_aspect_ratio == "pad"
    assert run["context_len"] == model.config.text_config.max_position_embeddings
    assert tuple(run["image_tensor"].shape) == (1, 3, 56, 56)
    # the script's beam search (num_beams=3) ...
    own_ids, own_text = own_path(model.hf_model, run["processor"], picture(), QUESTION,
                                 do_sample=False, num_beams=3, max_new_tokens=64, use_cache=True)
    assert run["output_ids"].shape[1] > 0 and run["text"]
    assert torch.equal(run["output_ids"], own_ids)  # new tokens only, as LLaVA's generate returns
    assert run["text"] == own_text
    # ... and greedy decoding
    out = model.generate(run["input_ids"], images=run["image_tensor"], image_sizes=[picture().size],
                         do_sample=False, num_beams=1, max_new_tokens=24)
    own_ids, own_text = own_path(model.hf_model, run["processor"], picture(), QUESTION,
                                 do_sample=False, num_beams=1, max_new_tokens=24)
    assert torch.equal(out, own_ids)
    assert run["tokenizer"].batch_decode(out, skip_special_tokens=True)[0].strip() == own_text


def test_anyres_tiles_match_the_own_path(ran):
    run = ran["next"]
    model, tok = run["model"], run["tokenizer"]
    image = picture((120, 50))
    model.config.image_aspect_ratio = "anyres"
    try:
        tiles = process_images([image], run["image_processor"], model.config)
        assert tiles.dim() == 5 and tiles.shape[0] == 1 and tiles.shape[1] > 1
        out = model.generate(run["input_ids"], images=tiles, image_sizes=[image.size], do_sample=False, max_new_tokens=16)
    finally:
        model.config.image_aspect_ratio = "pad"
    own_ids, _ = own_path(model.hf_model, run["processor"], image, QUESTION, "anyres", do_sample=False, max_new_tokens=16)
    assert torch.equal(out, own_ids)
    assert tok.batch_decode(out, skip_special_tokens=True)[0]


def test_several_rows_are_left_padded(ran):
    run = ran["llava"]
    model, tok = run["model"], run["tokenizer"]
    images = [picture(), picture((40, 70), (30, 160, 90))]
    prompts = []
    for q in (QUESTION, "Describe."):
        conv = conv_templates["v1"].copy()
        conv.append_message(conv.roles[0], "<image>\n" + q)
        conv.append_message(conv.roles[1], None)
        prompts.append(tokenizer_image_token(conv.get_prompt(), tok, IMAGE_TOKEN_INDEX, return_tensors="pt"))
    # right-padded ids with a mask, as a batching script builds them; padding is dropped, rows re-padded left
    longest = max(len(p) for p in prompts)
    ids = torch.full((2, longest), tok.pad_token_id)
    mask = torch.zeros(2, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = p, 1
    tensor = process_images(images, run["image_processor"], model.config)
    batched = model.generate(ids, images=tensor, attention_mask=mask, image_sizes=[im.size for im in images],
                             do_sample=False, max_new_tokens=12)
    for i, p in enumerate(prompts):
        alone = model.generate(p.unsqueeze(0), images=tensor[i:i + 1], do_sample=False, max_new_tokens=12)
        n = alone.shape[1]
        assert batched[i, :n].tolist() == alone[0].tolist()


def test_process_images_is_the_training_preprocessing(ran):
    run = ran["llava"]
    images = [picture(), picture((30, 90))]
    training = ImageProcessor(run["processor"], "pad")
    got = process_images(images, run["image_processor"], run["model"].config)
    assert torch.equal(got, torch.stack([training(im).pixel_values for im in images]))

    class Cfg:
        image_aspect_ratio = "square"
    square = process_images(images, run["image_processor"], Cfg())
    assert torch.equal(square, torch.stack([ImageProcessor(run["processor"], "square")(im).pixel_values for im in images]))
    assert not torch.equal(square, got)


def test_expand2square_and_keywords_stopping_criteria(ran):
    from llava.mm_utils import KeywordsStoppingCriteria, expand2square

    assert expand2square(picture((30, 10)), (1, 2, 3)).size == (30, 30)
    tok = ran["llava"]["tokenizer"]
    stop = KeywordsStoppingCriteria(["</s>"], tok, ran["llava"]["input_ids"])
    ids = tok("A red square.", add_special_tokens=False).input_ids
    done = stop(torch.tensor([ids + [tok.eos_token_id], ids + [ids[0]]]), None)
    assert done.tolist() == [True, False]


def test_wrapper_passes_attributes_through(ran):
    model = ran["llava"]["model"]
    hf = model.hf_model
    assert model.config is hf.config and model.device == hf.device and model.dtype == hf.dtype
    assert model.eval() is model and model.to("cpu") is model
    assert model.config.mm_use_im_start_end is False
    assert model.get_model() is hf.model
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())


def test_wrong_number_of_images_is_a_clear_error(ran):
    run = ran["llava"]
    two = torch.cat([run["image_tensor"], run["image_tensor"]])
    with pytest.raises(ValueError, match="1 image placeholders .* but 2 images"):
        run["model"].generate(run["input_ids"], images=two, max_new_tokens=2)


def test_load_pretrained_model_options(tiny_llava_dir):
    from llava.model.builder import load_pretrained_model

    with pytest.raises(NotImplementedError, match="8-bit / 4-bit"):
        load_pretrained_model(str(tiny_llava_dir), None, "tiny", load_8bit=True)
    with pytest.raises(NotImplementedError, match="8-bit / 4-bit"):
        load_pretrained_model(str(tiny_llava_dir), None, "tiny", load_4bit=True)
    with pytest.raises(TypeError, match="unsupported arguments"):
        load_pretrained_model(str(tiny_llava_dir), None, "tiny", device="cpu", not_an_option=1)
    # LLaVA's default device="cuda" on a machine without CUDA (simulated on a GPU machine): a warning, CPU, float32
    with pytest.MonkeyPatch.context() as m, warnings.catch_warnings(record=True) as caught:
        m.setattr(torch.cuda, "is_available", lambda: False)
        warnings.simplefilter("always")
        _, model, _, _ = load_pretrained_model(str(tiny_llava_dir), None, "tiny")
    assert any("CUDA is not available" in str(w.message) for w in caught)
    assert model.device.type == "cpu" and model.dtype == torch.float32


def test_original_format_checkpoint_keeps_its_aspect_ratio(tiny_llava_dir, tmp_path):
    """An original-layout checkpoint (liuhaotian style) loads through load_model's converter."""
    import json

    from llava.model.convert import hf_to_original
    from llava.model.load import load_model

    original = hf_to_original(tiny_llava_dir, tmp_path / "llava-v1.5-tiny")
    ratio = json.loads((original / "config.json").read_text())["image_aspect_ratio"]
    run = llava_script(str(original), picture(), QUESTION)
    assert run["model"].config.image_aspect_ratio == ratio
    _, processor = load_model(original)
    own_ids, own_text = own_path(run["model"].hf_model, processor, picture(), QUESTION, ratio,
                                 do_sample=False, num_beams=3, max_new_tokens=64, use_cache=True)
    assert torch.equal(run["output_ids"], own_ids) and run["text"] == own_text


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft asks a deprecated transformers property
def test_lora_adapter_on_model_base_is_merged(ran, tiny_llava_dir, tmp_path):
    """LLaVA's (lora_dir, model_base) call: the adapter is applied and merged, as load_model merges it."""
    from peft import LoraConfig, get_peft_model

    from llava.model.load import load_model

    base, processor = load_model(tiny_llava_dir)
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "llava-tiny-lora"
    lora.save_pretrained(adapter)
    run = llava_script(str(adapter), picture(), QUESTION, model_base=str(tiny_llava_dir))
    assert not hasattr(run["model"].hf_model, "peft_config")  # merged: a plain transformers model
    merged, _ = load_model(adapter, tiny_llava_dir, merge_lora=True)
    own_ids, own_text = own_path(merged, processor, picture(), QUESTION,
                                 do_sample=False, num_beams=3, max_new_tokens=64, use_cache=True)
    assert torch.equal(run["output_ids"], own_ids) and run["text"] == own_text
    assert not torch.equal(run["output_ids"], ran["llava"]["output_ids"])  # the adapter changed the model
