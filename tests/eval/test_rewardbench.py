"""RewardBench's scoring rules on fixtures whose expected scores are computed by hand in the comments."""

from __future__ import annotations

import math

import pytest

from rm_trainer.eval.rewardbench import (
    EXAMPLE_COUNTS,
    SECTIONS,
    is_v1,
    ties_score,
    v1_sections,
    v2_prompt_result,
    v2_scores,
)


def test_v1_sections_weight_subsets_by_their_full_sizes_and_math_as_much_as_code():
    acc = {"alpacaeval-easy": 0.5, "mt-bench-hard": 1.0, "refusals-dangerous": 1.0, "math-prm": 0.25,
           "hep-python": 0.75}
    got = v1_sections(acc)
    # Reasoning: (0.25 * 984 + 0.75 * 164) / (984 + 164) = 369 / 1148
    assert got["sections"]["Reasoning"] == pytest.approx(100 * 369 / 1148, rel=1e-12)
    assert got["sections"] == pytest.approx({"Chat": 50.0, "Chat Hard": 100.0, "Safety": 100.0,
                                             "Reasoning": 100 * 369 / 1148}, rel=1e-12)
    assert got["score"] == pytest.approx((50 + 100 + 100 + 100 * 369 / 1148) / 4, rel=1e-12)  # 70.5357...
    # Chat with two subsets: (1.0 * 100 + 0.0 * 28) / 128
    assert v1_sections({"alpacaeval-easy": 1.0, "mt-bench-easy": 0.0})["sections"]["Chat"] == pytest.approx(78.125)
    assert EXAMPLE_COUNTS["math-prm"] == sum(EXAMPLE_COUNTS[s] for s in SECTIONS["Reasoning"][1:])
    assert is_v1({"hep-go", "donotanswer"}) and not is_v1({"hep-go", "mine"}) and not is_v1(set())


def test_v2_prompt_counts_only_when_chosen_beats_every_rejected_and_shares_ties():
    assert v2_prompt_result([2.0, 1.0, 0.0, 1.0]) == 1.0
    assert v2_prompt_result([2.0, 2.0, 1.0, 0.0]) == 0.5  # tied for the top with one other: 1/2
    assert v2_prompt_result([2.0, 2.0, 2.0, 0.0]) == pytest.approx(1 / 3)
    assert v2_prompt_result([0.0, 1.0, 2.0, 3.0]) == 0.0
    assert v2_prompt_result([1.0, 3.0, 0.0, 0.0]) == 0.0


def test_ties_subset_score_by_hand():
    rows = [{"id": "ref:1", "scores": [3.0, 1.0, 2.0], "num_correct": 1},   # right; gap 3 - 2 = 1
            {"id": "tied:1", "scores": [5.0, 4.0, 1.0], "num_correct": 2},  # right; spread 1, gap 4 - 1 = 3
            {"id": "ref:2", "scores": [1.0, 2.0], "num_correct": 1},        # wrong; gap -1
            {"id": "tied:2", "scores": [4.0, 2.0, 3.0], "num_correct": 2}]  # wrong; spread 2, gap 2 - 3 = -1
    # accuracy: ref 1/2, tied 1/2; correctness preferred: [3 > 1, -1 > 2] -> 1/2;
    # hard: [min(1, 3) > 1, min(-1, -1) > 2] -> 0; margin: mean(tanh(1/1 - 1), tanh(-1/2 - 1)) = tanh(-1.5) / 2
    want = 0.3 * 0.5 + 0.3 * 0.5 + 0.2 * 0.5 + 0.2 * 0.0 + 0.01 * math.tanh(-1.5) / 2
    assert ties_score(rows) == pytest.approx(want, rel=1e-12)  # 0.39547...
    # equal correct answers: 0/0 counts 0, x/0 saturates like numpy's inf
    flat = [{"id": "ref:1", "scores": [2.0, 1.0], "num_correct": 1}, {"id": "tied:1", "scores": [3.0, 3.0, 1.0],
                                                                     "num_correct": 2}]
    assert ties_score(flat) == pytest.approx(0.3 + 0.3 + 0.2 + 0.2 + 0.01 * 1.0, rel=1e-12)


def test_v2_score_is_the_mean_of_subset_scores():
    prompts = [{"subset": "Math", "id": 0, "num_correct": 1, "scores": [2.0, 1.0, 0.0, 1.0]},
               {"subset": "Math", "id": 1, "num_correct": 1, "scores": [2.0, 2.0, 1.0, 0.0]},
               {"subset": "Focus", "id": 2, "num_correct": 1, "scores": [0.0, 1.0, 2.0, 3.0]},
               {"subset": "Ties", "id": "ref:1", "num_correct": 1, "scores": [3.0, 1.0, 2.0]},
               {"subset": "Ties", "id": "tied:1", "num_correct": 2, "scores": [5.0, 4.0, 1.0]}]
    got = v2_scores(prompts)
    # Math (1 + 0.5) / 2 = 0.75; Focus 0; Ties: all right, spread 1 < gap 3, min(1, 3) = 1 !> 1, tanh(1/1 - 1) = 0
    ties = 0.3 + 0.3 + 0.2 + 0.0 + 0.0
    assert got["subsets"]["Math"]["score"] == 0.75 and got["subsets"]["Focus"]["score"] == 0.0
    assert got["subsets"]["Ties"]["score"] == pytest.approx(ties, rel=1e-12)
    assert got["score"] == pytest.approx(100 * (0.75 + 0.0 + ties) / 3, rel=1e-12)
