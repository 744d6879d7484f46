#!/usr/bin/env python
"""Score inference outputs: a thin front for llava.eval.score (see its docstring).

    python get_score.py --data_path A.jsonl [B.jsonl ...] | --dir DIR  [--output_dir DIR] [--metrics coco|published|all]
    llava-mcmdpo score ...                                 (the same flags)

The earlier names --file and --out_dir still work.
"""

from llava.eval.score import main

if __name__ == "__main__":
    main()
