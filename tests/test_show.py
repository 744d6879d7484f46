"""``python -m llava.data.show``: what a record trains on, as text and as JSON, and its errors."""

import io
import json
from contextlib import redirect_stderr, redirect_stdout

from llava.method import CONDITION_NAMES as CONDITIONS
from llava.data import show
from llava.data.records import read_records


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = show.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_text_form_marks_exactly_the_trained_answer(tiny_llava_dir, preference_file):
    record = read_records(preference_file, "preference")[2]
    code, out, _ = run(preference_file, "--model", tiny_llava_dir, "--image_folder", preference_file.parent, "--index", 2)
    assert code == 0
    assert [line.split(" ")[1] for line in out.splitlines() if line.startswith("--- ")] == list(CONDITIONS)
    first = out.split("--- ")[1]
    assert "USER: <image>\n" in first and first.count("<image>") == 1
    assert first.rstrip().endswith(f"ASSISTANT:[[ {record.chosen}</s>]]")
    assert out.count(f"[[ {record.rejected}</s>]]") == 4  # the four y_l conditions


def test_json_has_one_image_id_and_masked_prompt(tiny_llava_dir, preference_file):
    tok = __import__("transformers").AutoTokenizer.from_pretrained(tiny_llava_dir)
    code, out, _ = run(preference_file, "--model", tiny_llava_dir, "--image_folder", preference_file.parent, "--task", "sft",
                       "--index", 0, "--json")
    assert code == 0
    seq = json.loads(out)["sft"]
    ids, labels = seq["input_ids"], seq["labels"]
    assert ids.count(-200) == 1 and ids[0] == tok.bos_token_id
    trained = [t for t, label in zip(ids, labels) if label != -100]
    assert trained == ids[len(ids) - len(trained):]  # one trained run at the end
    assert tok.decode(trained) == read_records(preference_file, "preference")[0].chosen + "</s>"


def test_test_prompt_is_the_released_inference_prompt(tiny_llava_dir, preference_file):
    code, out, _ = run(preference_file, "--model", tiny_llava_dir, "--task", "test", "--all")
    assert code == 0
    prompts = out.split("=== ")[1:]
    assert len(prompts) == len(read_records(preference_file, "test"))
    assert all("curious human" in p and p.rstrip().endswith("\n ASSISTANT:") for p in prompts)
    _, no_newline, _ = run(preference_file, "--model", tiny_llava_dir, "--task", "test", "--prompt_newline", "False")
    question = read_records(preference_file, "test")[0].question
    assert no_newline.rstrip().endswith(f"{question} ASSISTANT:")


def test_bad_index_is_one_line_naming_the_file(tiny_llava_dir, preference_file):
    code, out, err = run(preference_file, "--model", tiny_llava_dir, "--index", 99)
    assert code == 2 and out == ""
    assert err.strip() == f"error: {preference_file}: --index 99 is out of range: the file has 6 records"


def test_a_full_strategy_checkpoint_shows_what_training_fits(preference_file, tmp_path):
    """``full`` keeps CLS: one image token more, which ``--model_max_length`` must leave room for. With room
    for exactly the ``default`` count, show (as training) shortens the question of a ``full`` checkpoint."""
    from llava.model.load import save_model
    from llava.model.tiny import SIZES, build

    dirs = {}
    for strategy in ("default", "full"):
        model, processor = build("llava", seed=0)
        model.config.vision_feature_select_strategy = processor.vision_feature_select_strategy = strategy
        dirs[strategy] = save_model(model, processor, tmp_path / strategy)
    args = (preference_file, "--image_folder", preference_file.parent, "--task", "sft", "--index", 1, "--json")
    _, out, _ = run(*args, "--model", dirs["default"])
    fit = len(json.loads(out)["sft"]["input_ids"]) - 1 + SIZES["tiny"].image_tokens  # the image's tokens in place of -200
    lengths = {}
    for strategy, d in dirs.items():
        code, out, err = run(*args, "--model", d, "--model_max_length", fit)
        assert code == 0, err
        lengths[strategy] = len(json.loads(out)["sft"]["input_ids"])
    assert lengths["default"] == fit - SIZES["tiny"].image_tokens + 1
    assert lengths["full"] < lengths["default"]  # a word of the question less: the CLS token took its place
