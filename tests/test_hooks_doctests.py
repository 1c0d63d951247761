"""The examples in diffprobe.hooks' docstrings run and give what they show."""

import doctest

import pytest

import diffprobe.hooks.registry
import diffprobe.hooks.sites


@pytest.mark.parametrize("module", [diffprobe.hooks.registry, diffprobe.hooks.sites])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
