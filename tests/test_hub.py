"""Hub names for models, towers, adapters, projectors and datasets, read offline from a Hugging Face cache.

The module fixture lays out a cache in a temporary ``HF_HOME`` exactly as ``huggingface_hub`` writes one
(``hub/models--org--name/{blobs,snapshots/<commit>,refs/<ref>}``, the snapshot files being relative links
to content-addressed blobs; datasets under ``datasets--org--name``). huggingface_hub reads ``HF_HOME`` and
``HF_HUB_OFFLINE`` when it is imported, so every check runs in a subprocess whose environment holds them:
``HF_HUB_OFFLINE=1`` throughout, hence nothing here can reach the network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMIT_A = hashlib.sha1(b"commit a").hexdigest()
COMMIT_B = hashlib.sha1(b"commit b").hexdigest()
PROMPT = "USER: <image>\nDescribe the image. ASSISTANT:"


def put_in_cache(home: Path, repo_id: str, src: Path, commit: str, refs=("main",), repo_type: str = "model") -> Path:
    """Store the files of ``src`` as commit ``commit`` of ``repo_id`` in the hub cache under ``home``."""
    storage = home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = storage / "snapshots" / commit
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline: huggingface_hub reads the file as the hash
    return snap


def png(colour, size=(40, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(rows: dict, path: Path) -> None:
    """A Parquet file as the hub holds a dataset split: HF features (an Image column) in its schema."""
    from datasets import Dataset, Features, Image, Value

    features = Features({k: Image() if k in ("image", "picture") else Value("int64" if k == "id" else "string") for k in rows})
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(path))


POPE = {"id": [0, 1, 2], "question": ["Is there a dog?", "Is there a cat?", "Is there a tree?"],
        "answer": ["yes", "no", "yes"],
        "image": [{"bytes": png(c), "path": None} for c in ("red", "green", "blue")]}
PREFERENCE = {"question": ["Write alt-text.", "Write alt-text for this chart.", "Describe the photo."],
              "chosen": ["A red square.", "Bars rising.", "A blue sky."],
              "rejected": ["A cat.", "A dog on a beach.", "Nothing."],
              "picture": [{"bytes": png(c, (30, 50)), "path": None} for c in ("red", "yellow", "blue")]}


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    """A HF_HOME holding tiny LLaVAs (HF and original format), a CLIP tower, LoRA adapters, a projector, datasets."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionModel

    from llava.model.convert import hf_to_original
    from llava.model.tiny import build, write

    root = tmp_path_factory.mktemp("hub")
    home, work = root / "home", root / "work"
    hf_a, hf_b = write(work / "tiny-a", seed=0), write(work / "tiny-b", seed=1)
    put_in_cache(home, "org/tiny-llava", hf_a, COMMIT_A)
    put_in_cache(home, "org/tiny-llava", hf_b, COMMIT_B, refs=("v2",))

    # Original layout, its CLIP tower named by hub id and held only in the cache.
    model, processor = build("llava", seed=0)
    orig = hf_to_original((model, processor), work / "orig", include_vision_tower=False)
    put_in_cache(home, "org/tiny-clip", orig / "vision_tower", COMMIT_A)
    shutil.rmtree(orig / "vision_tower")
    cfg = json.loads((orig / "config.json").read_text())
    cfg["mm_vision_tower"] = "org/tiny-clip"
    (orig / "config.json").write_text(json.dumps(cfg))
    put_in_cache(home, "org/tiny-llava-orig", orig, COMMIT_A)

    # LoRA adapters: one naming its base by hub id, one by a cache snapshot path of another machine.
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(work / "lora")
    adapter_cfg = json.loads((work / "lora" / "adapter_config.json").read_text())
    for repo, base in (("org/tiny-lora", "org/tiny-llava"),
                       ("org/tiny-lora-moved", f"/elsewhere/hub/models--org--tiny-llava/snapshots/{COMMIT_A}")):
        shutil.copytree(work / "lora", work / repo)
        (work / repo / "adapter_config.json").write_text(json.dumps({**adapter_cfg, "base_model_name_or_path": base}))
        put_in_cache(home, repo, work / repo, COMMIT_A)

    # A pre-training projector repository (LLaVA's mm_projector.bin naming).
    proj = model.model.multi_modal_projector
    (work / "proj").mkdir()
    torch.save({f"model.mm_projector.{i}.{p}": getattr(getattr(proj, f"linear_{j}"), p).detach() + 1
                for i, j in ((0, 1), (2, 2)) for p in ("weight", "bias")}, work / "proj" / "mm_projector.bin")
    put_in_cache(home, "org/tiny-projector", work / "proj", COMMIT_A)

    # Datasets: a POPE-like test set (yes/no `answer`) with two splits, a preference set with its image
    # in a column named `picture`.
    write_parquet(POPE, work / "pope" / "data" / "test-00000-of-00001.parquet")
    write_parquet({k: v[:2] for k, v in POPE.items()}, work / "pope" / "data" / "validation-00000-of-00001.parquet")
    put_in_cache(home, "org/tiny-pope", work / "pope", COMMIT_A, repo_type="dataset")
    write_parquet(PREFERENCE, work / "pref" / "data" / "train-00000-of-00001.parquet")
    put_in_cache(home, "org/tiny-pref", work / "pref", COMMIT_A, repo_type="dataset")
    return home, work


def hub_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_")) and k != "WORLD_SIZE"}
    return dict(env, HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")


def run_py(home: Path, code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=hub_env(home),
                          capture_output=True, text=True, timeout=600)


def test_names_are_told_from_paths(tmp_path):
    from llava.model.hub import HubDataset, HubError, hub_dataset, is_repo_id, local_dir, repo_of_snapshot, with_split

    assert is_repo_id("liuhaotian/llava-v1.5-7b") and is_repo_id("openai/clip-vit-large-patch14-336")
    assert not any(map(is_repo_id, ("llava-v1.5-7b", "/abs/dir", "./ckpt", "a/b/c", "../x", "org/")))
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    here = os.getcwd()
    os.chdir(tmp_path)
    try:  # an existing relative path wins over the hub name it looks like
        assert local_dir("org/name") == Path("org/name") and hub_dataset("org/name") is None
    finally:
        os.chdir(here)
    assert hub_dataset("lmms-lab/POPE") == HubDataset("lmms-lab/POPE")
    assert hub_dataset("lmms-lab/POPE:test") == HubDataset("lmms-lab/POPE", None, "test")
    assert hub_dataset("lmms-lab/POPE:Full:adversarial") == HubDataset("lmms-lab/POPE", "Full", "adversarial")
    assert hub_dataset("lmms-lab/POPE", split="test") == HubDataset("lmms-lab/POPE", None, "test")
    assert hub_dataset("/data/test.jsonl") is None and hub_dataset("org/name:") is None
    with pytest.raises(HubError, match="names split 'test' but --split says 'val'"):
        hub_dataset("lmms-lab/POPE:test", split="val")
    assert with_split("lmms-lab/POPE", "test") == "lmms-lab/POPE:test" and with_split("/x/y.json", "test") == "/x/y.json"
    snap = f"/home/u/.cache/huggingface/hub/models--liuhaotian--llava-v1.5-7b/snapshots/{COMMIT_A}"
    assert repo_of_snapshot(snap) == ("liuhaotian/llava-v1.5-7b", COMMIT_A) and repo_of_snapshot("/data/ckpt") is None


def ok(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stderr[-4000:]


LOGITS = f"""
    import sys, torch
    from PIL import Image
    from llava.model.load import checkpoint_kind, load_model

    def logits(model, processor):
        inputs = processor(images=Image.new("RGB", (64, 48), "orange"), text={PROMPT!r}, return_tensors="pt")
        with torch.no_grad():
            return model(**inputs).logits
"""


def test_hf_llava_by_hub_name_and_revision(hub_home):
    home, work = hub_home
    ok(run_py(home, LOGITS + f"""
    assert checkpoint_kind("org/tiny-llava") == "hf"
    local_a, proc = load_model(sys.argv[1])
    local_b, _ = load_model(sys.argv[2])
    main, _ = load_model("org/tiny-llava")
    snap = "models--org--tiny-llava/snapshots/{COMMIT_A}"
    assert main.name_or_path.endswith(snap), main.name_or_path
    assert torch.equal(logits(main, proc), logits(local_a, proc))
    for rev in ("v2", "{COMMIT_B}"):
        other, _ = load_model("org/tiny-llava", revision=rev)
        assert torch.equal(logits(other, proc), logits(local_b, proc)), rev
    assert not torch.equal(logits(local_a, proc), logits(local_b, proc))
    """, work / "tiny-a", work / "tiny-b"))


def test_original_format_with_hub_tower_converted_on_load(hub_home, tmp_path):
    home, work = hub_home
    ok(run_py(home, LOGITS + """
    from llava.model.builder import load_pretrained_model
    assert checkpoint_kind("org/tiny-llava-orig") == "original"
    hf, proc = load_model(sys.argv[1])
    converted, converted_proc = load_model("org/tiny-llava-orig")
    assert converted.config.vision_config.image_size == 56
    torch.testing.assert_close(logits(converted, proc), logits(hf, proc), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(converted, converted_proc), logits(hf, proc), rtol=0, atol=1e-5)
    # LLaVA's own entry point takes the hub name too.
    tokenizer, compat, image_processor, context_len = load_pretrained_model("org/tiny-llava-orig", None, "llava", device="cpu")
    assert context_len == 4096 and type(compat.hf_model).__name__ == "LlavaForConditionalGeneration"
    # ... and the converter's command line.
    from llava.model.convert import main
    main(["to-hf", "--src", "org/tiny-llava-orig", "--out", sys.argv[2]])
    saved, _ = load_model(sys.argv[2])
    torch.testing.assert_close(logits(saved, proc), logits(hf, proc), rtol=0, atol=1e-5)
    """, work / "tiny-a", tmp_path / "to-hf"))


def test_lora_adapter_on_hub_base(hub_home):
    home, work = hub_home
    ok(run_py(home, LOGITS + """
    assert checkpoint_kind("org/tiny-lora") == "lora"
    expected, proc = load_model(sys.argv[1], model_base=sys.argv[2], merge_lora=True)
    want = logits(expected, proc)
    plain, _ = load_model(sys.argv[2])
    assert not torch.equal(logits(plain, proc), want)  # the adapter changes the outputs
    for name, base in (("org/tiny-lora", None), ("org/tiny-lora-moved", None), ("org/tiny-lora-moved", "org/tiny-llava")):
        merged, _ = load_model(name, model_base=base, merge_lora=True)
        torch.testing.assert_close(logits(merged, proc), want, rtol=0, atol=1e-5)
    unmerged, _ = load_model("org/tiny-lora")
    assert type(unmerged).__name__ == "PeftModel"
    torch.testing.assert_close(logits(unmerged, proc), want, rtol=0, atol=1e-5)
    """, work / "lora", work / "tiny-a"))


def test_training_arguments_resolve_to_cache_paths(hub_home):
    home, work = hub_home
    ok(run_py(home, f"""
    import sys, torch
    from pathlib import Path
    from llava.model.load import resolve_hub_arguments
    from llava.train.arguments import ModelArguments
    from llava.train.projector_file import load_projector_file
    from llava.model.tiny import build

    args = ModelArguments(model_name_or_path="org/tiny-llava", model_revision="v2", vision_tower="org/tiny-clip",
                          pretrain_mm_mlp_adapter="org/tiny-projector")
    resolve_hub_arguments(args)
    hub = Path(sys.argv[1]) / "hub"
    assert Path(args.model_name_or_path) == hub / "models--org--tiny-llava" / "snapshots" / "{COMMIT_B}"
    assert Path(args.vision_tower) == hub / "models--org--tiny-clip" / "snapshots" / "{COMMIT_A}"
    assert Path(args.pretrain_mm_mlp_adapter).read_bytes() == (Path(sys.argv[2]) / "mm_projector.bin").read_bytes()
    model, _ = build("llava", seed=0)
    before = model.model.multi_modal_projector.linear_1.weight.clone()
    load_projector_file(model, args.pretrain_mm_mlp_adapter)
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, before + 1)
    named = ModelArguments(model_name_or_path=sys.argv[3], pretrain_mm_mlp_adapter="org/tiny-projector/mm_projector.bin")
    resolve_hub_arguments(named)
    assert named.model_name_or_path == sys.argv[3]  # a local directory stays as given
    assert Path(named.pretrain_mm_mlp_adapter).samefile(args.pretrain_mm_mlp_adapter)
    """, home, work / "proj", work / "tiny-a"))


def test_hub_datasets_with_split(hub_home):
    home, _ = hub_home
    ok(run_py(home, f"""
    import json
    from llava.data.records import DataError, read_records
    from llava.model.hub import with_split
    pope = {json.dumps({k: v for k, v in POPE.items() if k != "image"})}
    colours = ("red", "green", "blue")
    from PIL import Image
    import io
    for spec in ("org/tiny-pope:test", with_split("org/tiny-pope", "test"), "org/tiny-pope:default:test"):
        records = read_records(spec, "test")
        assert [r.question for r in records] == pope["question"], spec
        assert [r.label for r in records] == pope["answer"] and [r.idx for r in records] == pope["id"]
        assert [Image.open(io.BytesIO(r.image.data)).getpixel((0, 0)) for r in records] == [(255, 0, 0), (0, 128, 0), (0, 0, 255)]
        assert records[0].source == spec
    assert len(read_records("org/tiny-pope:validation", "test")) == 2
    pref = read_records("org/tiny-pref", "preference")  # one split: no name needed; image from column `picture`
    assert [(r.chosen, r.rejected) for r in pref] == list(zip({PREFERENCE["chosen"]!r}, {PREFERENCE["rejected"]!r}))
    assert Image.open(io.BytesIO(pref[1].image.data)).size == (30, 50)
    for spec, words in (("org/tiny-pope", "has splits ['test', 'validation']"), ("org/tiny-pope:dev", "dev")):
        try:
            read_records(spec, "test")
        except DataError as e:
            assert spec in str(e) and words in str(e) and "\\n" not in str(e), str(e)
        else:
            raise AssertionError(spec)
    """))


def test_names_missing_offline_give_one_line_naming_them(hub_home, tmp_path):
    home, _ = hub_home
    ok(run_py(home, """
    from llava.data.records import DataError, read_records
    from llava.model.load import ModelLoadError, load_model

    def one_line(error, *words):
        text = str(error)
        assert "\\n" not in text and all(w in text for w in words), text

    for call, words in ((lambda: load_model("org/absent"), ("'org/absent'", "HF_HUB_OFFLINE")),
                        (lambda: load_model("org/tiny-llava", revision="v9"), ("'org/tiny-llava'", "'v9'")),
                        (lambda: load_model("org/tiny-lora", model_base="org/absent-base"), ("org/absent-base", "--model_base"))):
        try:
            call()
        except ModelLoadError as e:
            one_line(e, *words)
        else:
            raise AssertionError(words)
    try:
        read_records("org/absent-set:test", "test")
    except DataError as e:
        one_line(e, "org/absent-set:test", "HF_HUB_OFFLINE")
    else:
        raise AssertionError("dataset")
    try:
        read_records("data/missing.json", "test")  # a missing relative file reads as a failed hub look-up too
    except DataError as e:
        one_line(e, "data/missing.json", "no such file")
    else:
        raise AssertionError("missing file")
    """))
    # The command lines: exit status 2 and one line.
    run = subprocess.run([sys.executable, str(REPO / "mcmdpo_inference.py"), "--model_name", "org/absent",
                          "--test_datasets", "org/tiny-pope:test", "--eval_output", str(tmp_path / "out.jsonl")],
                         env=hub_env(home), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "'org/absent'" in run.stderr, run.stderr


@pytest.mark.slow
def test_inference_and_training_commands_take_hub_names(hub_home, tmp_path):
    """mcmdpo_inference.py on a hub model (revision) and a hub test split; one MCM-DPO step on hub names."""
    home, _ = hub_home
    out = tmp_path / "pope.jsonl"
    run = subprocess.run([sys.executable, str(REPO / "mcmdpo_inference.py"), "--model_name", "org/tiny-llava",
                          "--model_revision", "v2", "--test_datasets", "org/tiny-pope", "--split", "test",
                          "--eval_output", str(out), "--max_new_tokens", "3", "--num_beams", "1", "--no_progress"],
                         env=hub_env(home), capture_output=True, text=True, timeout=600)
    ok(run)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["question"] for x in lines] == POPE["question"] and all("response" in x for x in lines)
    assert "image" in lines[0] and "bytes" not in lines[0]["image"]

    train = subprocess.run(
        [sys.executable, "-m", "llava.train.train", "--model_name_or_path", "org/tiny-llava", "--model_revision", "v2",
         "--data_path", "org/tiny-pref:train", "--task", "DPO", "--use_cross_modal_loss", "True", "--max_steps", "1",
         "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "run"), "--report_to", "none",
         "--save_strategy", "no", "--logging_steps", "1", "--use_image_type", "black"],
        env=hub_env(home), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    ok(train)
    assert (tmp_path / "run" / "model.safetensors").is_file()
    caches = list((tmp_path / "run" / "ref_logps").glob("ref_logps_*.pt"))
    assert len(caches) == 1  # the reference cache is keyed by the hub split's fingerprint
