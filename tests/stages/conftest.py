"""Stage tests share the session fixture `tiny_run` and the overrides `TINY` from tests/conftest.py."""

from tests.conftest import TINY  # noqa: F401
