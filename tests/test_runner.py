"""The shared batch loop's pieces that need no model."""

from longflow_jax import runner

EOS = 4


def test_finish_reason():
    assert runner.finish_reason([7, 8, EOS], (EOS,)) == "stop"
    assert runner.finish_reason([7, EOS, 8], (EOS,)) == "length"
    assert runner.finish_reason([], (EOS,)) == "length"
    assert runner.finish_reason([7, EOS], (EOS,), nonfinite=True) == "error"
