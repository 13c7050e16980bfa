"""Command-line front end (placeholder until the train command lands)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradaccum", description=__doc__)
    parser.parse_args(argv)
    parser.print_help()
    return 0
