"""Loading, composing and saving: HF directories, LoRA adapters, a new LLaVA from CLIP + a causal LM."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, CLIPVisionModel, LlamaForCausalLM

from llava.model.load import ModelLoadError, checkpoint_kind, compose, load_model, save_model
from llava.model.tiny import build


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A CLIP vision directory and a causal LM directory (with tokenizer), as LLaVA's pre-training starts from."""
    d = tmp_path_factory.mktemp("parts")
    model, processor = build("llava", seed=4)
    tower = CLIPVisionModel(model.config.vision_config)
    tower.save_pretrained(d / "clip")
    processor.image_processor.save_pretrained(d / "clip")
    lm = LlamaForCausalLM(model.config.text_config)
    lm.save_pretrained(d / "lm")
    processor.tokenizer.save_pretrained(d / "lm")
    return d, tower, lm


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear"])
@pytest.mark.parametrize("next_arch", [False, True])
def test_compose_save_load(parts, projector, next_arch, tmp_path):
    d, tower, lm = parts
    model, processor = compose(d / "lm", d / "clip", projector_type=projector, select_layer=-2, next_arch=next_arch)
    out = save_model(model, processor, tmp_path / "composed")
    assert checkpoint_kind(out) == "hf"
    loaded = AutoModelForImageTextToText.from_pretrained(out)
    assert type(loaded).__name__ == ("LlavaNextForConditionalGeneration" if next_arch else "LlavaForConditionalGeneration")
    assert loaded.config.vision_feature_layer == -2
    state = loaded.state_dict()
    for k, v in lm.model.state_dict().items():
        assert torch.equal(state[f"model.language_model.{k}"], v), k
    for k, v in tower.state_dict().items():
        assert torch.equal(state[f"model.vision_tower.{k}"], v), k
    if projector == "linear":
        assert loaded.config.projector_hidden_act == "linear"
        assert torch.equal(state["model.multi_modal_projector.linear_2.weight"], torch.eye(lm.config.hidden_size))
        x = torch.randn(3, tower.config.hidden_size)
        proj = loaded.model.multi_modal_projector
        torch.testing.assert_close(proj(x), proj.linear_1(x))


def test_compose_errors(parts):
    d, _, _ = parts
    with pytest.raises(ModelLoadError, match="not a local CLIP model directory"):
        compose(d / "lm", d / "lm")
    with pytest.raises(ModelLoadError, match="mm_projector_type must be one of"):
        compose(d / "lm", d / "clip", projector_type="mlp3x_gelu")
    with pytest.raises(ModelLoadError, match="plain language model"):
        load_model(d / "lm")


def test_missing_and_non_model_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="model path not found"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_lora_adapter_with_model_base(tiny_llava_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, processor = load_model(tiny_llava_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 23, 42]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    with pytest.raises(ModelLoadError, match="--model_base"):
        load_model(tmp_path / "adapter", model_base=tmp_path / "missing")
    for merge in (False, True):
        loaded, _ = load_model(tmp_path / "adapter", model_base=tiny_llava_dir, merge_lora=merge)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert hasattr(loaded, "peft_config") != merge
