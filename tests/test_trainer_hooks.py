"""The trainer reaches transformers' Trainer through public hooks: no override of a private method to break on an upgrade."""

import pytest
import torch
from transformers import Trainer, TrainerControl, TrainerState

from llava.model.weights import hub_name
from llava.train.saving import CheckpointWriter, take_saved_names
from llava.train.step import ScoringModel
from llava.train.trainer import LlavaTrainer

# Private Trainer methods a subclass may override, and why.
ALLOWED = {"_get_train_sampler"}  # LLaVA's grouped sampler: the Trainer's hook for a custom training sampler


def private_overrides(cls) -> set[str]:
    """The names of the Trainer's private methods that ``cls`` or a class between it and Trainer defines."""
    mro = cls.__mro__
    return {name for klass in mro[:mro.index(Trainer)] for name in vars(klass)
            if name.startswith("_") and not name.startswith("__") and callable(getattr(Trainer, name, None))}


def test_the_trainer_overrides_no_private_trainer_method():
    assert private_overrides(LlavaTrainer) - ALLOWED == set()


def test_a_private_override_is_seen_in_a_subclass_too():
    class Patched(LlavaTrainer):
        def _save_checkpoint(self, model, trial):
            pass

        def _own_helper(self):  # not the Trainer's
            pass

    assert private_overrides(Patched) - ALLOWED == {"_save_checkpoint"}


# -- checkpoints are written where the Trainer would write them: after the step's log entry and evaluation --


class RecordingWriter(CheckpointWriter):
    def __init__(self):
        super().__init__(trainer=None)
        self.saved_at = []

    def _save(self, control):
        self.due = None
        self.saved_at.append(self.event)


def run_events(writer, events):
    """Feed the writer ``(event, control flags, logs)`` as the Trainer's loop would; returns where it saved."""
    state = TrainerState(global_step=0)
    writer.on_train_begin(None, state, TrainerControl())
    for event, flags, logs in events:
        writer.event = event
        if event == "step_end":
            state.global_step += 1
        control = TrainerControl(**flags)
        getattr(writer, f"on_{event}")(None, state, control, **({"logs": logs} if event == "log" else {"metrics": {}}))
        if event in ("step_end", "epoch_end"):
            assert not control.should_save  # taken from the Trainer: it does not write this checkpoint itself
    return writer.saved_at


def test_a_checkpoint_waits_for_the_log_entry_and_the_evaluation_of_its_step():
    assert run_events(RecordingWriter(), [("step_end", {"should_save": True}, None)]) == ["step_end"]
    logged = [("step_end", {"should_save": True, "should_log": True}, None), ("log", {}, {"loss": 1.0})]
    assert run_events(RecordingWriter(), logged) == ["log"]
    evaluated = [("step_end", {"should_save": True, "should_log": True, "should_evaluate": True}, None),
                 ("log", {}, {"loss": 1.0}), ("log", {}, {"eval_loss": 1.0}), ("evaluate", {}, None)]
    assert run_events(RecordingWriter(), evaluated) == ["evaluate"]
    # at an epoch's end, the step's entry is already logged: nothing more comes before the save
    epoch_end = [("step_end", {"should_log": True}, None), ("log", {}, {"loss": 1.0}),
                 ("epoch_end", {"should_save": True, "should_log": True}, None)]
    assert run_events(RecordingWriter(), epoch_end) == ["epoch_end"]


# -- full-weight resume: the Trainer hands the model it holds the saved file's names ------------------------


def test_saved_names_load_into_the_scoring_model():
    """llava-hf names (a saved model.safetensors, the tied head left out as saved), in-memory names (an engine
    checkpoint) and the older ``llava.``-prefixed ones all load the same tensors; a foreign name is refused."""
    from llava.model.tiny import build

    model = ScoringModel(build("llava", seed=0)[0])
    model.register_load_state_dict_pre_hook(take_saved_names)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(own) == set(model.llava.state_dict())  # the wrapper's names are the LLaVA model's own
    target = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in own.items()}
    tied = model.llava.config.get_text_config().tie_word_embeddings
    for names in ({hub_name(k): v for k, v in target.items() if not (tied and k == "lm_head.weight")}, dict(target),
                  {"llava." + k: v for k, v in target.items()}):
        model.load_state_dict(own)
        model.load_state_dict(names)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in target.items())
    with pytest.raises(ValueError, match=r"not this model's: 1 unknown, e.g. head.weight"):
        model.load_state_dict({**target, "head.weight": torch.zeros(1)})
