#!/usr/bin/env python
"""Score inference outputs: a thin front for llava.eval.score (see its docstring).

    python get_score.py --file A.jsonl [B.jsonl ...] | --dir DIR  [--out_dir DIR] [--metrics coco|published|all]
"""

from llava.eval.score import main

if __name__ == "__main__":
    main()
