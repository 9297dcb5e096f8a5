"""What the command-line tools print: errors as one actionable line, and no noise about intended behaviour.

- ``one_line_errors``: a user's mistake (``hpl_lightning.errors``) becomes ``error: ...`` and exit status 2.
- ``ShortErrors``: an argument parser mixin that prints a parse error first, with the closest valid option names
  for a mistyped one (``--model.lr`` -> ``--model.optim.lr``), and leaves the ~100 lines of usage to ``--help``.
- ``quiet()``: targeted filters for messages that describe this package's design (the frozen reference is in eval
  mode, checkpoints hold only the trainable weights) or nothing a user can act on. Anything else still shows.
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator, NoReturn, Sequence

from jsonargparse import ArgumentParser

from hpl_lightning.errors import DataError, UserError


@contextmanager
def one_line_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turns a ``UserError`` (and ``kinds``) raised inside into one line on stderr and exit status 2: ``error:
    invalid data: FILE:LINE: field ...`` for data, ``error: MESSAGE`` for the rest."""
    try:
        yield
    except DataError as e:
        print(f"error: invalid data: {e}", file=sys.stderr)
        sys.exit(2)
    except (UserError, *kinds) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def closest_keys(unknown: str, keys: Sequence[str], n: int = 3) -> list[str]:
    """The valid keys nearest to a mistyped one: those with the same last part (``model.lr`` -> ``model.optim.lr``),
    or else the closest spellings (``trainer.max_epoch`` -> ``trainer.max_epochs``)."""
    leaf = unknown.rsplit(".", 1)[-1]
    same_leaf = sorted((k for k in keys if k.rsplit(".", 1)[-1] == leaf),
                       key=lambda k: -difflib.SequenceMatcher(None, unknown, k).ratio())
    return same_leaf[:n] or difflib.get_close_matches(unknown, keys, n=n, cutoff=0.6)


# How jsonargparse names an unknown option: "unrecognized arguments: --model.lr 1" (command line) or
# "does not accept option 'model.lr'" / "... key 'model.lr'" (config files).
_UNKNOWN_KEY = re.compile(r"unrecognized arguments: --([\w.-]+)|(?:option|key) '([\w.-]+)'")


def _option_keys(parser) -> list[str]:
    """Every option a parser takes, as dotted keys (``model.optim.lr``), without help/config actions."""
    skip = {"help", "config", "print_config"}
    return [a.dest for a in parser._actions if a.dest not in skip and not a.dest.endswith(".help")]


class ShortErrors:
    """Mixin for a jsonargparse ``ArgumentParser``: ``error: MESSAGE``, a hint, and where the full usage is."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        lines = [f"error: {message}"]
        match = _UNKNOWN_KEY.search(message)
        if match:
            unknown = (match.group(1) or match.group(2)).split("=", 1)[0]
            suggestions = closest_keys(unknown, _option_keys(parser))
            if suggestions:
                lines.append("did you mean: " + ", ".join(f"--{k}" for k in suggestions) + "?")
        lines.append(f"all options: {parser.prog.replace(' [options]', '')} --help")
        sys.stderr.write("\n".join(lines) + "\n")
        self.exit(2)


class ShortErrorParser(ShortErrors, ArgumentParser):
    """jsonargparse's parser with short errors, for ``jsonargparse.CLI(..., parser_class=ShortErrorParser)``."""


# (logger, message prefix) of log records that say nothing a user can act on.
_QUIET_LOGS = (
    # bitsandbytes, imported with peft (LoRA) and for QLoRA, looks for an optional accelerated 4-bit kernel package
    # on CPU. Quantized training on CPU is a test setting only.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging"),  # an advertisement
)
# Warning messages (regex from the start) that describe this package's design.
_QUIET_WARNINGS = (
    # Checkpoints hold the trainable weights only (HPLModule._drop_frozen_state); on_load_checkpoint checks those
    # are all there, so the keys reported missing are the frozen reference (and the frozen LoRA base).
    r"Found keys that are in the model state dict but not in the checkpoint",
    r"Found \d+ module\(s\) in eval mode at the start of training",  # the frozen reference, by design
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning; nothing to do for a user
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet() -> None:
    """Installs the filters above (idempotent). Called on importing the package, before bitsandbytes loads."""
    for name, prefix in _QUIET_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
