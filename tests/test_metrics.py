import numpy as np
import pytest

from sorter.train.metrics import confusion_matrix, evaluate_predictions, expected_calibration_error


def test_confusion_and_per_class_scores_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[predicted] * 0.8 + 0.2 / 3
    ev = evaluate_predictions(probs, labels, ["a", "b", "c"])
    np.testing.assert_array_equal(confusion_matrix(labels, predicted, 3), [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    assert ev.accuracy == pytest.approx(4 / 6)
    a, b, c = ev.per_class
    assert (a.precision, a.recall) == (pytest.approx(1.0), pytest.approx(2 / 3))
    assert (b.precision, b.recall) == (pytest.approx(0.5), pytest.approx(0.5))
    assert (c.precision, c.recall) == (pytest.approx(0.5), pytest.approx(1.0))
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 / 1.5]
    assert ev.macro_f1 == pytest.approx(np.mean(f1))
    assert ev.n == 6 and a.support == 3


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_not():
    conf = np.array([0.75] * 4)
    assert expected_calibration_error(conf, np.array([1, 1, 1, 0], bool)) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([0.99] * 4), np.array([1, 0, 0, 0], bool)) == pytest.approx(0.74)
    # two bins: (0.9, all right) and (0.6, half right) -> 0.5*0.1 + 0.5*0.1
    conf = np.array([0.9, 0.9, 0.6, 0.6])
    assert expected_calibration_error(conf, np.array([1, 1, 1, 0], bool)) == pytest.approx(0.1)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError):
        evaluate_predictions(np.ones((3, 2)) / 2, np.array([0, 1]), ["a", "b"])


def test_temperature_on_a_perfectly_separated_set_keeps_confidence_below_one():
    """Validation data with no errors pushes the NLL-optimal temperature to 0 (every confidence 1.000: the
    review threshold could never fire). The fit keeps the mean confidence at or below the Laplace estimate
    of the accuracy, (correct + 1) / (n + 2), so confidences stay honest about a finite sample."""
    import torch

    from sorter.train.calibrate import fit_temperature

    torch.manual_seed(0)
    labels = torch.arange(200) % 4
    logits = torch.randn(200, 4) + 6 * torch.nn.functional.one_hot(labels, 4)  # all correct, margins vary
    t = fit_temperature(logits, labels)
    confidence = torch.softmax(logits / t, dim=1).max(dim=1).values
    assert float(confidence.mean()) <= (200 + 1) / (200 + 2) + 1e-4
    assert float(confidence.min()) < 0.99 and float(confidence.max()) < 1.0
