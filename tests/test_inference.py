"""Tests for batch inference (mcmdpo_inference.py), batched generation and the alt-text CLI.

Everything runs the tiny random-weight checkpoints of conftest.py on CPU: their outputs are
gibberish, but deterministic, which is all these tests need. Most runs call ``main`` in-process
(a subprocess costs ~10 s of imports on 2 cores); subprocesses are kept for what needs one: a
SIGKILL part way, torchrun with two processes, and the exit status of the real command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llava.eval import inference as I
from llava.eval import output_file as O
from llava.eval.generate import build_prompt, generate_ids, left_pad, strip_response
from tests.conftest import write_preference_set

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "inference"
IMAGES = FIX / "images"
FAST = ["--max_new_tokens", "6", "--num_beams", "1", "--no_progress"]


def run_main(model, files, out, *extra, images=IMAGES):
    argv = ["--model_name", str(model), "--test_datasets", *map(str, files), "--eval_output", str(out)]
    if images is not None:
        argv += ["--image_folder", str(images)]
    return I.main(argv + [str(x) for x in extra])


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def env():
    e = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    e.pop("WORLD_SIZE", None)
    return e


# ---------------------------------------------------------------------------------------------
# Units


@pytest.mark.parametrize("raw, want", [
    ("ASSISTANT: A dog on a beach.", "A dog on a beach."),
    ("  Assistant:A dog.  ", "A dog."),
    ("assistant : yes", "yes"),
    ("ASSISTANT: ASSISTANT: twice", "twice"),
    ("\n A cat sitting.\n", "A cat sitting."),
    ("The ASSISTANT: stays inside", "The ASSISTANT: stays inside"),
    ("", ""),
])
def test_strip_response(raw, want):
    assert strip_response(raw) == want


def test_left_pad_positions():
    ids, mask, pos = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_prompt_ids_are_training_ids(tiny_llava_dir):
    """Without the released trailing newline, the prompt is the training sequence up to the answer."""
    from transformers import AutoProcessor

    from llava.conversation import encode_conversation, get_template, image_question
    from llava.data.images import ImageProcessor
    from llava.data.collate import SFTCollator
    from llava.data.datasets import SFTExample
    from PIL import Image

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    tok, template = processor.tokenizer, get_template("v1")
    image = ImageProcessor(processor, "pad")(Image.open(IMAGES / "img3.png").convert("RGB"))
    question = "Given an image and context, generate alt-text for the image.\nContext:\nA red bicycle."
    prompt = build_prompt(tok, template, question, image, trailing_newline=False)
    ids, labels = encode_conversation(tok, template, [(image_question(question), "An answer.")])
    image_id = tok.convert_tokens_to_ids("<image>")
    batch = SFTCollator(tok.pad_token_id, image_id)([SFTExample(0, ids, labels, image)])
    train_ids = batch["input_ids"][0].tolist()
    assert train_ids[: len(prompt.input_ids)] == prompt.input_ids
    assert prompt.input_ids.count(image_id) == image.num_tokens
    assert tok.decode(prompt.input_ids[-8:]).strip().endswith("ASSISTANT:")
    # the released inference's prompt: the question then "\n" before the assistant tag
    released = build_prompt(tok, template, question, image)
    assert tok.decode([t for t in released.input_ids if t != image_id]).endswith("A red bicycle.\n ASSISTANT:")


def test_match_lines_identity():
    """idx identity, position identity with duplicate records, error rows superseded, orphans refused."""
    items = O.load_items([FIX / "noidx.json", FIX / "test.jsonl"])
    assert [it.key for it in items[:4]] == [0, 1, 2, 3]  # no idx: positions
    assert [it.key for it in items[4:6]] == [100, 101]  # idx
    dup_a, dup_b = items[0], items[3]
    assert dup_a.signature == dup_b.signature
    line = lambda it, **r: O.Line(Path("o"), 0, b"", dict(it.record.output_fields(), **r))  # noqa: E731
    lines = [line(items[5], response="b"), line(dup_a, error="gone"), line(dup_a, response="a"),
             line(items[4], response="x"), line(items[4], response="x again")]
    m = O.match_lines(items, lines)
    assert m.best[0].fields["response"] == "a"  # a response wins over an error row
    assert m.best[3].fields["error"] == "gone"  # the twin of record 0 holds the error row ...
    assert m.done() == {0, 4, 5}  # ... which is redone
    assert m.dropped == 1 and not m.clean_in_order
    ordered = [O.Line(Path("o"), n, b"", dict(it.record.output_fields(), response="r")) for n, it in enumerate(items)]
    assert O.match_lines(items, ordered).clean_in_order
    assert not O.match_lines(items, ordered[::-1]).clean_in_order
    stranger = O.Line(Path("o"), 7, b"", {"idx": 1, "question": "?", "response": "r"})
    with pytest.raises(O.InferenceError, match="line 7: matches no record"):
        O.match_lines(items, [stranger])


# ---------------------------------------------------------------------------------------------
# Batch-size equivalence (token for token)

QUESTIONS = [r["question"] for r in read_jsonl(FIX / "test.jsonl")]


@pytest.fixture(scope="module")
def models(tiny_llava_dir, tiny_next_dir):
    from llava.model.load import load_model

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(tiny_llava_dir if name == "llava" else tiny_next_dir)
            cache[name][0].eval()
        return cache[name]

    return get


def ten_prompts(models, arch, aspect):
    """Ten prompts (the seven questions, then three again with other images): a batch of 8 and one of 2."""
    from PIL import Image

    from llava.conversation import get_template
    from llava.data.images import ImageProcessor

    model, processor = models(arch)
    tok = processor.tokenizer
    images = ImageProcessor(processor, aspect)
    prompts = [build_prompt(tok, get_template("v1"), QUESTIONS[i % len(QUESTIONS)],
                            images(Image.open(IMAGES / f"img{i % 8}.png").convert("RGB"))) for i in range(10)]
    return model, tok, prompts


def plain_generate(model, prompt, **kw) -> list[int]:
    """The new tokens of plain transformers' ``generate`` on one prompt: the model's own image splicing."""
    from llava.eval.generate import stack_images

    images = stack_images([prompt.image])
    ids = torch.tensor([prompt.input_ids])
    extra = {"image_sizes": images["image_sizes"]} if "image_sizes" in images else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=images["pixel_values"],
                             do_sample=False, **extra, **kw)
    new = out[0, ids.shape[1]:].tolist()
    while new and new[-1] == kw["pad_token_id"]:
        new.pop()
    return new


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
@pytest.mark.parametrize("arch, aspect", [("llava", "pad"), ("next", "pad"), ("next", "anyres")])
def test_batch_size_equivalence(models, arch, aspect, num_beams):
    """Batches of 8 (and the remaining 2) give each prompt the tokens it gets alone, which are plain
    transformers' (LLaVA-NeXT with one padded view, the paper's, is no path of transformers' own)."""
    model, tok, prompts = ten_prompts(models, arch, aspect)
    lengths = {len(p.input_ids) for p in prompts[:8]}
    assert len(lengths) > 3  # prompts of different lengths: the batch is really left-padded
    kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, num_beams=num_beams, max_new_tokens=10)
    one = [generate_ids(model, [p], **kw)[0] for p in prompts]
    batched = generate_ids(model, prompts[:8], **kw) + generate_ids(model, prompts[8:], **kw)
    assert batched == one
    assert any(one)
    if (arch, aspect) != ("next", "pad"):
        assert one == [plain_generate(model, p, **kw) for p in prompts]


@pytest.mark.parametrize("arch, aspect", [("llava", "pad"), ("next", "anyres")])
def test_shared_prompt_cache_matches_generate(models, arch, aspect):
    """Beam search over the prompt run once per record (``prompt_cache``) gives the tokens of
    ``generate``'s own path (the prompt run once per beam, its default cache), alone and in a batch of 8."""
    from transformers.cache_utils import DynamicLayer

    from llava.eval.generate import SharedPromptLayer, prompt_cache

    model, tok, prompts = ten_prompts(models, arch, aspect)
    kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, num_beams=3, max_new_tokens=12)
    for batch in (prompts[:1], prompts[:8]):
        shared = generate_ids(model, batch, shared_prompt=True, **kw)
        assert shared == generate_ids(model, batch, shared_prompt=False, **kw)
        assert all(len(t) > 3 for t in shared)  # long enough for beams to be reordered
    # the cache really is the shared kind, one layer per language-model layer, beams in repeat_interleave order
    ids, mask, positions = left_pad([p.input_ids for p in prompts[:2]], tok.pad_token_id)
    cache = prompt_cache(model, model.get_input_embeddings()(ids), mask, positions, beams=3, room=5)
    assert len(cache.layers) == model.config.text_config.num_hidden_layers
    layer = cache.layers[0]
    assert isinstance(layer, SharedPromptLayer) and isinstance(layer, DynamicLayer)
    assert layer.keys.shape[0] == 6 and layer.get_seq_length() == ids.shape[1] - 1
    assert torch.equal(layer.keys[0], layer.keys[2]) and not torch.equal(layer.keys[2], layer.keys[3])


def test_shared_prompt_layer_appends_and_reorders_after_the_prompt():
    """In-place appends and beam reorders against a plain concatenation and ``index_select``."""
    from llava.eval.generate import SharedPromptLayer

    g = torch.Generator().manual_seed(0)
    records = torch.randn(2, 2, 5, 4, generator=g)
    prompt = records.repeat_interleave(2, dim=0)  # 2 records x 2 beams
    layer = SharedPromptLayer(records, -records, room=1, beams=2)  # room for 1: the third append grows it
    assert torch.equal(layer.keys, prompt) and torch.equal(layer.values, -prompt)
    keys = prompt.clone()
    for step, order in enumerate(([1, 1, 2, 3], [0, 0, 3, 2], [1, 0, 2, 2])):
        new = torch.randn(4, 2, 1, 4, generator=g)
        k, v = layer.update(new, -new)
        keys = torch.cat([keys, new], dim=-2)
        assert torch.equal(k, keys) and torch.equal(v, -keys) and layer.get_seq_length() == 6 + step
        layer.reorder_cache(torch.tensor(order))
        keys = keys.index_select(0, torch.tensor(order))
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, -keys)


def test_batch_size_equivalence_cli(tiny_llava_dir, tmp_path):
    """The command itself: --batch_size 4 writes the file --batch_size 1 writes."""
    run_main(tiny_llava_dir, [FIX / "test.jsonl"], tmp_path / "b1.jsonl", "--batch_size", "1", *FAST)
    run_main(tiny_llava_dir, [FIX / "test.jsonl"], tmp_path / "b4.jsonl", "--batch_size", "4", *FAST)
    assert (tmp_path / "b1.jsonl").read_bytes() == (tmp_path / "b4.jsonl").read_bytes()


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.fixture(scope="module")
def reference(tiny_llava_dir, tmp_path_factory):
    """An uninterrupted run over two files (7 + 3 records) with the kill test's settings."""
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    run_main(tiny_llava_dir, [FIX / "test.jsonl", FIX / "pope.jsonl"], out, *KILL_ARGS)
    return out


KILL_ARGS = ["--batch_size", "1", "--max_new_tokens", "24", "--num_beams", "1", "--no_progress"]


def written_like(reference, out):
    """``out`` as a run of the reference's settings leaves it: its run identity beside it (``OUT.run.json``)."""
    shutil.copy(O.identity_path(reference), O.identity_path(out))


@pytest.mark.slow
def test_kill_and_resume(tiny_llava_dir, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, str(REPO / "mcmdpo_inference.py"), "--model_name", str(tiny_llava_dir), "--test_datasets",
           str(FIX / "test.jsonl"), str(FIX / "pope.jsonl"), "--image_folder", str(IMAGES), "--eval_output", str(out),
           *KILL_ARGS]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    written = out.read_bytes().count(b"\n")
    assert 2 <= written < 10, "the kill came too late to test resuming"

    assert run_main(tiny_llava_dir, [FIX / "test.jsonl", FIX / "pope.jsonl"], out, *KILL_ARGS, images=IMAGES) == 0
    assert out.read_bytes() == reference.read_bytes()  # every record once, identical responses, input order
    assert [p.name for p in tmp_path.glob("out.jsonl.*")] == ["out.jsonl.run.json"]  # no temp, lock or part file left


def test_torn_line_and_out_of_order_resume(tiny_llava_dir, reference, tmp_path, capsys):
    lines = reference.read_bytes().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    # records 6, 1, 3 done (out of order), then a write cut short in the middle of record 4's line
    out.write_bytes(lines[6] + lines[1] + lines[3] + lines[4][: len(lines[4]) // 2])
    written_like(reference, out)
    run_main(tiny_llava_dir, [FIX / "test.jsonl", FIX / "pope.jsonl"], out, *KILL_ARGS)
    assert out.read_bytes() == reference.read_bytes()
    err = capsys.readouterr().err
    assert "torn last line" in err and "3 of 10 records already done" in err


def test_complete_output_is_left_alone_and_error_rows_retried(tiny_llava_dir, reference, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    shutil.copy(reference, out)
    written_like(reference, out)
    before = out.stat().st_mtime_ns
    run_main(tiny_llava_dir, [FIX / "test.jsonl", FIX / "pope.jsonl"], out, *KILL_ARGS)
    assert out.read_bytes() == reference.read_bytes() and out.stat().st_mtime_ns == before
    assert "10 of 10 records already done" in capsys.readouterr().err

    lines = reference.read_bytes().splitlines(keepends=True)
    error_row = {k: v for k, v in json.loads(lines[2]).items() if k != "response"} | {"error": "image file not found: x"}
    lines[2] = O.dumps_line(error_row)
    out.write_bytes(b"".join(lines))
    run_main(tiny_llava_dir, [FIX / "test.jsonl", FIX / "pope.jsonl"], out, *KILL_ARGS)
    assert out.read_bytes() == reference.read_bytes()  # the error row was redone and replaced


def test_foreign_output_is_refused(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"idx": 5, "question": "something else", "response": "r"}) + "\n")
    with pytest.raises(SystemExit) as e:
        run_main(tiny_llava_dir, [FIX / "pope.jsonl"], out, *FAST)
    assert e.value.code == 2
    assert "has no run identity" in capsys.readouterr().err
    assert "something else" in out.read_text()  # untouched
    run_main(tiny_llava_dir, [FIX / "pope.jsonl"], out, "--overwrite", *FAST)
    assert [r["idx"] for r in read_jsonl(out)] == [0, 1, 2]


def test_second_run_on_the_same_output_is_refused(tiny_llava_dir, tmp_path, capsys):
    import fcntl

    out = tmp_path / "out.jsonl"
    with open(tmp_path / "out.jsonl.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run is writing out.jsonl
        with pytest.raises(SystemExit) as e:
            run_main(tiny_llava_dir, [FIX / "pope.jsonl"], out, *FAST)
    assert e.value.code == 2 and f"another run is writing {out}" in capsys.readouterr().err
    assert not out.exists()


def test_anyres_needs_next(tiny_llava_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(tiny_llava_dir, [FIX / "pope.jsonl"], tmp_path / "o.jsonl", "--image_aspect_ratio", "anyres", *FAST)
    assert e.value.code == 2 and "anyres needs a LLaVA-NeXT model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Two processes


@pytest.mark.slow
def test_two_process_sharded_with_resume(tiny_llava_dir, reference, tmp_path):
    """torchrun with 2 CPU processes: a stale part file and a partial OUT of a killed sharded run
    are folded in, the remaining records are shared, and the merged file is the 1-process file."""
    lines = reference.read_bytes().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_bytes(lines[0] + lines[5])
    written_like(reference, out)
    (tmp_path / "out.jsonl.rank1.part").write_bytes(lines[2] + lines[8][:20])  # torn
    (tmp_path / "out.jsonl.rank3.part").write_bytes(lines[7])  # from a run with more processes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "mcmdpo_inference.py"), "--model_name", str(tiny_llava_dir), "--test_datasets",
           str(FIX / "test.jsonl"), str(FIX / "pope.jsonl"), "--image_folder", str(IMAGES), "--eval_output", str(out),
           *KILL_ARGS]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.run.json"]
    assert "4 of 10 records already done" in res.stderr


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.slow
def test_missing_model_path_cli(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "mcmdpo_inference.py"), "--model_name", str(tmp_path / "nope"),
                          "--test_datasets", str(FIX / "test.jsonl"), "--eval_output", str(tmp_path / "o.jsonl")],
                         env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "model path not found" in res.stderr and str(tmp_path / "nope") in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_missing_image(tiny_llava_dir, tmp_path, capsys):
    src = FIX / "missing_image.jsonl"
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as e:
        run_main(tiny_llava_dir, [src], out, *FAST)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{src}, record 1, line 2, field 'image_path': image file not found" in err
    assert "--skip_bad_records" in err
    assert not out.exists() or out.read_text() == ""  # stopped before generating anything

    run_main(tiny_llava_dir, [src], out, "--skip_bad_records", *FAST)
    rows = read_jsonl(out)
    assert [r["idx"] for r in rows] == [100, 101, 102]
    assert "image file not found" in rows[1]["error"] and "response" not in rows[1]
    assert rows[1]["image_path"] == "does_not_exist.png"
    assert "response" in rows[0] and "response" in rows[2]
    assert f"{src}, record 1" in capsys.readouterr().err


def test_unreadable_image(tiny_llava_dir, tmp_path, capsys):
    src = FIX / "corrupt_image.jsonl"
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as e:
        run_main(tiny_llava_dir, [src], out, "--batch_size", "1", *FAST)
    assert e.value.code == 2
    assert f"{src}, record 1, line 2, field 'image_path': unreadable image" in capsys.readouterr().err
    assert not out.exists() or out.read_text() == ""  # every image is verified before anything is generated

    run_main(tiny_llava_dir, [src], out, "--batch_size", "1", "--skip_bad_records", *FAST)
    rows = read_jsonl(out)
    assert [r["idx"] for r in rows] == [100, 101, 102]
    assert "unreadable image" in rows[1]["error"]


def test_missing_question(tiny_llava_dir, tmp_path, capsys):
    src = FIX / "no_question.jsonl"
    with pytest.raises(SystemExit) as e:
        run_main(tiny_llava_dir, [src], tmp_path / "out.jsonl", *FAST)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{src}, record 1, line 2, field 'question': missing" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Output fields


def test_output_fields_parquet_and_pope(tiny_next_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_jsonl(FIX / "test.jsonl")[:3]
    table = pa.table({
        "idx": [r["idx"] for r in rows],
        "image": [{"bytes": (IMAGES / r["image_path"]).read_bytes(), "path": None} for r in rows],
        "question": [r["question"] for r in rows],
        "chosen": [r["chosen"] for r in rows],
        "ds_name": ["twitter_data"] * 3,
    })
    pq.write_table(table, tmp_path / "test.parquet")
    out = tmp_path / "out.jsonl"
    run_main(tiny_next_dir, [tmp_path / "test.parquet", FIX / "pope.jsonl"], out, "--image_aspect_ratio", "anyres", *FAST)
    got = read_jsonl(out)
    assert len(got) == 6
    for g, r in zip(got[:3], rows):
        assert g["image"] == {"path": None}  # image bytes left out
        assert (g["idx"], g["question"], g["chosen"], g["ds_name"]) == (r["idx"], r["question"], r["chosen"], "twitter_data")
        assert isinstance(g["response"], str)
    pope = read_jsonl(FIX / "pope.jsonl")
    for g, r in zip(got[3:], pope):
        assert {k: g[k] for k in r} == r and isinstance(g["response"], str)
    assert b"bytes" not in out.read_bytes()


def test_lora_adapter_with_model_base(tiny_llava_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from llava.model.load import load_model

    model, _ = load_model(tiny_llava_dir)
    torch.manual_seed(0)  # random, non-zero LoRA weights (init_lora_weights=False)
    adapter = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "lora")
    run_main(tmp_path / "lora", [FIX / "pope.jsonl"], tmp_path / "lora.jsonl", "--model_base", tiny_llava_dir, *FAST)
    run_main(tiny_llava_dir, [FIX / "pope.jsonl"], tmp_path / "base.jsonl", *FAST)
    # the same adapter folded in by peft itself and saved as a plain checkpoint: the answers the adapter gives
    shutil.copytree(tiny_llava_dir, tmp_path / "merged")
    adapter.merge_and_unload().save_pretrained(tmp_path / "merged")
    run_main(tmp_path / "merged", [FIX / "pope.jsonl"], tmp_path / "merged.jsonl", *FAST)
    lora, base = read_jsonl(tmp_path / "lora.jsonl"), read_jsonl(tmp_path / "base.jsonl")
    assert len(lora) == 3 and [r["response"] for r in lora] != [r["response"] for r in base]
    assert [r["response"] for r in lora] == [r["response"] for r in read_jsonl(tmp_path / "merged.jsonl")]


# ---------------------------------------------------------------------------------------------
# alt_text


def test_alt_text_cli(tiny_llava_dir, tmp_path, capsys):
    from llava.eval import alt_text

    alt_text.main(["--model_name", str(tiny_llava_dir), "--image", str(IMAGES / "img0.png"),
                   "--context", "Sunset at the beach.", "--max_new_tokens", "6", "--num_beams", "1"])
    printed = capsys.readouterr().out
    assert printed.endswith("\n") and printed.count("\n") == 1
    # the same record through batch inference gives the same text
    out = tmp_path / "out.jsonl"
    run_main(tiny_llava_dir, [FIX / "test.jsonl"], out, *FAST)
    assert printed.strip() == " ".join(read_jsonl(out)[0]["response"].split())

    with pytest.raises(SystemExit) as e:
        alt_text.main(["--model_name", str(tiny_llava_dir), "--image", str(tmp_path / "none.png")])
    assert e.value.code == 2 and "image file not found" in capsys.readouterr().err


@pytest.mark.parametrize("device, bf16_gpu, stored, expect", [
    ("cpu", False, "bfloat16", "float32"),
    ("cuda", True, "bfloat16", "bfloat16"),
    ("cuda", True, "float16", "bfloat16"),  # float16 only when asked, even for a checkpoint stored in it
    ("cuda", True, None, "bfloat16"),
    ("cuda", False, "float16", "float16"),  # a GPU without bfloat16 keeps the stored dtype
    ("cuda", False, "bfloat16", "float32"),
])
def test_dtype_auto(device, bf16_gpu, stored, expect, monkeypatch):
    from llava.eval.inference import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    assert resolve_dtype("auto", torch.device(device), stored) == getattr(torch, expect)
    assert resolve_dtype("float16", torch.device(device), stored) == torch.float16


def test_stored_dtype_of_a_checkpoint(tiny_llava_dir, tmp_path):
    from llava.eval.inference import stored_dtype

    copy = tmp_path / "bf16"
    shutil.copytree(tiny_llava_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"dtype": "bfloat16"}))
    assert stored_dtype(str(tiny_llava_dir)) == "float32" and stored_dtype(str(copy)) == "bfloat16"
    assert stored_dtype(str(tmp_path / "missing")) is None


def test_only_this_runs_outputs_are_resumed(tiny_llava_dir, reference, tmp_path, capsys):
    """Issue 24, symptoms 1 and 2: an --eval_output that is an input or not an inference output is refused
    (even with --overwrite), as is one written with another model or other decoding or prompt settings;
    each in one line, before the model loads, with nothing changed. A setting that does not change the
    outputs (--batch_size) resumes."""
    files = [FIX / "test.jsonl", FIX / "pope.jsonl"]

    def refused(out, *extra, model=tiny_llava_dir, inputs=files):
        files_now = lambda: {p: p.read_bytes() for p in out.parent.rglob("*") if p.is_file()}  # noqa: E731
        before = files_now()
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_main(model, inputs, out, *KILL_ARGS, *extra)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err, err
        assert files_now() == before
        return err

    test_file = shutil.copy(FIX / "test.jsonl", tmp_path / "test.jsonl")
    assert refused(test_file, inputs=[test_file]) == \
        f"error: --eval_output {test_file} is the input file {test_file}: it would be written over; choose another --eval_output"
    train_file = write_preference_set(tmp_path / "train", n=2, name="train.jsonl")
    assert f"--eval_output {train_file} is not an inference output (line 1 has no response or error): it is not written " \
           "over, not even with --overwrite" in refused(train_file, "--overwrite")

    out = tmp_path / "out.jsonl"  # killed at 3 of 10 records
    out.write_bytes(b"".join(reference.read_bytes().splitlines(keepends=True)[:3]))
    written_like(reference, out)
    other = shutil.copytree(tiny_llava_dir, tmp_path / "other")
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert refused(out, model=other) == f"error: --eval_output {out} was written by another run (differs in " \
                                        "--model_name_or_path): use another --eval_output, or --overwrite to discard it"
    assert "(differs in --max_new_tokens, --num_beams, --version)" in \
        refused(out, "--num_beams", "2", "--max_new_tokens", "5", "--version", "v1")
    run_main(tiny_llava_dir, files, out, *KILL_ARGS, "--batch_size", "4")
    assert out.read_bytes() == reference.read_bytes()
    assert "3 of 10 records already done" in capsys.readouterr().err


def test_records_with_bad_fields_stop_or_are_left_out(tiny_llava_dir, tmp_path, capsys):
    """A test question holding <image> (one placeholder more than the record has images) stops the run before the
    model loads, naming file, record and field; --skip_bad_records leaves it out, counted and listed."""
    rows = [json.loads(line) for line in (FIX / "test.jsonl").read_text().splitlines()][:3]
    rows[1]["question"] = "What is in <image> this picture?"
    src = tmp_path / "bad.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as e:
        run_main(tiny_llava_dir, [src], out, *FAST)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{src}, record 1, line 2, field 'question': <image>" in err
    assert not out.exists()

    run_main(tiny_llava_dir, [src], out, "--skip_bad_records", *FAST)
    assert [r["idx"] for r in read_jsonl(out)] == [rows[0]["idx"], rows[2]["idx"]]
    assert "--skip_bad_records: left out 1 records with bad fields" in capsys.readouterr().err
    listed = [json.loads(line) for line in (tmp_path / "out.jsonl.skipped_records").read_text().splitlines()]
    assert [(r["record"], r["field"]) for r in listed] == [(1, "question")]
