"""The budget of a run, without a clock: step counts, time budgets, warmup, the compile decision, undertrained."""

import pytest

from yunque.train.budget import COMPILE_GAIN, COMPILE_SECONDS, StepBudget, compile_pays, undertrained


def test_a_step_count_is_fixed():
    b = StepBudget(total=100, start_step=20, start_time=0.0)
    assert not b.done(99) and b.done(100)
    assert not b.observe(30, 3.0) and b.total == 100
    assert b.seconds_left(30, 3.0) == pytest.approx(70 * 0.3)  # steps left at the measured speed


def test_a_time_budget_is_measured_then_fixed_at_half_time():
    b = StepBudget(total=None, seconds=100.0, start_time=0.0)
    assert not b.done(10**6)  # unknown until measured
    assert b.observe(10, 2.0) and b.total == 10 + 490  # 5 steps/s, 98 s left
    assert not b.observe(15, 2.5)  # re-estimated every 10 steps only
    b.observe(20, 60.0)  # slowed down: past half the budget, fixed now
    fixed = b.total
    assert fixed == 20 + int(40 * 20 / 60)
    assert not b.observe(30, 61.0) and b.total == fixed and b.done(fixed)


def test_the_clock_restarts_after_a_slow_compiled_step():
    b = StepBudget(total=None, seconds=100.0, start_time=0.0)
    b.restart_clock(11, 40.0)  # step 11 compiled for 40 s
    assert not b.observe(15, 41.0)
    b.observe(21, 42.0)  # 10 steps in 2 s since the restart: 5 steps/s for the 58 s left
    assert b.total == 21 + 290


def test_warmup_is_at_most_a_fifth_of_the_run():
    assert StepBudget(total=1000).warmup(100) == 100
    assert StepBudget(total=95).warmup(100) == 19  # a 95-step time budget no longer ends inside warmup
    assert StepBudget(total=3).warmup(100) == 1
    assert StepBudget(total=None, seconds=60.0).warmup(100) == 100  # until measured
    assert StepBudget(total=50).warmup(0) == 0


def test_compiling_pays_only_with_enough_time_left():
    threshold = COMPILE_SECONDS / COMPILE_GAIN
    assert compile_pays(threshold + 1) and not compile_pays(threshold - 1) and not compile_pays(None)


def test_undertrained_runs_are_named():
    assert "inside its 100-step warmup" in undertrained(22, 100, 8.3, 7.9)
    assert "barely fell" in undertrained(500, 50, 5.0, 4.8)
    assert undertrained(500, 50, 5.0, 2.0) is None
