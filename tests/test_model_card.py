"""Publishable checkpoints: chat template of the training prompt, released decoding, model card, push_to_hub's folder."""

import json
import re
import subprocess
import sys
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
from PIL import Image

from llava.conversation import (ALIASES, TEMPLATES, encode_conversation, encode_prompt, get_template, image_question,
                                image_token_id_of, tokenize_with_images)
from llava.model.chat_template import set_chat_template
from llava.train.arguments import parse_args
from llava.train.model_card import CardFacts, final_metrics, public_flags, render_card
from llava.method import TERMS
from llava.train.train import prepare, train
from tests.conftest import write_preference_set
from tests.test_train import argv, log_history

QUESTION = "Given an image and context, generate alt-text for the image.\nContext:\nA red circle near a tree"


def user(question, image=True):
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]}


def assistant(answer):
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


def saved_processor(tiny_llava_dir, name, out):
    """The tiny model's processor with ``name``'s chat template, saved and loaded back as a user would."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    set_chat_template(processor, get_template(name))
    processor.save_pretrained(out)
    return AutoProcessor.from_pretrained(out)


# -- the chat template -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted({*TEMPLATES, *ALIASES}))
def test_chat_template_writes_the_training_prompt(name, tiny_llava_dir, tmp_path):
    from transformers import AutoTokenizer

    template = get_template(name)
    processor = saved_processor(tiny_llava_dir, name, tmp_path)
    tok = processor.tokenizer
    eos = tok.eos_token if template.answer_ends_with_eos else ""

    prompt = processor.apply_chat_template([user(QUESTION)], add_generation_prompt=True)
    assert prompt == template.human_text(image_question(QUESTION), first=True)
    # tokenized as LLaVA tokenizes (pieces split at <image>), that text gives the training encoder's prompt ids
    image_id = image_token_id_of(tok)
    assert tokenize_with_images(tok, prompt, image_id) == encode_prompt(tok, template, image_question(QUESTION))

    turns = [user(QUESTION), assistant("A red circle."), user("Is it large?", image=False), assistant("No.")]
    text = processor.apply_chat_template(turns)
    assert text == template.render([(image_question(QUESTION), "A red circle."), ("Is it large?", "No.")])
    assert text.count(tok.eos_token) == (2 if eos else 0)  # each answer closed by </s> where the template closes them
    # one turn with its answer, the alt-text record: the text training renders, hence its ids
    one = processor.apply_chat_template(turns[:2])
    assert one == template.render([(image_question(QUESTION), "A red circle.")])
    ids, _ = encode_conversation(tok, template, [(image_question(QUESTION), "A red circle.")])
    assert tokenize_with_images(tok, one, image_id) == ids

    # the tokenizer saved beside it carries the same template; string contents work as LLaVA writes them
    alone = AutoTokenizer.from_pretrained(tmp_path)
    as_string = [{"role": "user", "content": image_question(QUESTION)}]
    assert alone.apply_chat_template(as_string, add_generation_prompt=True, tokenize=False) == prompt


def test_a_system_message_replaces_the_system_prompt(tiny_llava_dir, tmp_path):
    processor = saved_processor(tiny_llava_dir, "v1", tmp_path)
    text = processor.apply_chat_template([{"role": "system", "content": "Be brief."}, user("Q?")], add_generation_prompt=True)
    assert text == "Be brief. USER: <image>\nQ? ASSISTANT:"
    assert processor.apply_chat_template([user("Q?")]) == get_template("v1").system + " USER: <image>\nQ? "


# -- a trained run's directories ---------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_llava_dir, tmp_path_factory):
    """MCM-DPO with five terms, a non-default template, checkpoints at steps 1 and 2 and a held-out set."""
    root = tmp_path_factory.mktemp("card_run")
    data = write_preference_set(root / "data", n=6, seed=3)
    held_out = write_preference_set(root / "data", n=4, seed=4, name="eval.json")
    out = root / "out"
    flags = argv(tiny_llava_dir, data, out, "--task", "DPO", "--use_cross_modal_loss", "True", "--use_cl_reward_num", "5",
                 "--version", "llava_llama_2", "--max_steps", "2", "--learning_rate", "1e-3", "--eval_data_path", held_out,
                 "--eval_strategy", "steps", "--eval_steps", "2")
    flags[flags.index("--save_strategy") + 1] = "steps"
    flags += ["--save_steps", "1"]
    trainer = prepare(flags)
    train(trainer)
    return SimpleNamespace(out=out, data=data, held_out=held_out, trainer=trainer, flags=flags)


def card_of(directory):
    return (directory / "README.md").read_text()


def test_every_saved_directory_is_publishable(run):
    from transformers import AutoProcessor, GenerationConfig

    tok = run.trainer.processing_class.tokenizer
    template = get_template("llava_llama_2")
    for directory in (run.out, run.out / "checkpoint-1", run.out / "checkpoint-2"):
        assert {"README.md", "chat_template.jinja", "generation_config.json", "model.safetensors"} <= {
            p.name for p in directory.iterdir()}, directory
        decoding = GenerationConfig.from_pretrained(directory)
        assert (decoding.num_beams, decoding.do_sample, decoding.max_new_tokens) == (3, False, 256)
        assert (decoding.eos_token_id, decoding.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
        processor = AutoProcessor.from_pretrained(directory)
        prompt = processor.apply_chat_template([user(QUESTION)], add_generation_prompt=True)
        assert prompt == template.human_text(image_question(QUESTION), first=True)


def test_the_card_states_data_flags_method_and_final_metrics(run):
    from huggingface_hub import ModelCard

    card = card_of(run.out)
    meta = ModelCard.load(run.out / "README.md").data
    assert (meta.library_name, meta.pipeline_tag) == ("transformers", "image-text-to-text") and "mcm-dpo" in meta.tags
    assert meta.base_model is None  # a local directory is no Hub id
    assert "trained by MCM-DPO" in card and "conversation template `llava_llama_2`" in card
    assert f"| train | `{run.data}` | 6 |" in card and f"| eval | `{run.held_out}` | 4 |" in card
    # every flag as given, one per line of the command
    for flag in ("--use_cl_reward_num 5", "--version llava_llama_2", f"--eval_data_path {run.held_out}", "--max_steps 2"):
        assert f"    {flag} \\\n" in card, flag
    # the terms --use_cl_reward_num 5 leaves on, with their weights, and those it leaves off
    weights = run.trainer.args.term_weights
    for term, loser in ((t.name, t.loser) for t in TERMS):
        row = f"| {term} | `{loser}` | {weights[term]:g}{'' if weights[term] else ' (off)'} |"
        assert row in card, row
    assert "| all | `cl_ml_yl` | 0 (off) |" in card and "| response | `cw_mw_yl` | 1 |" in card
    last = [h for h in log_history(run.out) if "loss" in h][-1]
    evaluated = [h for h in log_history(run.out) if "eval_loss" in h][-1]
    assert "## Final training metrics (step 2)" in card
    for key in ("loss", "rewards/margins", "mcm/response/margin", "mcm/context_response/accuracy"):
        assert f"| `{key}` | {last[key]:.6g} |" in card, key
    assert "mcm/all/margin" not in card  # off terms are not logged
    assert f"| `eval_loss` | {evaluated['eval_loss']:.6g} |" in card
    assert f"--model_name {run.out} --conv_mode llava_llama_2" in card

    early = card_of(run.out / "checkpoint-1")
    first = [h for h in log_history(run.out) if "loss" in h][0]
    assert "## Final training metrics (step 1)" in early and f"| `loss` | {first['loss']:.6g} |" in early
    assert "eval_loss" not in early  # evaluated at step 2 only


def test_the_cards_transformers_snippet_runs_without_the_toolkit(run, tmp_path):
    code = re.search(r"```python\n(.*?)```", card_of(run.out), re.S).group(1)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (80, 50), "navy").save(photo)
    code = code.replace("'photo.jpg'", repr(str(photo)))
    # random weights never say </s>: 256 new tokens in 3 beams would take a minute; the beams still come from the
    # saved generation_config
    assert "model.generate(**inputs)" in code
    code = code.replace("model.generate(**inputs)", "model.generate(**inputs, max_new_tokens=8)")
    code += "\nassert not any(m == 'llava' or m.startswith('llava.') for m in sys.modules), 'the project was imported'\n"
    code += ("print('generated', out.shape[1] - inputs['input_ids'].shape[1], 'tokens with',"
             " model.generation_config.num_beams, 'beams')\n")
    # -I: isolated mode, the repository is not on sys.path
    result = subprocess.run([sys.executable, "-I", "-c", "import sys\n" + code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated 8 tokens with 3 beams" in result.stdout


# -- push_to_hub uploads the directory as saved --------------------------------------------------


class RecordingHub:
    """Stands in for ``HfApi``: records what each upload would send (the folder's files at that moment)."""

    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, path_in_repo=None, run_as_future=False, **kwargs):
        from pathlib import Path

        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.uploads.append(SimpleNamespace(repo_id=repo_id, folder=folder, files=files, ignore=ignore_patterns,
                                            path_in_repo=path_in_repo))
        done = Future()
        done.set_result(None)
        return done if run_as_future else None


def test_push_to_hub_uploads_the_output_dir_with_card_template_and_decoding(tiny_llava_dir, preference_file, tmp_path,
                                                                            monkeypatch):
    import transformers.trainer

    hub = RecordingHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    out = tmp_path / "run"
    flags = argv(tiny_llava_dir, preference_file, out, "--task", "LM", "--max_steps", "1", "--push_to_hub", "True",
                 "--hub_model_id", "someone/tiny-alt-text")
    flags[flags.index("--save_strategy") + 1] = "steps"
    flags += ["--save_steps", "1"]  # the checkpoint is pushed too (hub_strategy every_save), through output_dir
    train(prepare(flags))
    assert len(hub.uploads) == 2, hub.uploads
    for upload in hub.uploads:
        assert upload.folder == out and {"README.md", "chat_template.jinja", "generation_config.json"} <= set(upload.files)
        assert "checkpoint-*" in upload.ignore
    final = hub.uploads[-1]
    assert final.repo_id == "someone/tiny-alt-text" and final.folder == out and final.path_in_repo is None
    assert {"README.md", "chat_template.jinja", "generation_config.json", "model.safetensors", "config.json",
            "processor_config.json", "tokenizer.json"} <= set(final.files)
    card = final.files["README.md"].decode()
    # this run's card, not the Trainer's generic one, naming the repository to load from
    assert "trained by SFT" in card and "from_pretrained('someone/tiny-alt-text')" in card
    assert card == (out / "README.md").read_text()
    assert json.loads(final.files["generation_config.json"])["num_beams"] == 3
    assert final.files["chat_template.jinja"] == (out / "chat_template.jinja").read_bytes()


def test_a_lora_adapter_and_its_merged_model_are_publishable(tiny_llava_dir, preference_file, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoProcessor, GenerationConfig

    out = tmp_path / "lora"
    train(prepare(argv(tiny_llava_dir, preference_file, out, "--task", "DPO", "--max_steps", "1", "--lora_enable", "True",
                       "--lora_r", "4", "--merge_lora", "True")))
    assert (out / "adapter_config.json").is_file()
    adapter_card = card_of(out)
    assert ModelCard.load(out / "README.md").data.library_name == "peft"
    assert "A LoRA adapter (r 4, alpha 16)" in adapter_card and "PeftModel.from_pretrained(base" in adapter_card
    assert f"--model_name {out} --model_base {tiny_llava_dir}" in adapter_card
    merged_card = card_of(out / "merged")
    assert "trained by DPO" in merged_card and "LoRA" not in merged_card.split("## Method")[0]
    assert ModelCard.load(out / "merged" / "README.md").data.library_name == "transformers"
    for directory in (out, out / "merged"):
        assert GenerationConfig.from_pretrained(directory).num_beams == 3
        prompt = AutoProcessor.from_pretrained(directory).apply_chat_template([user(QUESTION)], add_generation_prompt=True)
        assert prompt == get_template("v1").human_text(image_question(QUESTION), first=True)


# -- the card's pieces ----------------------------------------------------------------------------


def test_the_card_never_records_a_hub_token_or_the_launchers_rank():
    argv = ["--model_name_or_path", "m", "--hub_token", "hf_secret", "--local_rank=1", "--data_path", "d.json",
            "--hub-token=hf_other", "--push_to_hub", "True", "--local_rank", "0", "--seed", "3"]
    assert public_flags(argv) == ("--model_name_or_path", "m", "--data_path", "d.json", "--push_to_hub", "True", "--seed", "3")


@pytest.mark.parametrize("flags,stage,says", [
    (["--task", "LM"], "SFT", "negative log-likelihood of the answer tokens"),
    (["--task", "DPO", "--beta", "0.2"], "DPO", "beta 0.2"),
    (["--task", "DPO", "--use_cross_modal_loss", "True", "--mcm_aggregate", "loss", "--use_image_type", "black"], "MCM-DPO",
     "Corrupted image: `black`"),
])
def test_stage_and_method(flags, stage, says, tmp_path):
    argv = ["--model_name_or_path", "org/llava", "--data_path", "d.json", "--output_dir", str(tmp_path), *flags]
    model_args, data_args, args = parse_args(argv)
    facts = CardFacts.from_run(model_args, data_args, args, argv, "LlavaForConditionalGeneration", 10, None)
    history = [{"loss": 0.5, "step": 3, "epoch": 1.0}, {"train_loss": 0.6, "train_runtime": 9.0, "step": 3, "epoch": 1.0}]
    card = render_card(facts, history, tmp_path)
    assert facts.stage == stage and f"trained by {stage}" in card and says in card
    assert ("| term |" in card) == (stage == "MCM-DPO")
    assert "base_model: org/llava" in card  # a Hub id goes into the metadata
    assert "| train | `d.json` | 10 |" in card and "| eval |" not in card
    assert final_metrics(history) == (3, {"loss": 0.5, "epoch": 1.0, "train_loss": 0.6, "train_runtime": 9.0}, {})
