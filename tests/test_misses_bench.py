"""benchmarks/misses.py: each miss gets the kind its trials show, and a run sorts every setting."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_script

from graphs.plan import Plan

misses = load_script("misses")

OPTIMUM = Plan.allocation({"stage1": ("m-3b", 16), "stage2": ("m-70b", 4)})


def plan(first: tuple[str, int], second: tuple[str, int]) -> Plan:
    return Plan.allocation({"stage1": first, "stage2": second})


def test_within_half_a_point_is_reached_whatever_ran() -> None:
    assert misses.classify(OPTIMUM, 0.80, [(plan(("m-8b", 2), ("m-8b", 2)), 0.796)]) == "reached"


def test_the_optimums_models_at_other_counts_are_counts_when_best_and_lost_when_not() -> None:
    right_models = plan(("m-3b", 64), ("m-70b", 2))
    other = plan(("m-8b", 8), ("m-70b", 4))
    assert misses.classify(OPTIMUM, 0.80, [(other, 0.70), (right_models, 0.75)]) == "counts"
    assert misses.classify(OPTIMUM, 0.80, [(other, 0.76), (right_models, 0.75)]) == "lost"


def test_models_that_ran_on_their_stages_but_never_together_are_apart() -> None:
    ran = [(plan(("m-3b", 16), ("m-8b", 4)), 0.70), (plan(("m-8b", 4), ("m-70b", 4)), 0.72)]
    assert misses.classify(OPTIMUM, 0.80, ran) == "apart"


def test_a_stage_whose_optimal_model_never_ran_there_is_unseen() -> None:
    ran = [(plan(("m-3b", 16), ("m-8b", 4)), 0.70), (plan(("m-70b", 4), ("m-3b", 16)), 0.72)]  # 70B ran, on stage 1
    assert misses.classify(OPTIMUM, 0.80, ran) == "unseen"
    assert misses.classify(OPTIMUM, 0.80, []) == "unseen"


def test_a_run_sorts_every_setting_and_seed_and_the_table_counts_them() -> None:
    outcomes = misses.run("insight", [(2, 2)], [0.05, 0.5], [0, 1], trials=6, by=6)
    assert len(outcomes) == 4 and {(m.budget, m.seed) for m in outcomes} == {(b, s) for b in (0.05, 0.5) for s in (0, 1)}
    for m in outcomes:
        assert m.kind in misses.KINDS and m.stages == 2
        assert m.regret >= -1e-6
        assert (m.kind == "reached") == (m.regret <= 0.5 + 1e-6)
    table = misses.table(outcomes)
    assert table[-1].startswith("| all | 4 | ")
    assert sum(int(cell) for cell in table[-1].strip("|").split("|")[2:]) == 4


def test_bad_arguments_name_the_problem(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        misses.main(["--simulated-seeds", "x-y"])
    assert "--simulated-seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        misses.main(["--by", "30", "--trials", "20"])
    assert "--by" in capsys.readouterr().err
