"""The inference benchmark (benchmarks/bench_infer.py): its released loop feeds the model what the
toolkit feeds it, and its quick run reports every variant with equal outputs. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_infer.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_infer  # noqa: E402


def test_released_embeds_equal_the_toolkit_prompt(tiny_llava_dir):
    """The released loop's prompt (LLaVA's names: conv_templates, tokenizer_image_token, process_images,
    image features spliced at IMAGE_TOKEN_INDEX) is the toolkit's prompt, embedding for embedding."""
    from PIL import Image

    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates, get_template
    from llava.data.images import ImageProcessor
    from llava.eval.generate import build_prompt
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.forward import embed
    from llava.model.load import load_model

    model, processor = load_model(tiny_llava_dir)
    model.eval()
    tok = processor.tokenizer
    image = Image.open(REPO / "tests" / "fixtures" / "inference" / "images" / "img1.png").convert("RGB")
    question = "Given an image and context, generate alt-text for the image.\nContext:\nOur new office dog"
    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + question + "\n")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tok, IMAGE_TOKEN_INDEX, return_tensors="pt")
    prompt = build_prompt(tok, get_template("llava_v1"), question, ImageProcessor(processor, "pad")(image))
    with torch.no_grad():
        released = bench_infer.released_embeds(model, ids, process_images([image], processor, model.config))
        toolkit = embed(model, torch.tensor([prompt.input_ids]), prompt.image.pixel_values[None])
    assert released.shape == toolkit.shape
    assert torch.equal(released, toolkit)


def test_arguments(monkeypatch):
    a = bench_infer.parse_args(["--device", "cuda", "--batch_sizes", "8", "16"])
    assert a.dtype == "bfloat16" and a.batch_sizes == [1, 8, 16]  # the inference command's auto; batch 1 always runs
    q = bench_infer.parse_args(["--quick"])
    assert (q.records, q.batch_sizes, q.max_new_tokens, q.dtype) == (4, [1, 2, 4], 4, "float32")
    assert bench_infer.variants_of([1, 8]) == [("b1_beams3", 1, 3), ("b8_beams3", 8, 3), ("b1_greedy", 1, 1),
                                               ("b8_greedy", 8, 1)]
    # both refusals, whichever machine runs this (no work starts before them)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench_infer.main(["--device", "cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match="a GPU is present"):
        bench_infer.main(["--device", "cpu"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_run(tmp_path):
    out = tmp_path / "infer.json"
    # the CPU run on any machine (with a GPU visible the benchmark refuses --device cpu)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out), "--workdir", str(tmp_path / "w")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    names = {"released", "b1_beams3", "b2_beams3", "b4_beams3", "b1_greedy", "b2_greedy", "b4_greedy"}
    assert set(res["runs"]) == set(res["records_per_second"]) == names
    for name, run in res["runs"].items():
        assert run["records"] == 4 and run["seconds"] > 0
        assert res["records_per_second"][name] == pytest.approx(4 / run["seconds"])
        lines = (tmp_path / "w" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 4 and all("response" in json.loads(x) for x in lines)
    rps = res["records_per_second"]
    assert res["speedup_vs_released"] == pytest.approx({k: v / rps["released"] for k, v in rps.items() if k != "released"})
    # batched outputs are batch 1's, and the toolkit's beams are the released loop's
    assert res["outputs_equal"] and all(res["outputs_equal"].values()), res["outputs_equal"]
    assert "b1_beams3 == released" in res["outputs_equal"]
    p = res["phases"]
    assert p["records"] == 4 and p["image_tokens"] == 576 and 0 <= p["padding_share"] < 1
    assert p["image_encoder_s"] > 0 and p["prompt_s"] > 0 and p["prompt_once_per_beam_s"] > 0
    assert res["target"]["speedup"] is None  # the quick run has no batch of 8
    assert res["checks"] == {"answers_non_empty": True, "empty_answers": dict.fromkeys(names, 0), "logits_finite": True}
    assert "--quick" in proc.stdout or "records/s" in proc.stdout
