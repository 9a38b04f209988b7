"""`uffdsnap doctor`: placeholder until the doctor lands."""

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    return 0
