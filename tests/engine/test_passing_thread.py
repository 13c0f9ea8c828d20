"""in_passing_thread: the function runs in a thread of its own that has ended when the call returns."""

import threading

import pytest

from yunque.engine.scheduler import in_passing_thread


def test_it_returns_what_the_function_returns_from_a_thread_that_has_ended():
    seen = []

    def fn(a, b):
        seen.append(threading.current_thread())
        return a + b

    assert in_passing_thread(fn, 2, 3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_it_raises_the_functions_exception_in_the_caller():
    def fn():
        raise ValueError("bad spec")

    with pytest.raises(ValueError, match="bad spec"):
        in_passing_thread(fn)
