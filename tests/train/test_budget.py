"""The budget of a run, without a clock: step counts, time budgets, warmup, the compile decision, undertrained."""

import pytest

from yunque.train.budget import (
    COMPILE_GAIN,
    COMPILE_SECONDS,
    FP32_SHORT_RUN,
    SHORT_RUN_MINUTES,
    StepBudget,
    compile_pays,
    short_run_choice,
    undertrained,
)


def test_a_step_count_is_fixed():
    b = StepBudget(total=100, start_step=20, start_time=0.0)
    assert not b.done(99) and b.done(100)
    assert not b.observe(30, 3.0) and b.total == 100
    assert b.seconds_left(30, 3.0) == pytest.approx(70 * 0.3)  # steps left at the measured speed


def test_a_time_budget_follows_the_speed_to_the_end():
    b = StepBudget(total=None, seconds=300.0, start_time=0.0)
    assert not b.done(10**6)  # unknown until measured
    assert b.observe(10, 2.0) and b.total == 10 + 1490  # 5 steps/s, 298 s left
    assert not b.observe(15, 2.5)  # re-estimated every 10 steps only
    for step in range(20, 140, 10):  # the machine slows down to 1 step/s (another job started)
        b.observe(step, 2.0 + (step - 10))
    # at step 130, 122 s in, the speed over the last re-estimates is 1 step/s: 178 steps are left, and the run
    # ends on time (step 308, at 300 s) instead of at the first estimate's step 1500, 1300 s in
    assert b.total == 130 + 178


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


def test_a_short_fp32_budget_chooses_the_short_run_recipe():
    choice = short_run_choice(0.3, fp32_cpu=True, preset="mini", given=set())
    assert choice == FP32_SHORT_RUN
    assert choice["d_ff"] == 256 and choice["n_kv_head"] == 2 and choice["seq_len"] == 64
    assert short_run_choice(SHORT_RUN_MINUTES, fp32_cpu=True, preset="mini", given={"preset"}) == FP32_SHORT_RUN


def test_bf16_long_budgets_step_counts_and_other_shapes_choose_nothing():
    assert short_run_choice(0.3, fp32_cpu=False, preset="mini", given=set()) == {}  # bf16: preset and defaults
    assert short_run_choice(SHORT_RUN_MINUTES * 1.5, fp32_cpu=True, preset="mini", given=set()) == {}
    assert short_run_choice(None, fp32_cpu=True, preset="mini", given=set()) == {}  # --max-steps or the default
    assert short_run_choice(0.3, fp32_cpu=True, preset="small", given={"preset"}) == {}  # tuned for mini only
    for shape_flag in ("d_model", "n_layer", "n_head", "d_ff", "n_kv_head"):
        assert short_run_choice(0.3, fp32_cpu=True, preset="mini", given={shape_flag}) == {}


def test_flags_given_win_over_the_choice():
    choice = short_run_choice(0.5, fp32_cpu=True, preset="mini", given={"batch_size", "lr"})
    assert "batch_size" not in choice and "lr" not in choice
    assert choice == {k: v for k, v in FP32_SHORT_RUN.items() if k not in ("batch_size", "lr")}
