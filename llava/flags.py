"""The command lines' parser: no prefix matching, and an unknown flag answered with the closest known ones.

    p = FlagParser(description=...)      # argparse.ArgumentParser, allow_abbrev=False
    p.parse_args(["--num_beam", "3"])    # error: unrecognized arguments: --num_beam 3 (did you mean --num_beams?)
"""

from __future__ import annotations

import argparse
import difflib


class FlagParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False  # --max_step is not --max_steps
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """argparse's error (usage, message, exit 2), with the closest flags named for each unknown one."""
        if message.startswith("unrecognized arguments:"):
            known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
            hints = []
            for word in message.split(":", 1)[1].split():
                if word.startswith("--"):
                    close = difflib.get_close_matches(word.split("=", 1)[0], known, n=3, cutoff=0.75)
                    if close:
                        hints.append(f"{word.split('=', 1)[0]}: did you mean {' or '.join(close)}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)
