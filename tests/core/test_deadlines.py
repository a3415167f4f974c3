"""`Deadlines` against a brute-force reference: a dict and min()."""

from __future__ import annotations

import random

import pytest

from supervisor.core.deadlines import COMPACT_SLACK, Deadlines


def test_the_earliest_deadline_comes_first_and_ties_go_in_key_order() -> None:
    deadlines: Deadlines[str] = Deadlines()
    deadlines.set("b", 5.0)
    deadlines.set("a", 5.0)
    deadlines.set("c", 1.0)
    assert deadlines.earliest() == 1.0
    assert deadlines.pop_due(0.5) is None
    assert [deadlines.pop_due(5.0) for _ in range(4)] == ["c", "a", "b", None]
    assert deadlines.earliest() is None and len(deadlines) == 0


def test_a_moved_or_cancelled_deadline_no_longer_counts() -> None:
    deadlines: Deadlines[str] = Deadlines()
    deadlines.set("a", 1.0)
    deadlines.set("b", 2.0)
    deadlines.set("a", 3.0)
    assert deadlines.earliest() == 2.0 and deadlines.get("a") == 3.0
    deadlines.discard("b")
    deadlines.discard("b")
    assert "b" not in deadlines and deadlines.earliest() == 3.0
    assert deadlines.pop_due(2.5) is None
    assert deadlines.pop_due(3.0) == "a"


def test_the_heap_stays_within_a_constant_factor_of_the_deadlines_held() -> None:
    deadlines: Deadlines[int] = Deadlines()
    for key in range(10):
        deadlines.set(key, 100.0)
    for step in range(10_000):
        deadlines.set(step % 10, 100.0 + step)  # a lease renewed again and again
    assert len(deadlines._heap) <= 2 * len(deadlines) + COMPACT_SLACK + 1
    assert deadlines.earliest() == min(deadlines.as_dict().values())


@pytest.mark.parametrize("seed", range(30))
def test_random_operations_agree_with_a_brute_force_reference(seed: int) -> None:
    rng = random.Random(seed)
    deadlines: Deadlines[tuple[int, str]] = Deadlines()
    reference: dict[tuple[int, str], float] = {}
    now = 0.0
    for _ in range(3000):
        key = (rng.randrange(2), f"k{rng.randrange(40)}")
        roll = rng.random()
        if roll < 0.5:
            when = now + rng.choice((0.0, 0.5, 1.0, 2.0, 7.5))
            deadlines.set(key, when)
            reference[key] = when
        elif roll < 0.7:
            deadlines.discard(key)
            reference.pop(key, None)
        else:
            now += rng.choice((0.0, 0.5, 1.0, 3.0))
            due = sorted((when, k) for k, when in reference.items() if when <= now)
            popped = []
            while (k := deadlines.pop_due(now)) is not None:
                popped.append(k)
            assert popped == [k for _, k in due]
            for k in popped:
                del reference[k]
        assert deadlines.as_dict() == reference
        assert deadlines.earliest() == min(reference.values(), default=None)
        assert len(deadlines) == len(reference)
