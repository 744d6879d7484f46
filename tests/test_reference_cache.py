"""The cached reference log-probabilities: a change in anything that moves them recomputes the cache,
no change reuses it, and the table does not depend on how records were batched."""

import json
import os
import shutil

import pytest
import torch

from llava.data.records import read_records
from llava.train.arguments import parse_args
from llava.train.checkpoints import OutputDirError
from llava.train.reference import cache_path
from llava.train.train import prepare, reference_key
from tests.conftest import write_preference_set

CONDITIONS = ("cw_mw_yw", "cw_mw_yl")


def argv(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--data_path", str(data), "--image_folder", str(data.parent),
            "--output_dir", str(out), "--report_to", "none", "--seed", "0", "--dataloader_num_workers", "0",
            "--task", "DPO", *map(str, extra)]


@pytest.fixture
def setup(tiny_llava_dir, tmp_path):
    """A data set of our own (its files get changed) and a projector adapter file of the tiny model."""
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    data = write_preference_set(tmp_path / "data")
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir)
    adapter = tmp_path / "mm_projector.safetensors"
    save_file({k: v.contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()}, adapter)
    return tiny_llava_dir, data, adapter


def key_digest(model, data, adapter, *extra, processor=None):
    from transformers import AutoProcessor

    model_args, data_args, args = parse_args(argv(model, data, data.parent / "out", "--pretrain_mm_mlp_adapter", adapter, *extra))
    processor = processor or AutoProcessor.from_pretrained(model)
    key = reference_key(model_args, data_args, args, CONDITIONS, processor, read_records(data, "preference"))
    return cache_path("cache", key).name


def rewrite_adapter(adapter, delta):
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter)
    first = sorted(weights)[0]
    weights[first] = weights[first] + delta
    save_file(weights, adapter)


def touch(path, seconds=10):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def replace_image_keeping_its_time(path):
    from PIL import Image

    st = os.stat(path)
    Image.new("RGB", (17, 9), (1, 2, 3)).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def edit_data(data):
    records = json.loads(data.read_text())
    text = json.loads(records[0]["text"])
    text["chosen"] += " more"
    records[0]["text"] = json.dumps(text)
    data.write_text(json.dumps(records))


# One change each, applied to (data, adapter) files or given as flags or as a processor change.
FILE_CHANGES = {
    "projector adapter contents": lambda data, adapter: rewrite_adapter(adapter, 1e-3),
    "image modification time": lambda data, adapter: touch(data.parent / "images" / "img_3.png"),
    "image contents and size, same time": lambda data, adapter: replace_image_keeping_its_time(data.parent / "images" / "img_0.png"),
    "data record": lambda data, adapter: edit_data(data),
}
FLAG_CHANGES = {
    "template": ["--version", "plain"],
    "aspect ratio": ["--image_aspect_ratio", "square"],
    "max length": ["--model_max_length", "64"],
    "negatives": ["--use_image_type", "black"],
    "forward": ["--preference_forward", "naive"],
    "attention kernel": ["--attn_implementation", "eager"],
    "precision": ["--bf16", "True"],
}
PROCESSOR_CHANGES = {
    "tokenizer vocabulary": lambda p: p.tokenizer.add_tokens(["<another>"]),
    "tokenizer setting": lambda p: setattr(p.tokenizer, "model_max_length", 77),
    "image processor mean": lambda p: setattr(p.image_processor, "image_mean", [0.5, 0.5, 0.5]),
    "image processor size": lambda p: setattr(p.image_processor, "crop_size", {"height": 28, "width": 28}),
}


def test_unchanged_inputs_give_the_same_key(setup):
    model, data, adapter = setup
    before = key_digest(model, data, adapter)
    rewrite_adapter(adapter, 0.0)  # same contents, new file time: the adapter is hashed by contents
    assert key_digest(model, data, adapter) == before


@pytest.mark.parametrize("change", sorted(FILE_CHANGES))
def test_a_changed_file_changes_the_key(change, setup):
    model, data, adapter = setup
    before = key_digest(model, data, adapter)
    FILE_CHANGES[change](data, adapter)
    assert key_digest(model, data, adapter) != before


@pytest.mark.parametrize("change", sorted(FLAG_CHANGES))
def test_a_changed_setting_changes_the_key(change, setup):
    model, data, adapter = setup
    assert key_digest(model, data, adapter, *FLAG_CHANGES[change]) != key_digest(model, data, adapter)


@pytest.mark.parametrize("change", sorted(PROCESSOR_CHANGES))
def test_a_changed_tokenizer_or_image_processor_changes_the_key(change, setup):
    from transformers import AutoProcessor

    model, data, adapter = setup
    processor = AutoProcessor.from_pretrained(model)
    before = key_digest(model, data, adapter, processor=processor)
    PROCESSOR_CHANGES[change](processor)
    assert key_digest(model, data, adapter, processor=processor) != before


def test_no_adapter_and_an_adapter_differ(setup):
    from transformers import AutoProcessor

    model, data, adapter = setup
    model_args, data_args, args = parse_args(argv(model, data, data.parent / "out"))
    key = reference_key(model_args, data_args, args, CONDITIONS, AutoProcessor.from_pretrained(model), read_records(data, "preference"))
    assert cache_path("cache", key).name != key_digest(model, data, adapter)


def test_cache_is_reused_unchanged_and_recomputed_after_an_image_changes(setup, tmp_path):
    """End to end through the trainer; the table is each record's own forward, whatever the eval batch size.

    bf16: there a padded batch of 4 moves log-probabilities by ~4e-4 (fp32: ~4e-6, measured on this
    tiny model), so a table computed in batches would fail the exact comparison.
    """
    model, data, adapter = setup
    flags = argv(model, data, tmp_path / "run", "--per_device_eval_batch_size", "4", "--bf16", "True")

    first = prepare(flags)
    first.prepare_references()
    assert not first.reference.reused
    dataset, collator = first.train_dataset, first.data_collator
    with torch.no_grad():
        alone = torch.cat([first.model.eval()(**collator([dataset[i]])) for i in range(len(dataset))])
    assert torch.equal(first.reference.table, alone)

    again = prepare(flags)
    again.prepare_references()
    assert again.reference.reused and again.reference.path == first.reference.path

    shutil.copy(data.parent / "images" / "img_1.png", data.parent / "images" / "img_2.png")
    with pytest.raises(OutputDirError, match=r"holds another run \(differs in images\)"):
        prepare(flags)  # the run in OUTPUT_DIR is another run's now: not continued
    changed = prepare(flags + ["--overwrite_output_dir", "True"])  # afresh; the cache of the old key stays
    assert changed.reference.path != first.reference.path
    changed.prepare_references()
    assert not changed.reference.reused
    assert not torch.equal(changed.reference.table[2], first.reference.table[2])
    torch.testing.assert_close(changed.reference.table[3:], first.reference.table[3:], rtol=0, atol=0)


def test_the_base_under_a_lora_adapter_is_part_of_the_key(setup, tmp_path):
    from transformers import AutoProcessor

    model, data, adapter = setup
    base = shutil.copytree(model, tmp_path / "base")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "peft_type": "LORA"}))
    processor = AutoProcessor.from_pretrained(model)
    before = key_digest(lora, data, adapter, processor=processor)
    config = json.loads((base / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-3
    (base / "config.json").write_text(json.dumps(config))
    assert key_digest(lora, data, adapter, processor=processor) != before


def test_a_damaged_cache_file_is_named_not_loaded(setup, tmp_path):
    """The cache is written whole (write_atomic) but a disk can still damage it: one line, not torch's traceback."""
    model, data, adapter = setup
    trainer = prepare(argv(model, data, tmp_path / "run"))
    path = trainer.reference.path
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match=rf"^{path}: unreadable reference cache \(.+\); delete it to recompute$"):
        trainer.prepare_references()
