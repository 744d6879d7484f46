"""The released scripts' entry point, ``deepspeed llava/train/train_mem.py ...``: the same trainer as ``train.py``.

LLaVA's ``train_mem.py`` is ``train.py`` with FlashAttention-2. Here the attention kernel is
``--attn_implementation`` (auto by default (llava.model.attention): tree-packed batches need a kernel that takes a mask),
so both names run the same code and a released command line runs unchanged.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (deepspeed/torchrun llava/train/train_mem.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llava.train.train import main

if __name__ == "__main__":
    main()
