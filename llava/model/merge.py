"""Merge a saved LoRA adapter into its base model and save the result as a plain HF checkpoint.

    llava-mcmdpo merge --model_name_or_path ADAPTER_DIR [--model_base BASE] --output_dir MERGED_DIR [--dtype ...]
    python -m llava.model.merge ...   (the same flags)

The merged directory loads with transformers alone (``AutoModelForImageTextToText``), without peft.
The base is ``--model_base``, else the one the adapter's ``adapter_config.json`` records.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from llava.flags import FlagParser
from llava.constants import DTYPES


def merge_adapter(adapter: str | Path, model_base: str | Path | None, out_dir: str | Path, dtype: str = "auto") -> Path:
    """Load ``adapter`` on its base with the LoRA weights folded in, and save it to ``out_dir``."""
    from llava.model.load import ModelLoadError, checkpoint_kind, load_model, parse_dtype, save_model

    kind = checkpoint_kind(adapter)
    if kind != "lora":
        raise ModelLoadError(f"{adapter}: not a LoRA adapter (no adapter_config.json; it is a {kind} checkpoint): "
                             "nothing to merge")
    model, processor = load_model(adapter, model_base, dtype=parse_dtype(dtype), merge_lora=True)
    return save_model(model, processor, out_dir)


def build_parser(prog: str = "python -m llava.model.merge") -> argparse.ArgumentParser:
    p = FlagParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", "--model_name", "--model_path", "--model-path", dest="model_name_or_path",
                   required=True, metavar="ADAPTER", help="LoRA adapter directory (as training with --lora_enable saves it)")
    p.add_argument("--model_base", default=None, help="base model (default: the one the adapter records)")
    p.add_argument("--output_dir", "--out", dest="output_dir", required=True, help="directory to write the merged model to")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="precision to merge and save in (default auto: as stored)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llava.model.load import ModelLoadError

    try:
        out = merge_adapter(args.model_name_or_path, args.model_base, args.output_dir, args.dtype)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    main()
