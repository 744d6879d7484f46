#!/usr/bin/env python
"""Generate alt-text for test records: a thin front for llava.eval.inference (see its docstring).

    python mcmdpo_inference.py --model_name PATH --test_datasets FILE [FILE ...] --eval_output OUT.jsonl
    torchrun --nproc_per_node N mcmdpo_inference.py ...
"""

from llava.eval.inference import main

if __name__ == "__main__":
    main()
