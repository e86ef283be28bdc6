"""Temporary shim while common.py is written in two parts (merged into one file before landing)."""
from common_core import *  # noqa: F401,F403
from common_data import *  # noqa: F401,F403
