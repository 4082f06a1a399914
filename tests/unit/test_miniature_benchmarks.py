"""The miniature benchmarks of Omni-ID's claims (benchmarks/few_to_many.py, benchmarks/encoder_table.py) in
--quick mode: the printed per-seed figures, their mean and standard deviation over seeds, the paired tests
and the verdicts agree with one another, and two runs print the same numbers (bitwise repeatable)."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
NUMBER = r"([-+]?\d+\.\d+)"


@pytest.fixture(scope="module")
def outputs():
    """Both scripts' --quick output; few_to_many twice. Run side by side (each uses one thread)."""
    runs = {name: subprocess.Popen([sys.executable, str(BENCHMARKS / script), "--quick"], cwd=BENCHMARKS,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, script in (("f2m_a", "few_to_many.py"), ("f2m_b", "few_to_many.py"),
                                 ("table", "encoder_table.py"))}
    out = {}
    for name, process in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name} failed:\n{stderr[-3000:]}"
        out[name] = stdout
    return out


def result(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1 and text.rstrip().splitlines()[-1] == lines[0]
    return json.loads(lines[0][len("RESULT "):])


def check_summary(per_seed: dict, table: dict, places: int) -> None:
    """The table's mean and std (n - 1) are those of the per-seed figures, to the printed rounding."""
    assert per_seed.keys() == table.keys() and per_seed
    for key, values in per_seed.items():
        values = np.array(values)
        mean, std = table[key]
        tolerance = 10.0 ** -places
        assert abs(mean - values.mean()) <= tolerance, key
        assert abs(std - values.std(ddof=1)) <= 2 * tolerance, key
        assert values.min() - tolerance <= mean <= values.max() + tolerance
        assert all(math.isfinite(v) for v in values)


def check_test(test: dict) -> None:
    assert 0.0 <= test["p"] <= 1.0
    significant = test["p"] < 0.05
    assert ("significant (p =" in test["verdict"] and "no significant" not in test["verdict"]) == significant


def test_few_to_many_quick_prints_consistent_statistics_over_five_seeds(outputs):
    text = outputs["f2m_a"]
    seed_lines = re.findall(rf"^seed (\d) (\w+)\s*: final train loss {NUMBER}; held-out L1 1: {NUMBER}, 3: {NUMBER}, "
                            rf"5: {NUMBER}; cheek L1 1: {NUMBER}, 3: {NUMBER}, 5: {NUMBER}$", text, re.M)
    assert len(seed_lines) == 15                                  # 5 seeds x 3 methods
    assert {(int(s), m) for s, m, *_ in seed_lines} == {(s, m) for s in range(5)
                                                        for m in ("omni_id", "mean_pool", "per_photo")}
    per_seed = {}
    for _, method, _, *errors in seed_lines:
        for i, (metric, k) in enumerate((m, k) for m in ("l1", "cheek_l1") for k in (1, 3, 5)):
            per_seed.setdefault((method, k, metric), []).append(float(errors[i]))
    rows = re.findall(rf"^(\w+)\s+([135])\s+{NUMBER} \+/- {NUMBER}\s+{NUMBER} \+/- {NUMBER}$", text, re.M)
    assert len(rows) == 9
    table = {}
    for method, k, *numbers in rows:
        table[(method, int(k), "l1")] = (float(numbers[0]), float(numbers[1]))
        table[(method, int(k), "cheek_l1")] = (float(numbers[2]), float(numbers[3]))
    check_summary(per_seed, table, places=5)
    data = result(text)
    assert data["seeds"] == 5 and data["steps"] == 4
    assert len(data["tests"]) == 12                              # 2 metrics x 2 baselines x 3 k
    for key, test in data["tests"].items():
        metric, baseline, k = key.split("/")
        check_test(test)
        diffs = np.array(per_seed[("omni_id", int(k), metric)]) - np.array(per_seed[(baseline, int(k), metric)])
        assert abs(test["mean_diff"] - diffs.mean()) <= 2e-5
        assert test["wins"] == int((diffs < 0).sum())
    verdict = [line for line in text.splitlines() if line.startswith("VERDICT: ")]
    assert len(verdict) == 1 and data["tests"]["l1/mean_pool/5"]["verdict"] in verdict[0]


def test_few_to_many_quick_is_bitwise_repeatable(outputs):
    def numbers(text):
        return [line for line in text.splitlines() if not re.fullmatch(r"\(\d+ s\)", line)]
    assert numbers(outputs["f2m_a"]) == numbers(outputs["f2m_b"])


def test_encoder_table_quick_prints_the_method_by_inputs_table_over_seeds(outputs):
    text = outputs["table"]
    methods = ("omni_id", "arcface", "clip", "arcface_clip")
    seed_lines = re.findall(rf"^seed (\d) (\w+)\s*: stage-2 loss {NUMBER}; k=1 trait {NUMBER} cheek {NUMBER} "
                            rf"id {NUMBER}; k=5 trait {NUMBER} cheek {NUMBER} id {NUMBER}$", text, re.M)
    assert {(int(s), m) for s, m, *_ in seed_lines} == {(s, m) for s in range(2) for m in methods}
    per_seed = {}
    for _, method, loss, *figures in seed_lines:
        assert math.isfinite(float(loss))
        for i, (k, metric) in enumerate((k, m) for k in (1, 5) for m in ("trait", "cheek", "id_acc")):
            per_seed.setdefault((method, k, metric), []).append(float(figures[i]))
            if metric == "id_acc":
                assert 0.0 <= float(figures[i]) <= 1.0
    rows = re.findall(rf"^(\w+)\s+([15])\s+{NUMBER} \+/- {NUMBER}\s+{NUMBER} \+/- {NUMBER}\s+{NUMBER} \+/- {NUMBER}$",
                      text, re.M)
    assert len(rows) == 8                                         # 4 methods x 2 input counts
    table = {}
    for method, k, *numbers in rows:
        for i, metric in enumerate(("trait", "cheek", "id_acc")):
            table[(method, int(k), metric)] = (float(numbers[2 * i]), float(numbers[2 * i + 1]))
    # per-seed figures are printed to 4 places (identification to 3), the table to 4
    for key in per_seed:
        check_summary({key: per_seed[key]}, {key: table[key]}, places=3 if key[2] == "id_acc" else 4)
    data = result(text)
    assert data["seeds"] == 2 and set(data["methods"]) == set(methods)
    # the read-back on the people's own photos finds every one of them: the measure works
    assert data["real_photos"]["id_acc"] == 1.0
    assert abs(data["real_photos"]["trait"] - 0.001914) < 1e-5   # what 8-bit photos and 2 x 2 pooling leave
    assert data["real_photos"]["cheek"] < 0.002
    assert "chance 0.125" in text                                 # 8 held-out people in --quick
    for test in data["tests"].values():
        check_test(test)
    assert sorted(data["order_at_5"]) == sorted(methods)
    assert data["order_at_5"] == sorted(methods, key=lambda m: data["methods"][m]["5"]["trait"][0])
