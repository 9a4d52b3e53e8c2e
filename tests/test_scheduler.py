"""The torch-free admission policy: FIFO, budgets, head-of-line blocking, slot bookkeeping."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bitdance_core.engine.scheduler import (
    Admitted,
    RejectReason,
    Scheduler,
    SchedulerConfig,
    StepPlan,
    Ticket,
)

_counter = iter(range(10**9))


def tk(rid: str, rows: int = 1, seq_len: int = 10) -> Ticket:
    return Ticket(request_id=rid, rows=rows, seq_len=seq_len, arrival=float(next(_counter)))


def make(total_rows: int = 8, max_seq_len: int = 100, max_batch_requests: int = 16, max_waiting: int = 64):
    return Scheduler(SchedulerConfig(total_rows, max_seq_len, max_batch_requests, max_waiting))


def check_invariants(s: Scheduler) -> None:
    total = s.config.total_rows
    assert s.used_rows + s.free_rows == total
    seen: set[int] = set()
    for rid in s.running_ids():
        slots = s.slots_of(rid)
        assert list(slots) == sorted(slots)
        assert all(0 <= x < total for x in slots)
        assert seen.isdisjoint(slots), f"slot double-allocated to {rid}"
        seen.update(slots)
    assert len(seen) == s.used_rows
    assert s.num_running <= s.config.max_batch_requests
    assert s.num_waiting <= s.config.max_waiting
    assert set(s.waiting_ids()).isdisjoint(s.running_ids())
    assert s.kv_usage() == pytest.approx(s.used_rows / total)


def test_import_does_not_import_torch():
    code = "import sys, bitdance_core.engine.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)


def test_config_validation():
    with pytest.raises(ValueError):
        SchedulerConfig(total_rows=0, max_seq_len=10)
    with pytest.raises(ValueError):
        SchedulerConfig(total_rows=1, max_seq_len=0)
    with pytest.raises(ValueError):
        SchedulerConfig(total_rows=1, max_seq_len=1, max_batch_requests=0)
    with pytest.raises(ValueError):
        SchedulerConfig(total_rows=1, max_seq_len=1, max_waiting=-1)


def test_fifo_admission_and_lowest_slots():
    s = make(total_rows=8)
    for rid, rows in [("a", 2), ("b", 1), ("c", 3)]:
        assert s.submit(tk(rid, rows)) is None
    assert s.waiting_ids() == ["a", "b", "c"]
    assert [s.queue_position(r) for r in "abc"] == [0, 1, 2]
    plan = s.schedule()
    assert isinstance(plan, StepPlan)
    assert plan.admitted == [Admitted("a", (0, 1)), Admitted("b", (2,)), Admitted("c", (3, 4, 5))]
    assert plan.running == ["a", "b", "c"]
    assert s.used_rows == 6 and s.free_rows == 2 and s.kv_usage() == pytest.approx(0.75)
    assert s.queue_position("a") is None
    # a freed hole is reused lowest-first
    s.finish("b")
    s.submit(tk("d", 2))
    plan = s.schedule()
    assert plan.admitted == [Admitted("d", (2, 6))]
    assert plan.running == ["a", "c", "d"]
    check_invariants(s)


def test_empty_schedule():
    s = make()
    assert s.schedule() == StepPlan(admitted=[], running=[])


def test_row_budget_respected():
    s = make(total_rows=4)
    for i in range(4):
        s.submit(tk(f"r{i}", 2))
    plan = s.schedule()
    assert [a.request_id for a in plan.admitted] == ["r0", "r1"]
    assert s.free_rows == 0 and s.waiting_ids() == ["r2", "r3"]
    assert s.schedule().admitted == []
    s.finish("r0")
    plan = s.schedule()
    assert plan.admitted == [Admitted("r2", (0, 1))]
    assert plan.running == ["r1", "r2"]
    check_invariants(s)


def test_max_batch_requests_respected():
    s = make(total_rows=100, max_batch_requests=3)
    for i in range(5):
        s.submit(tk(f"r{i}"))
    plan = s.schedule()
    assert [a.request_id for a in plan.admitted] == ["r0", "r1", "r2"]
    assert s.num_running == 3 and s.num_waiting == 2
    s.cancel("r1")
    plan = s.schedule()
    assert [a.request_id for a in plan.admitted] == ["r3"]
    assert plan.running == ["r0", "r2", "r3"]
    check_invariants(s)


def test_head_of_line_blocks_then_runs():
    s = make(total_rows=8)
    s.submit(tk("small0", 2))
    s.submit(tk("small1", 2))
    s.schedule()
    s.submit(tk("big", 8))
    s.submit(tk("late", 1))
    # 4 rows free: "late" would fit, but "big" is at the head and must not be overtaken
    plan = s.schedule()
    assert plan.admitted == [] and s.waiting_ids() == ["big", "late"]
    s.finish("small0")
    assert s.schedule().admitted == []
    s.finish("small1")
    plan = s.schedule()
    assert plan.admitted == [Admitted("big", tuple(range(8)))]
    assert s.waiting_ids() == ["late"] and s.queue_position("late") == 0
    s.finish("big")
    assert s.schedule().admitted == [Admitted("late", (0,))]


def test_no_starvation_under_stream_of_small_requests():
    s = make(total_rows=6)
    s.submit(tk("s0", 2))
    s.submit(tk("s1", 2))
    s.schedule()
    s.submit(tk("big", 6))
    admitted_big_at = None
    for step in range(50):
        s.submit(tk(f"x{step}", 1))
        plan = s.schedule()
        if any(a.request_id == "big" for a in plan.admitted):
            admitted_big_at = step
            break
        # finish the oldest running request each step
        if s.running_ids():
            s.finish(s.running_ids()[0])
    assert admitted_big_at is not None and admitted_big_at <= 3


def test_queue_full_and_too_large():
    s = make(total_rows=4, max_seq_len=100, max_waiting=2)
    assert s.submit(tk("a")) is None
    assert s.submit(tk("b")) is None
    assert s.submit(tk("c")) is RejectReason.QUEUE_FULL
    assert s.waiting_ids() == ["a", "b"]
    assert s.submit(tk("huge", rows=5)) is RejectReason.TOO_LARGE  # too large wins over full
    assert s.submit(tk("long", seq_len=101)) is RejectReason.TOO_LARGE
    assert RejectReason.QUEUE_FULL == "queue_full" and RejectReason.TOO_LARGE.value == "too_large"
    s.schedule()  # frees the waiting queue
    assert s.submit(tk("c")) is None
    # limits exactly at capacity are fine
    assert s.submit(tk("edge", rows=4, seq_len=100)) is None
    assert s.queue_position("huge") is None and s.queue_position("c") == 0


def test_too_large_with_empty_queue_and_zero_waiting():
    s = make(total_rows=2, max_waiting=0)
    assert s.submit(tk("big", rows=3)) is RejectReason.TOO_LARGE
    assert s.submit(tk("ok", rows=1)) is RejectReason.QUEUE_FULL
    assert s.num_waiting == 0


def test_rejected_ids_can_be_resubmitted():
    s = make(total_rows=2, max_waiting=1)
    s.submit(tk("a"))
    assert s.submit(tk("b")) is RejectReason.QUEUE_FULL
    s.schedule()
    assert s.submit(tk("b")) is None


def test_duplicate_and_invalid_submit():
    s = make()
    s.submit(tk("a"))
    with pytest.raises(ValueError):
        s.submit(tk("a"))
    s.schedule()
    with pytest.raises(ValueError):
        s.submit(tk("a"))  # running
    s.finish("a")
    assert s.submit(tk("a")) is None  # finished ids may be reused
    with pytest.raises(ValueError):
        s.submit(tk("z", rows=0))
    with pytest.raises(ValueError):
        s.submit(tk("z", seq_len=0))


def test_cancel_waiting_and_running():
    s = make(total_rows=4)
    s.submit(tk("a", 3))
    s.submit(tk("b", 3))
    s.submit(tk("c", 1))
    s.schedule()
    assert s.running_ids() == ["a"] and s.waiting_ids() == ["b", "c"]
    assert s.cancel("b") is True
    assert s.waiting_ids() == ["c"] and s.queue_position("c") == 0
    assert s.cancel("a") is True
    assert s.free_rows == 4 and s.num_running == 0
    with pytest.raises(KeyError):
        s.slots_of("a")
    assert s.cancel("a") is False
    assert s.cancel("nope") is False
    plan = s.schedule()
    assert plan.admitted == [Admitted("c", (0,))]
    check_invariants(s)


def test_finish_frees_slots_and_unknown_raises():
    s = make(total_rows=4)
    s.submit(tk("a", 4))
    s.schedule()
    assert s.slots_of("a") == (0, 1, 2, 3) and s.kv_usage() == 1.0
    s.finish("a")
    assert s.free_rows == 4 and s.used_rows == 0 and s.kv_usage() == 0.0
    with pytest.raises(KeyError):
        s.finish("a")
    s.submit(tk("w"))
    with pytest.raises(KeyError):
        s.finish("w")  # waiting, not running
    assert s.waiting_ids() == ["w"]


def test_random_operations_keep_invariants():
    rng = random.Random(1234)
    cfg = SchedulerConfig(total_rows=12, max_seq_len=64, max_batch_requests=5, max_waiting=10)
    s = Scheduler(cfg)
    n = 0
    known: list[str] = []
    rows_of: dict[str, int] = {}
    counts = {"accepted": 0, "queue_full": 0, "too_large": 0, "admitted": 0}
    for _ in range(2000):
        op = rng.random()
        if op < 0.4:
            rid = f"q{n}"
            n += 1
            rows = rng.choice([1, 1, 2, 2, 4, 6, 8, 12, 13])
            seq_len = rng.choice([8, 32, 64, 65])
            before = s.waiting_ids()
            r = s.submit(tk(rid, rows, seq_len))
            if rows > 12 or seq_len > 64:
                assert r is RejectReason.TOO_LARGE
            elif len(before) >= 10:
                assert r is RejectReason.QUEUE_FULL
            else:
                assert r is None
                assert s.waiting_ids() == [*before, rid]
                known.append(rid)
                rows_of[rid] = rows
            counts[r.value if r else "accepted"] += 1
        elif op < 0.55 and known:
            rid = rng.choice(known)
            was_active = rid in s.waiting_ids() or rid in s.running_ids()
            assert s.cancel(rid) is was_active
        elif op < 0.8 and s.running_ids():
            s.finish(rng.choice(s.running_ids()))
        else:
            head = s.waiting_ids()
            free_before = s.free_rows
            plan = s.schedule()
            ids = [a.request_id for a in plan.admitted]
            assert ids == head[: len(ids)]  # strict FIFO prefix
            assert sum(len(a.slots) for a in plan.admitted) == free_before - s.free_rows
            assert plan.running == s.running_ids()
            # stopped only because the head does not fit (or the batch is full, or queue empty)
            if s.waiting_ids() and s.num_running < cfg.max_batch_requests:
                assert rows_of[s.waiting_ids()[0]] > s.free_rows
            counts["admitted"] += len(ids)
        check_invariants(s)
    assert all(v > 0 for v in counts.values()), counts
    # drain: everything accepted and not cancelled eventually runs and finishes
    for _ in range(1000):
        if not s.num_waiting and not s.num_running:
            break
        s.schedule()
        check_invariants(s)
        for rid in s.running_ids():
            s.finish(rid)
    assert s.num_waiting == 0 and s.num_running == 0
    assert s.free_rows == cfg.total_rows and s.used_rows == 0


def test_no_state_growth():
    s = make(total_rows=6, max_batch_requests=4, max_waiting=8)
    rng = random.Random(7)
    submitted = 0
    while submitted < 200 or s.num_waiting or s.num_running:
        while submitted < 200 and s.num_waiting < 8:
            assert s.submit(tk(f"g{submitted}", rng.randint(1, 6))) is None
            submitted += 1
        s.schedule()
        running = s.running_ids()
        for rid in running[: max(1, len(running) // 2)]:
            s.finish(rid)
        check_invariants(s)
    assert s.waiting_ids() == [] and s.running_ids() == []
    assert s.free_rows == 6
    for name, value in vars(s).items():
        if isinstance(value, (dict, set)):
            assert len(value) == 0, name
        elif isinstance(value, list):
            assert sorted(value) == list(range(6)), name  # the free list, fully returned


def test_prefill_row_budget_spreads_admission_over_steps():
    s = Scheduler(SchedulerConfig(total_rows=64, max_seq_len=10, max_batch_requests=16, max_waiting=16,
                                  max_prefill_rows=5))
    for i in range(5):
        assert s.submit(Ticket(f"r{i}", 2, 5, i)) is None
    assert [a.request_id for a in s.schedule().admitted] == ["r0", "r1"]
    assert [a.request_id for a in s.schedule().admitted] == ["r2", "r3"]
    assert s.submit(Ticket("big", 8, 5, 9)) is None  # larger than the budget: admitted alone when first
    assert [a.request_id for a in s.schedule().admitted] == ["r4"]
    assert [a.request_id for a in s.schedule().admitted] == ["big"]
