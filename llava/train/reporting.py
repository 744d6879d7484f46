"""Where training metrics go: wandb that never stops a run for want of a login.

With ``--report_to wandb`` and no credentials (no ``WANDB_API_KEY``, no ``wandb login``), wandb
either prompts on a terminal or stops the run ("No API key configured"). A compute node is rarely
logged in, so the run goes on offline instead and says, once, how to upload it afterwards.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_PROJECT = "llava-mcmdpo"


def wandb_has_credentials() -> bool:
    """Would ``wandb.init`` find an API key (environment, netrc or wandb's settings) without asking?"""
    from wandb.sdk.lib.wbauth import authenticate

    import wandb

    host = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    try:
        return authenticate.authenticate_session(host=host, source="llava.train", prompt=False, update_session=False) is not None
    finally:
        wandb.teardown()  # the check set up wandb's settings: drop them so that wandb.init reads the environment afresh


def prepare_wandb(args) -> str | None:
    """Set up wandb for ``args`` (TrainingArguments) before training; returns the line to print, if any.

    The project is ``WANDB_PROJECT`` (default ``llava-mcmdpo``), the run is named after the output
    directory unless ``--run_name`` says otherwise, and wandb writes under the output directory
    unless ``WANDB_DIR`` is set. Without credentials and with ``WANDB_MODE`` unset, wandb runs
    offline.
    """
    if "wandb" not in (args.report_to or []):
        return None
    os.environ.setdefault("WANDB_PROJECT", DEFAULT_PROJECT)
    os.environ.setdefault("WANDB_DIR", str(Path(args.output_dir).resolve()))
    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)  # wandb writes into it, never creates it
    if not args.run_name or args.run_name == args.output_dir:
        args.run_name = Path(args.output_dir).resolve().name
    if os.environ.get("WANDB_MODE") or wandb_has_credentials():
        return None
    os.environ["WANDB_MODE"] = "offline"
    wandb_dir = Path(os.environ["WANDB_DIR"]) / "wandb"
    return (f"wandb: no API key or login found, logging offline to {wandb_dir}; "
            f"upload later with: wandb sync {wandb_dir}/offline-run-*")
