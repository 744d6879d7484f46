#!/usr/bin/env python
"""Generate alt-text for test records: a thin front for llava.eval.inference (see its docstring).

    python mcmdpo_inference.py --model_name_or_path PATH --data_path FILE [FILE ...] --output OUT.jsonl
    torchrun --nproc_per_node N mcmdpo_inference.py ...
    llava-mcmdpo infer ...                                 (the same flags)

The released names --model_name, --test_datasets, --eval_output and --conv_mode still work.
"""

from llava.eval.inference import main

if __name__ == "__main__":
    main()
