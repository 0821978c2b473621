"""The unit tier runs torch on one thread. With the tests' tiny BERT (``tiny_run`` in tests/conftest.py), the
only model tests/unit trains, it runs in a minute on any 2-core CPU (docs/development.md, "The unit tier's
time")."""

from __future__ import annotations

import pytest

from tests.helpers import one_torch_thread


@pytest.fixture(autouse=True)
def on_one_torch_thread():
    """Each unit test runs torch on one thread (``one_torch_thread``); tests elsewhere in the process keep theirs."""
    with one_torch_thread():
        yield
