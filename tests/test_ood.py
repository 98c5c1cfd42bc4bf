"""Unknown products: the score, its fitted threshold, and how it routes (no training here)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sorter.model.ood import SCORES, OodMeta, at_threshold, auroc, fit_threshold, ood_scores
from sorter.stream.routing import RoutingTable, StationOverride, decide


@pytest.mark.parametrize("score", SCORES)
def test_a_photo_like_no_trained_product_scores_higher_than_a_clear_one(score):
    clear = torch.tensor([[9.0, 0.5, 0.1, 0.0]])  # one class stands out
    vague = torch.tensor([[1.0, 0.9, 0.8, 1.1]])  # none does
    assert ood_scores(vague, score).item() > ood_scores(clear, score).item()


def test_energy_and_max_logit_also_see_how_strong_the_evidence_is_where_softmax_does_not():
    strong, weak = torch.tensor([[12.0, 2.0, 2.0]]), torch.tensor([[6.0, -4.0, -4.0]])  # same softmax
    assert ood_scores(strong, "msp").item() == pytest.approx(ood_scores(weak, "msp").item(), abs=1e-6)
    assert ood_scores(weak, "energy").item() > ood_scores(strong, "energy").item()
    assert ood_scores(weak, "max_logit").item() > ood_scores(strong, "max_logit").item()


@pytest.mark.parametrize("n", [20, 50, 100, 150, 500, 1000])
def test_the_threshold_lets_exactly_the_target_share_of_known_photos_through_to_review(n):
    """Found in review: a quantile with ``method="higher"`` let floor(2% * (n - 1)) through, so at 50
    calibration photos none, and every fit one photo short of its target."""
    known = np.random.default_rng(n).normal(size=n)
    assert int(np.sum(known > fit_threshold(known, 0.02))) == int(0.02 * n + 1e-9)
    with_nan = np.append(known, np.nan)  # a NaN score is left out, never a NaN threshold
    assert fit_threshold(with_nan, 0.02) == fit_threshold(known, 0.02)
    with pytest.raises(ValueError, match="no known photos"):
        fit_threshold(np.array([np.nan]), 0.02)


def test_auroc_is_the_share_of_unknown_known_pairs_ranked_right_with_ties_half():
    rng = np.random.default_rng(1)
    known, unknown = rng.integers(0, 6, 40).astype(float), rng.integers(2, 9, 30).astype(float)  # many ties
    pairs = [(u > k) + 0.5 * (u == k) for k, u in itertools.product(known, unknown)]
    assert auroc(known, unknown) == pytest.approx(np.mean(pairs))
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0 and np.isnan(auroc(np.array([]), known))
    assert at_threshold(np.array([0.0, 1.0, 3.0]), np.array([2.0, 4.0]), 1.5) == {
        "unknown_caught": 1.0, "known_reviewed": pytest.approx(1 / 3)
    }  # fmt: skip


def test_an_unknown_product_goes_to_review_unless_the_table_or_its_station_says_otherwise():
    table = RoutingTable(
        default_chute="C-99", review_chute="R", routes={"SKU-1": "C-01"},
        stations={"d-off": StationOverride(review_unknown_products=False), "d-7": StationOverride(review_chute="R7")},
    )  # fmt: skip
    assert decide(table, "s1", "SKU-1", "box", 0.99, unknown=True).model_dump() == {
        "chute": "R", "reason": "unknown_product"
    }  # fmt: skip
    assert decide(table, "d-7", "SKU-1", "box", 0.99, unknown=True).chute == "R7"
    assert decide(table, "d-off", "SKU-1", "box", 0.99, unknown=True).reason == "classified"
    assert decide(table, "s1", "SKU-1", "box", 0.99).reason == "classified"
    off = table.model_copy(update={"review_unknown_products": False})
    assert decide(off, "s1", "SKU-1", "box", 0.99, unknown=True).reason == "classified"
    on_here = off.model_copy(update={"stations": {"d": StationOverride(review_unknown_products=True)}})
    assert decide(on_here, "d", "SKU-1", "box", 0.99, unknown=True).reason == "unknown_product"


def test_the_checkpoint_field_refuses_what_would_silently_misroute():
    with pytest.raises(ValueError):
        OodMeta(score="mahalanobis", threshold=1.0, false_review=0.02, fitted_on="calib", photos=10)
    with pytest.raises(ValueError):
        OodMeta(score="energy", threshold=1.0, false_review=0.0, fitted_on="calib", photos=10)
