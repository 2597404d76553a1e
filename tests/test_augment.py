"""RandAugment plans follow the official (timm) RandAugment: n ops drawn with replacement from the op
list, each applied with probability 0.5 (statistical checks over many seeded plans)."""
from math import comb

import numpy as np
import pytest

from s4v.data.augment import RA_CHOICES, RA_IDENTITY, RA_OPS, parse_rand_augment, plan_sample
from s4v.data.config import DataConfig

DRAWS = 3000


def applied_counts(spec: str) -> tuple[np.ndarray, list[int]]:
    """Number of applied (non-identity) ops per view, and every applied op, over DRAWS sample keys."""
    cfg = DataConfig(rand_augment=spec, flip=False, grayscale_prob=0.0)
    counts, ops = [], []
    for i in range(DRAWS):
        view = plan_sample(cfg, f"clip{i}", 0, 16, 64, 80, True, epoch=0).views[0]
        applied = [op for op, _ in view.ra if op != RA_IDENTITY]
        counts.append(len(applied))
        ops += applied
    return np.array(counts), ops


def chi_square(observed: np.ndarray, expected_p: np.ndarray) -> float:
    expected = expected_p * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


def test_each_op_applied_with_probability_one_half():
    n = 4
    counts, ops = applied_counts(f"rand-m7-n{n}-mstd0.5-inc1")
    observed = np.bincount(counts, minlength=n + 1)
    binomial = np.array([comb(n, k) for k in range(n + 1)]) / 2 ** n
    # chi-square with 4 degrees of freedom: 18.5 is the 0.1 % critical value. Applying all n ops (the
    # old behaviour) gives ~Binomial(4, 13/14) here, a statistic in the thousands.
    assert chi_square(observed, binomial) < 18.5, observed
    assert abs(counts.mean() - n / 2) < 0.1
    # the applied ops are spread evenly over the 13 real ops (12 degrees of freedom: 0.1 % at 32.9)
    per_op = np.bincount(ops, minlength=len(RA_OPS))[RA_CHOICES]
    assert chi_square(per_op, np.full(len(RA_CHOICES), 1 / len(RA_CHOICES))) < 32.9, per_op


def test_probability_one_applies_every_op_and_is_reproducible():
    counts, _ = applied_counts("rand-m7-n3-p1.0")
    assert (counts == 3).all()
    cfg = DataConfig(rand_augment="rand-m7-n4-mstd0.5-inc1")
    assert plan_sample(cfg, "k", 0, 16, 64, 80, True, 3).views == plan_sample(cfg, "k", 0, 16, 64, 80, True, 3).views


def test_probability_in_the_spec():
    assert parse_rand_augment("rand-m7-n4-mstd0.5-inc1").p == 0.5
    assert parse_rand_augment("rand-m7-n4-p0.25").p == 0.25
    with pytest.raises(ValueError, match="probability"):
        parse_rand_augment("rand-m7-n4-p1.5")
