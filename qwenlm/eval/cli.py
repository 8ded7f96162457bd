"""Command-line entry points of qwenlm.eval (registered by qwenlm.cli)."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this room's subcommands to the `qwenlm` parser."""
