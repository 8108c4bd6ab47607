"""What the tests share: fixtures (registered once, as plugins, by ``tests/conftest.py``) and
helpers. Stand-ins of outside services are in ``tests/standins``."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The checkout: the working directory of every process the tests start."""
