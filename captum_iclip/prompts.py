"""Prompts as the commands read them: the one parser of ``--prompts`` and ``--prompts-file``.

``--prompts`` is one CSV record: commas separate prompts, and a prompt that holds a
comma is quoted as in a CSV file (``--prompts '"a cat, with a hat",a dog'``; a quote
inside a quoted prompt is doubled). ``--prompts-file FILE`` holds one prompt per line,
UTF-8; blank lines and lines starting with ``#`` are skipped. An empty prompt (two
commas in a row, a trailing comma, a blank quoted entry) is an error, never dropped.
Every command that takes prompts (``explain``, ``audit``, ``diagnose``) adds them with
:func:`add_prompt_arguments` and reads them with :func:`prompts_from_args`.

Examples::

    >>> parse_prompts('"a cat, with a hat",a dog')
    ['a cat, with a hat', 'a dog']
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

PROMPTS_HELP = (
    'comma-separated prompts, quoted as in CSV when one holds a comma: "a cat,a dog" or '
    "'\"a cat, with a hat\",a dog' (required unless --prompts-file)"
)
PROMPTS_FILE_HELP = "a UTF-8 text file with one prompt per line; blank lines and lines starting with # are skipped"


def parse_prompts(text: str, argument: str = "--prompts") -> list[str]:
    """The prompts of one CSV record (see the module docstring); a ``ValueError`` naming ``argument``.

    Examples::

        >>> parse_prompts("a cat, a dog")
        ['a cat', 'a dog']
    """
    if not isinstance(text, str):
        raise TypeError(f"{argument}: expected a string of comma-separated prompts, got {type(text).__name__}")
    if "\n" in text or "\r" in text:
        raise ValueError(
            f"{argument}: expected prompts on one line (use --prompts-file for one per line), got {text!r}"
        )
    try:
        rows = list(csv.reader([text], skipinitialspace=True, strict=True))
    except csv.Error as error:
        raise ValueError(
            f'{argument}: expected comma-separated prompts with CSV quoting ("a cat, with a hat",a dog), '
            f"got {text!r}: {error}"
        ) from None
    fields = [field.strip() for field in (rows[0] if rows else [])]
    if not any(fields):
        raise ValueError(f'{argument}: expected comma-separated prompts, e.g. {argument} "a cat,a dog", got {text!r}')
    empty = [i + 1 for i, field in enumerate(fields) if not field]
    if empty:
        raise ValueError(
            f"{argument}: expected a non-empty text for every prompt, got an empty prompt at position "
            f"{', '.join(map(str, empty))} of {len(fields)} in {text!r} (two commas in a row or a trailing comma?)"
        )
    return fields


def read_prompts_file(path: str | Path, argument: str = "--prompts-file") -> list[str]:
    """The prompts of a file: one per line, UTF-8 (a BOM is allowed), ``#`` lines and blank lines skipped."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as error:
        raise ValueError(
            f"{argument}: expected a readable text file, got {str(path)!r}: {error.strerror or error}"
        ) from None
    except UnicodeDecodeError as error:
        line = text_line_of(Path(path).read_bytes(), error.start)
        raise ValueError(
            f"{argument}: expected a UTF-8 text file, got {str(path)!r}, which is not UTF-8 (line {line})"
        ) from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(
            f"{argument}: expected at least one prompt line (not blank, not starting with #), got none in {str(path)!r}"
        )
    return prompts


def text_line_of(data: bytes, offset: int) -> int:
    """The 1-based line number of byte ``offset``."""
    return data.count(b"\n", 0, offset) + 1


def add_prompt_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--prompts`` and ``--prompts-file``, at most one of them, and one of them when ``required``
    (read by :func:`prompts_from_args`)."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--prompts", metavar="TEXTS", help=PROMPTS_HELP)
    group.add_argument("--prompts-file", metavar="FILE", help=PROMPTS_FILE_HELP)


def prompts_from_args(args: argparse.Namespace) -> list[str]:
    """The prompts of the options of :func:`add_prompt_arguments`."""
    if getattr(args, "prompts_file", None) is not None:
        return read_prompts_file(args.prompts_file)
    return parse_prompts(args.prompts)
