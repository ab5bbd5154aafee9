"""The medautolabel command: main (parser, errors, signals) and one module per command."""

from medautolabel.cli.app import build_parser, main, run

__all__ = ["build_parser", "main", "run"]
