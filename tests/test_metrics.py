import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from aigid.evaluation.metrics import average_precision, binary_metrics, equal_error_rate, roc_auc


@pytest.mark.parametrize("seed", range(5))
def test_matches_scikit_learn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.4 * y, 1)  # rounding makes many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s)  # DeepfakeBench's EER: the FPR at the closest point
    assert equal_error_rate(y, s) == fpr[np.nanargmin(np.abs((1 - tpr) - fpr))]


def test_accuracies_by_class():
    m = binary_metrics([0, 0, 0, 1, 1], [0.1, 0.6, 0.2, 0.9, 0.4])
    assert (m["acc"], m["real_acc"], m["fake_acc"]) == pytest.approx((0.6, 2 / 3, 0.5))
    assert (m["n"], m["n_real"], m["n_fake"]) == (5, 3, 2)


def test_single_class_gives_nan_not_a_crash():
    m = binary_metrics([1, 1], [0.7, 0.2])
    assert np.isnan(m["auroc"]) and np.isnan(m["real_acc"]) and m["fake_acc"] == 0.5


def test_perfect_and_inverted_scores():
    assert roc_auc([0, 1], [0.1, 0.9]) == 1.0 and roc_auc([0, 1], [0.9, 0.1]) == 0.0
    assert equal_error_rate([0, 1], [0.1, 0.9]) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_oracle_accuracy_is_the_best_threshold_by_brute_force(seed):
    from aigid.evaluation.metrics import oracle_accuracy

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    s = np.round(rng.random(40) * 8) / 8  # ties
    acc, threshold = oracle_accuracy(y, s)
    brute = max(((s > t) == y).mean() for t in list(np.unique(s)) + [-np.inf])
    assert acc == pytest.approx(brute)
    assert ((s > threshold) == y).mean() == pytest.approx(acc)  # fake is score > threshold


def test_oracle_accuracy_inverted_scores_calls_everything_real_when_best():
    from aigid.evaluation.metrics import oracle_accuracy

    acc, threshold = oracle_accuracy([0, 0, 0, 1], [0.9, 0.8, 0.7, 0.1])
    assert acc == 0.75 and threshold >= 0.9  # nothing is above it
