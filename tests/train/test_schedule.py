"""Learning-rate schedules against their written-out definitions."""
import math

import pytest

from dinowm.schedule import Schedule


def test_warmup_is_linear_for_every_kind():
    for kind in ("constant", "cosine", "wsd"):
        s = Schedule(kind, warmup_steps=4, total_steps=100, min_lr_ratio=0.1, decay_fraction=0.2)
        assert [s.factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine():
    s = Schedule("cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1, decay_fraction=0.2)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.factor(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s.factor(110) == pytest.approx(0.1) and s.factor(500) == pytest.approx(0.1)


def test_warmup_stable_decay():
    s = Schedule("wsd", warmup_steps=0, total_steps=100, min_lr_ratio=0.0, decay_fraction=0.2)
    assert s.factor(0) == s.factor(80) == 1.0
    assert s.factor(90) == pytest.approx(0.5) and s.factor(100) == 0.0


def test_constant_and_same_curve():
    s = Schedule("constant", 0, 10, 0.0, 0.2)
    assert s.factor(0) == s.factor(9) == 1.0
    assert s.same_curve(Schedule("constant", 0, 999, 0.0, 0.2))
    assert not s.same_curve(Schedule("cosine", 0, 10, 0.0, 0.2))
