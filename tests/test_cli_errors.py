"""Issue 26 §3: every bad value gives one short ``error:`` naming the argument, the value and the accepted range,
exit code 2, before any process is launched (one process runs all cases: ``tests/scripts/cli_errors.py``)."""

import json

import pytest
from dist import run_script

EXPECTED = {
    "period_negative": "error: invalid period=-1; expected an int with period >= 1, or a PeriodSchedule",
    "period_zero": "error: invalid period=0; expected an int with period >= 1, or a PeriodSchedule",
    "nonfinite": "error: invalid nonfinite='ignore'; expected one of 'raise', 'drop'",
    "timeout": "error: invalid timeout=-5.0; expected a timedelta or seconds in (0, 1e8]",
    "outer_momentum": "error: invalid outer_momentum=1.0; expected a finite number with outer_momentum in [0, 1)",
    "batch_size": "error: invalid batch_size=0; expected an int with batch_size >= 1",
    "lr_nan": "error: ClippedSGD: invalid lr=nan; expected a finite number with lr >= 0",
    "lr_negative": "error: ClippedSGD: invalid lr=-0.1; expected a finite number with lr >= 0",
    "max_norm_inf": "error: ClippedSGD: invalid max_norm=inf; expected a finite number with max_norm > 0",
    "strategy_typo": "error: You selected an invalid strategy name: `strategy='local_sdg'`; did you mean 'local_sgd'?",
    "devices": "error: `devices` selected with `CPUAccelerator` should be an int > 0.",
    "text_path": "error: text_path='/no/such/file.txt' is not a file",
    "cifar_dir": "error: data_dir='/no/such/dir' holds no CIFAR-10 (cifar-10-batches-py/); pass download=True",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_errors") / "out.json"
    run_script("cli_errors.py", out, timeout=280)
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_a_bad_value_is_one_short_error_with_exit_code_2(results, case):
    got = results[case]
    assert got["code"] == 2, got
    assert "Traceback" not in got["stderr"] and "Namespace(" not in got["stderr"]
    (line,) = [ln for ln in got["stderr"].splitlines() if ln.startswith("error:")]
    assert line.startswith(EXPECTED[case]), line


def test_lightning_opt_traceback_shows_the_full_error_for_debugging(results):
    assert results["traceback"]["code"] == "raised"
    assert "invalid batch_size=0; expected an int with batch_size >= 1" in results["traceback"]["stderr"]
