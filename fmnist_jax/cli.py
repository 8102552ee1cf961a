"""A command line generated from a frozen dataclass: every field is a ``--flag``.

Booleans take ``--flag``, ``--flag=false`` or ``--noflag``; tuples take comma-separated
values. ``--preset=NAME`` starts from a named preset and the other flags override it. A bad
flag or value ends the program with one line naming it and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import typing

from fmnist_jax.config import PRESETS, Config, preset


def quiet_library_logs() -> None:
    """Command-line tools report failures themselves, in one line: the libraries' own log
    records (Orbax's, through absl) would only repeat them with tracebacks."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)


def output_pipe_closed() -> int:
    """After a ``BrokenPipeError`` on stdout (``fmnist-predict ... | head``): stdout goes to
    ``/dev/null``, so that nothing fails again at exit, and the exit status is the one of a
    Unix tool stopped by SIGPIPE (141)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + signal.SIGPIPE


class _Parser(argparse.ArgumentParser):
    _argv: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} ({self._fix(message)})\n")

    def _fix(self, message: str) -> str:
        """``fmnist-evaluate runs/cnn`` or ``fmnist-predict runs/cnn shoe.png``: a run's
        directory given without its flag."""
        if "--workdir" in self._option_string_actions:
            stray = message.removeprefix("unrecognized arguments: ")
            if message.startswith("unrecognized arguments: ") and " " not in stray:
                words = [stray]
            elif message == "the following arguments are required: --workdir":
                words = self._bare_words()
            else:
                words = []
            for word in words:
                if os.path.isdir(word):
                    return f"for a run's directory: --workdir={word}"
        return "see --help"

    def _bare_words(self) -> list[str]:
        """The words of the command line that are not flags or the values of flags."""
        words, takes_value = [], False
        for word in self._argv:
            if not takes_value and not word.startswith("-"):
                words.append(word)
            action = self._option_string_actions.get(word)
            takes_value = action is not None and action.nargs != 0
        return words


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _parser_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if type(None) in typing.get_args(annotation) and len(args) == 1:  # X | None
        annotation = args[0]
    if annotation is bool:
        return _bool
    if typing.get_origin(annotation) is tuple:
        return _int_tuple
    return annotation


def _show(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return repr(value) if value == "" else str(value)


def build_parser(cls=Config, prog: str = "fmnist-train", description: str = "",
                 presets: bool = True) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description or cls.__doc__)
    if presets:
        parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                            help="start from a named setup; other flags override it: "
                                 + "; ".join(f"{k}: {v or 'the defaults'}"
                                             for k, v in PRESETS.items()))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _parser_type(hints[f.name])
        help_text = f"{f.metadata.get('help', '')} (default: {_show(f.default)})"
        choices = f.metadata.get("choices")
        # A flag given alone: true for a bool, a field's declared value otherwise; its
        # --no form gives false or 0.
        bare = True if kind is _bool else f.metadata.get("bare")
        parser.add_argument(f"--{f.name}", type=kind, choices=choices,
                            default=argparse.SUPPRESS, help=help_text,
                            metavar=None if choices else f.name.upper(),
                            **({} if bare is None else {"nargs": "?", "const": bare}))
        if bare is not None:
            parser.add_argument(f"--no{f.name}", dest=f.name, action="store_const",
                                const=type(bare)(), default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    """Parses ``argv`` (default ``sys.argv[1:]``) into a validated :class:`Config`."""
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    name = args.pop("preset", None)
    config = preset(name, **args) if name else Config(**args)
    return config.validate()
