"""llava.model.convert: original LLaVA layout <-> transformers' LLaVA / LLaVA-NeXT classes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open

from llava.model import convert as C
from llava.model import original_layout as O

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"

# The config.json of the two releases (liuhaotian/llava-v1.5-7b, liuhaotian/llava-v1.6-vicuna-7b), mm part.
V15_CONFIG = {
    "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "image_aspect_ratio": "pad",
    "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "tune_mm_mlp_adapter": False, "use_mm_proj": True,
}
V16_CONFIG = {
    **V15_CONFIG, "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "tokenizer_padding_side": "right", "unfreeze_mm_vision_tower": True,
}


def picture(size=(90, 60)) -> Image.Image:
    img = Image.new("RGB", size, (200, 30, 40))
    draw = ImageDraw.Draw(img)
    draw.ellipse((10, 8, 50, 40), fill=(10, 200, 30))
    draw.rectangle((55, 20, 85, 55), fill=(20, 40, 220))
    return img


def logits(model, processor, image=None):
    inputs = processor(images=image or picture(), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits, inputs


def load_hf(path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    arch = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
    cls = LlavaNextForConditionalGeneration if arch == O.LLAVA_NEXT else LlavaForConditionalGeneration
    return cls.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def weight_keys(path) -> set[str]:
    keys = set()
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            keys |= set(fh.keys())
    return keys


def assert_same_outputs(ref, got):
    (l1, in1), (l2, in2) = ref, got
    for key in in1:
        assert torch.equal(in1[key], in2[key]), key
    assert l1.shape == l2.shape
    assert torch.equal(l1, l2), (l1 - l2).abs().max()


# ------------------------------------------------------------------------------------------------ mapping rules


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (V15_CONFIG, O.LLAVA),
        (V16_CONFIG, O.LLAVA_NEXT),
        ({**V16_CONFIG, "image_aspect_ratio": "pad"}, O.LLAVA),  # v1.6 used with one 336 view (MCM-DPO)
        ({"image_aspect_ratio": "square", "mm_patch_merge_type": "flat"}, O.LLAVA),
        ({}, O.LLAVA),  # the original code's defaults: square, flat
    ],
)
def test_target_architecture(cfg, expected):
    assert O.target_architecture(cfg) == expected


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "flat"}, "spatial_unpad"),
        ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial"}, "spatial_unpad"),
        ({"image_aspect_ratio": "anyres_max_9", "mm_patch_merge_type": "spatial_unpad"}, "anyres_max"),
        ({"image_aspect_ratio": "pad", "mm_patch_merge_type": "maxpool2x2"}, "mm_patch_merge_type"),
    ],
)
def test_target_architecture_rejects(cfg, match):
    with pytest.raises(ValueError, match=match):
        O.target_architecture(cfg)


# ------------------------------------------------------------------------------------------------ HF -> original -> HF


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_round_trip_is_exact(arch, tiny_llava_dir, tiny_next_dir, tmp_path):
    src = tiny_llava_dir if arch == "llava" else tiny_next_dir
    orig = C.hf_to_original(src, tmp_path / "orig")

    # The original layout.
    assert O.is_original_format(orig) and not O.is_original_format(src)
    cfg = json.loads((orig / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"] and "text_config" not in cfg
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["mm_vision_select_layer"] == -2
    assert cfg["mm_vision_select_feature"] == "patch" and cfg["mm_hidden_size"] == 32
    assert cfg["hidden_size"] == 64 and cfg["vocab_size"] == 2002 and cfg["unfreeze_mm_vision_tower"] is True
    keys = weight_keys(orig)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.up_proj.weight",
            "model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
            "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"} <= keys
    assert not any("multi_modal_projector" in k or "language_model" in k for k in keys)
    if arch == "llava_next":
        assert cfg["image_aspect_ratio"] == "anyres" and cfg["mm_patch_merge_type"] == "spatial_unpad"
        assert cfg["image_grid_pinpoints"] == [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
        assert "model.image_newline" in keys
    else:
        assert cfg["image_aspect_ratio"] == "square" and cfg["mm_patch_merge_type"] == "flat"
        assert "model.image_newline" not in keys
    assert (orig / "tokenizer.json").is_file() and (orig / "tokenizer_config.json").is_file()
    # A non-standard (tiny) tower is also written beside, so that mm_vision_tower names something loadable.
    assert Path(cfg["mm_vision_tower"]) == (orig / "vision_tower").resolve()

    # And back: identical inputs and logits.
    hf = O.original_to_hf(orig, tmp_path / "hf")
    assert_same_outputs(logits(*load_hf(src)), logits(*load_hf(hf)))


def test_round_trip_with_separate_vision_tower(tiny_next_dir, tmp_path):
    orig = C.hf_to_original(tiny_next_dir, tmp_path / "orig", include_vision_tower=False, max_shard_size="400KB")
    index = json.loads((orig / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded like the v1.6 release: read back through the index
    cfg = json.loads((orig / "config.json").read_text())
    side = orig / "vision_tower"
    assert Path(cfg["mm_vision_tower"]) == side.resolve() and cfg["unfreeze_mm_vision_tower"] is False
    assert not any(k.startswith("model.vision_tower.") for k in weight_keys(orig))
    assert json.loads((side / "config.json").read_text())["model_type"] == "clip_vision_model"
    assert all(k.startswith("vision_model.") for k in weight_keys(side))  # legacy layout, readable by any version
    assert json.loads((side / "preprocessor_config.json").read_text())["crop_size"] == {"height": 56, "width": 56}

    reference = logits(*load_hf(tiny_next_dir))
    assert_same_outputs(reference, logits(*O.load_original(orig)))
    # Moved elsewhere, the absolute mm_vision_tower breaks: the vision_tower/ folder inside is used.
    moved = shutil.move(str(orig), str(tmp_path / "moved"))
    assert_same_outputs(reference, logits(*O.load_original(moved)))


def test_cli_round_trip(tiny_llava_dir, tmp_path, capsys):
    # `python -m` reaches the parser (a conversion in a subprocess would spend ~10 s importing transformers) ...
    run = subprocess.run([sys.executable, "-m", "llava.model.convert", "to-hf", "--help"], capture_output=True,
                         text=True, cwd=Path(__file__).parent.parent)
    assert run.returncode == 0 and "--vision_tower" in run.stdout, run.stderr[-2000:]
    # ... and the same entry point converts both ways.
    C.main(["to-original", "--src", str(tiny_llava_dir), "--out", str(tmp_path / "orig"), "--separate_vision_tower"])
    assert O.is_original_format(tmp_path / "orig")
    C.main(["to-hf", "--src", str(tmp_path / "orig"), "--out", str(tmp_path / "hf"),
            "--vision_tower", str(tmp_path / "orig" / "vision_tower"), "--dtype", "float32"])
    assert "wrote" in capsys.readouterr().out
    assert_same_outputs(logits(*load_hf(tiny_llava_dir)), logits(*load_hf(tmp_path / "hf")))


def test_v16_checkpoint_used_with_pad_maps_to_llava(tiny_next_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    orig = C.hf_to_original(tiny_next_dir, tmp_path / "orig")
    model, processor = O.load_original(orig, image_aspect_ratio="pad")
    assert type(model) is LlavaForConditionalGeneration
    assert type(processor.image_processor).__name__ == "LlavaImageProcessorPil" and processor.image_processor.do_pad
    next_model, _ = load_hf(tiny_next_dir)
    ref = next_model.state_dict()
    got = model.state_dict()
    assert "model.image_newline" in ref and "model.image_newline" not in got
    assert all(torch.equal(got[k], ref[k]) for k in got)
    out, inputs = logits(model, processor)
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16  # one 56px view, 4x4 patches


# ------------------------------------------------------------------------------------------------ a release-like checkpoint


def _release_like(root: Path, projector: str = "mlp2x_gelu", feature: str = "patch") -> tuple[Path, Path]:
    """An original-format directory shaped like llava-v1.5-7b, in miniature.

    Sentencepiece tokenizer without <image> (pad = <unk>), fp16 weights in two .bin shards with an index and a
    stale rotary inv_freq buffer, `pad` aspect ratio, the CLIP tower outside the checkpoint in a local directory
    laid out like openai/clip-vit-large-patch14-336 (a full CLIPModel, integer size in its preprocessor config).
    """
    import sentencepiece as spm
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

    from llava.model.tiny import tokenizer_corpus

    ckpt, clip = root / "llava-v1.5-mini", root / "clip-mini"
    ckpt.mkdir(parents=True)
    torch.manual_seed(1)
    CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14),
        projection_dim=16,
    )).save_pretrained(clip)
    (clip / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 56, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 56,
    }))

    spm.SentencePieceTrainer.train(
        input=str(tokenizer_corpus()), model_prefix=str(ckpt / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    (ckpt / "tokenizer.vocab").unlink()
    (ckpt / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "legacy": False, "model_max_length": 2048,
        "padding_side": "right", "clean_up_tokenization_spaces": False,
    }))
    (ckpt / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))

    text = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, tie_word_embeddings=False)
    sd = dict(LlamaForCausalLM(LlamaConfig(**text)).state_dict())  # model.* / lm_head.*: the original names
    if projector == "linear":
        sd["model.mm_projector.weight"], sd["model.mm_projector.bias"] = torch.randn(64, 32) * 0.1, torch.randn(64) * 0.1
    else:
        sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"] = torch.randn(64, 32) * 0.1, torch.randn(64) * 0.1
        sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"] = torch.randn(64, 64) * 0.1, torch.randn(64) * 0.1
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    sd = {k: v.half() for k, v in sd.items()}
    names = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for fname, keys in shards.items():
        torch.save({k: sd[k] for k in keys}, ckpt / fname)
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (ckpt / "config.json").write_text(json.dumps({
        "_name_or_path": "./checkpoints/vicuna-mini", "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        **text, "hidden_act": "silu", "initializer_range": 0.02, "max_length": 4096, "pretraining_tp": 1,
        "rope_scaling": None, "torch_dtype": "float16", "transformers_version": "4.31.0", "use_cache": True,
        "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "mm_hidden_size": 32,
        "mm_projector_type": projector, "mm_resampler_type": None, "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": feature, "mm_vision_select_layer": -2,
        "mm_vision_tower": str(clip), "tune_mm_mlp_adapter": False, "use_mm_proj": True,
    }))
    return ckpt, clip


def _reference_logits(ckpt: Path, clip: Path, input_ids: torch.Tensor, image_token_id: int, image) -> tuple:
    """What the original LLaVA code computes: CLIP layer -2 patches -> projector -> spliced at a -200 placeholder."""
    from transformers import CLIPImageProcessorPil, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    cfg = json.loads((ckpt / "config.json").read_text())
    sd = {}
    for f in sorted(ckpt.glob("pytorch_model-*.bin")):
        sd.update({k: v.float() for k, v in torch.load(f, weights_only=True).items()})
    llama = LlamaForCausalLM(LlamaConfig(**{k: cfg[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")})).eval()
    llama.load_state_dict({k: v for k, v in sd.items() if k in llama.state_dict()}, strict=True)
    tower = CLIPVisionModel.from_pretrained(clip).eval()

    # expand2square with the mean colour, then the CLIP processor.
    mean = (0.48145466, 0.4578275, 0.40821073)
    side = max(image.size)
    square = Image.new(image.mode, (side, side), tuple(int(x * 255) for x in mean))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    pixels = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})(
        square, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = tower(pixels, output_hidden_states=True).hidden_states[-2]
        if cfg["mm_vision_select_feature"] == "patch":
            feats = feats[:, 1:]  # drop CLS; cls_patch keeps it
        if cfg["mm_projector_type"] == "linear":
            feats = F.linear(feats, sd["model.mm_projector.weight"], sd["model.mm_projector.bias"])
        else:
            feats = F.linear(feats, sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"])
            feats = F.linear(F.gelu(feats), sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"])
        # The original prompt has ONE placeholder; the HF prompt has one token per patch.
        ids = input_ids[0].tolist()
        first = ids.index(image_token_id)
        rest = [i for i in ids[first:] if i != image_token_id]
        embed = llama.model.embed_tokens
        embeds = torch.cat([embed(torch.tensor(ids[:first])), feats[0], embed(torch.tensor(rest))])[None]
        return llama(inputs_embeds=embeds).logits, pixels


@pytest.mark.parametrize("projector, feature", [("mlp2x_gelu", "patch"), ("linear", "cls_patch")])
def test_release_like_checkpoint_matches_original_semantics(projector, feature, tmp_path):
    from transformers import LlavaForConditionalGeneration

    ckpt, clip = _release_like(tmp_path, projector, feature)
    assert O.is_original_format(ckpt)
    model, processor = O.load_original(ckpt, dtype=torch.float32)
    assert type(model) is LlavaForConditionalGeneration
    assert type(processor.image_processor).__name__ == "LlavaImageProcessorPil" and processor.image_processor.do_pad
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == 400 and tok.pad_token == "<unk>" and len(tok) == 401
    assert model.config.image_token_id == 400 and model.config.text_config.pad_token_id == 0

    # One new row, the mean of the old ones; old rows untouched.
    old = torch.load(ckpt / "pytorch_model-00001-of-00002.bin", weights_only=True)
    old.update(torch.load(ckpt / "pytorch_model-00002-of-00002.bin", weights_only=True))
    for new, key in ((model.get_input_embeddings().weight, "model.embed_tokens.weight"),
                     (model.get_output_embeddings().weight, "lm_head.weight")):
        assert new.shape[0] == 401 and torch.equal(new[:400], old[key].float())
        assert torch.equal(new[400], old[key].float().mean(0).half().float())

    image = picture()
    got, inputs = logits(model, processor, image)
    ref, ref_pixels = _reference_logits(ckpt, clip, inputs["input_ids"], 400, image)
    assert torch.equal(inputs["pixel_values"], ref_pixels)
    assert (inputs["input_ids"] == 400).sum() == (16 if feature == "patch" else 17)
    assert got.shape[:2] == ref.shape[:2]
    torch.testing.assert_close(got[..., :400], ref, rtol=0, atol=1e-5)

    # Stored dtype by default; exporting again gives back the original projector type and weights.
    assert O.load_original(ckpt)[0].dtype == torch.float16
    out = C.hf_to_original((model, processor), tmp_path / "again", include_vision_tower=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mm_projector_type"] == projector and cfg["image_aspect_ratio"] == "pad"
    assert cfg["mm_vision_select_feature"] == feature
    names = ["model.mm_projector.weight"] if projector == "linear" else ["model.mm_projector.0.weight",
                                                                       "model.mm_projector.2.weight"]
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert set(names) <= set(fh.keys())
        for name in names:
            assert torch.equal(fh.get_tensor(name), old[name].float())
    again, again_processor = O.load_original(out)
    assert_same_outputs((got, inputs), logits(again, again_processor, image))


# ------------------------------------------------------------------------------------------------ clear errors


def _variant(ckpt: Path, dest: Path, **changes) -> Path:
    shutil.copytree(ckpt, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(changes)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_clear_errors(tmp_path, tiny_llava_dir):
    ckpt, clip = _release_like(tmp_path)

    # A hub id with no local copy: never downloaded, the message says what to pass.
    hub = _variant(ckpt, tmp_path / "hub", mm_vision_tower="no-such-org/clip-vit-mini-336")
    with pytest.raises(FileNotFoundError, match="vision_tower="):
        O.load_original(hub)
    model, _ = O.load_original(hub, vision_tower=clip)  # ... and the override fixes it
    assert model.config.vision_config.image_size == 56
    with pytest.raises(FileNotFoundError, match="not a local CLIP directory"):
        O.load_original(hub, vision_tower=tmp_path / "nowhere")

    for projector in ("mlp3x_gelu", "identity"):
        bad = _variant(ckpt, tmp_path / projector, mm_projector_type=projector)
        with pytest.raises(ValueError, match="unsupported mm_projector_type"):
            O.load_original(bad)
    with pytest.raises(ValueError, match="mm_use_im_start_end"):
        O.load_original(_variant(ckpt, tmp_path / "startend", mm_use_im_start_end=True))
    with pytest.raises(ValueError, match="spatial_unpad"):
        O.load_original(_variant(ckpt, tmp_path / "anyres", image_aspect_ratio="anyres"))
    mistral = _variant(ckpt, tmp_path / "mistral", architectures=["LlavaMistralForCausalLM"])
    assert O.is_original_format(mistral)
    with pytest.raises(ValueError, match="only LlavaLlamaForCausalLM"):
        O.load_original(mistral)

    # Not original-format: an HF directory, an empty one.
    assert not O.is_original_format(tiny_llava_dir) and not O.is_original_format(tmp_path / "missing")
    with pytest.raises(ValueError, match="not an original-format"):
        O.load_original(tiny_llava_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an original-format"):
        O.original_to_hf(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ValueError, match="already in the original"):
        C.hf_to_original(ckpt, tmp_path / "out2")
    # A model loaded from the original layout names that directory, which holds no HF processor: asked for
    model, _ = O.load_original(ckpt)
    assert model.name_or_path == str(ckpt)
    with pytest.raises(ValueError, match="hf_to_original needs the processor"):
        C.hf_to_original(model, tmp_path / "out3")


def test_standard_openai_tower_is_named_not_copied():
    from transformers import CLIPVisionConfig

    name = "openai/clip-vit-large-patch14-336"
    config = CLIPVisionConfig(**O.KNOWN_CLIP_TOWERS[name])
    pre = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "resample": 3,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    assert C._standard_tower(config, pre) == name
    assert C._standard_tower(config, {**pre, "size": {"shortest_edge": 224}}) is None
    assert C._standard_tower(CLIPVisionConfig(**{**O.KNOWN_CLIP_TOWERS[name], "num_hidden_layers": 2}), pre) is None
    # With the tower weights inside the checkpoint (v1.6), a known hub id needs no download for its config.
    assert O._vision_config(None, name, has_inside_weights=True).image_size == 336
    with pytest.raises(FileNotFoundError, match="vision_tower="):
        O._vision_config(None, name, has_inside_weights=False)


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_one_key_map_serves_both_directions(arch):
    """Every weight of the native classes has an original name, and the map read backwards gives the name back."""
    from llava.model.tiny import build

    model, _ = build(arch, size="tiny", device="meta")
    for key in model.state_dict():
        original = O.to_original_key(key)
        assert original is not None, key
        assert O.to_hf_key(original) == key
    # The released names, written out by hand (liuhaotian/llava-v1.5-7b, llava-v1.6 with its tower inside).
    assert O.to_hf_key("model.layers.31.mlp.up_proj.weight") == "model.language_model.layers.31.mlp.up_proj.weight"
    assert O.to_hf_key("model.mm_projector.2.bias") == "model.multi_modal_projector.linear_2.bias"
    assert (O.to_original_key("model.vision_tower.encoder.layers.0.mlp.fc1.weight")
            == "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight")
    # The one-layer `linear` projector has no row: its conversion adds or folds the second layer.
    assert O.to_hf_key("model.mm_projector.weight") is None
