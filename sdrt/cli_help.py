"""What ``sdrt --help`` looks like: defaults shown, examples kept as written, ``--version`` and ``-v``
for every subcommand. Generic, so each subcommand (serve included) gets the same help by using ``sub.add_parser``."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help (unless it has none, or the help says it); text with line
    breaks (the examples epilogs) kept as written, one-paragraph descriptions wrapped."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and action.default != ""
        if action.option_strings and shown and "%(default)" not in text and "default" not in text:
            text += " (default: %(default)s)"
        return text

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with ``HelpFormatter``; subcommand parsers (``sub.add_parser``) get it too."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


class VersionAction(argparse.Action):
    """``--version``: sdrt's version and the runtimes this install finds (sdrt.info.version_text)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from sdrt.info import version_text

        print(version_text())
        parser.exit()


def examples(*lines: str, note: str = "") -> str:
    """An ``epilog`` listing example command lines, then an optional note."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines) + (f"\n\n{note}" if note else "")


def add_verbose(parser: argparse.ArgumentParser, sub) -> None:
    """``-v`` (INFO logs) / ``-vv`` (sdrt's DEBUG logs), before or after the command name."""
    what = "more output: -v library INFO logs, -vv sdrt's debug logs (default: warnings only)"
    parser.add_argument("-v", "--verbose", action="count", default=0, help=what)
    for p in sub.choices.values():
        if not any("-v" in a.option_strings for a in p._actions):
            p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=what)
