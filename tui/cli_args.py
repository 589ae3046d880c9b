"""argparse value types shared by dashboard.py, run_suite.py and convert_dataset.py: a bad value becomes a usage
error (exit 2) with a one-line reason instead of a traceback."""

import argparse
import json

from tui.config import valid_resources
from tui.git_repo import validate_tag


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def count(text: str) -> int:
    value = whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def tag(text: str) -> str:
    try:
        return validate_tag(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("invalid --tag ", "invalid tag ")) from None


def resources(text: str) -> dict:
    """A Ray resource request as `ray start --resources` takes it: a JSON object of positive amounts."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not valid_resources(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object of positive amounts, e.g. '{{\"GPU\": 1}}'")
    return value
