"""The trainer reaches transformers' Trainer through public hooks: no override of a private method to break on an upgrade."""

from transformers import Trainer

from llava.train.trainer import LlavaTrainer

# Private Trainer methods a subclass may override, and why.
ALLOWED = {"_get_train_sampler"}  # LLaVA's grouped sampler: the Trainer's hook for a custom training sampler
# Still overridden, with the reason in the method: resuming LoRA without DeepSpeed (the Trainer loads an adapter
# only into a model that is itself a PeftModel).
KEPT = {"_load_from_checkpoint"}


def private_overrides(cls) -> set[str]:
    """The names of the Trainer's private methods that ``cls`` or a class between it and Trainer defines."""
    mro = cls.__mro__
    return {name for klass in mro[:mro.index(Trainer)] for name in vars(klass)
            if name.startswith("_") and not name.startswith("__") and callable(getattr(Trainer, name, None))}


def test_the_trainer_overrides_no_private_trainer_method():
    assert private_overrides(LlavaTrainer) - ALLOWED == KEPT


def test_a_private_override_is_seen_in_a_subclass_too():
    class Patched(LlavaTrainer):
        def _save_checkpoint(self, model, trial):
            pass

        def _own_helper(self):  # not the Trainer's
            pass

    assert private_overrides(Patched) - ALLOWED == KEPT | {"_save_checkpoint"}
