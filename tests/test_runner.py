"""The shared batch loop's pieces that need no model."""

from longflow_jax import runner

EOS = 4


def test_finish_reason():
    assert runner.finish_reason([7, 8, EOS], (EOS,)) == "stop"
    assert runner.finish_reason([7, EOS, 8], (EOS,)) == "length"
    assert runner.finish_reason([], (EOS,)) == "length"
    assert runner.finish_reason([7, EOS], (EOS,), nonfinite=True) == "error"
    assert runner.finish_reason([7, 9], (EOS, 9)) == "stop"  # a stop_token_id ends a row as EOS does


def test_cut_at_stop_string():
    assert runner.cut_at_stop_string("abc END def", ["END"]) == ("abc ", "END")
    # the earliest occurrence wins, whatever the order of the list; at one place, the first listed
    assert runner.cut_at_stop_string("x;y.z", [".", ";"]) == ("x", ";")
    assert runner.cut_at_stop_string("ab", ["b", "ab"]) == ("", "ab")
    assert runner.cut_at_stop_string("ab", ["ab", "a"]) == ("", "ab")
    assert runner.cut_at_stop_string("no stop", ["END"]) == ("no stop", None)
    assert runner.cut_at_stop_string("text", []) == ("text", None)


def test_generation_flags_make_the_sampling_config():
    import argparse

    from longflow_jax.config import SamplingConfig

    p = argparse.ArgumentParser()
    runner.add_decoding_args(p)
    argv = (
        "--repetition-penalty 1.2 --presence-penalty 0.5 --frequency-penalty -0.25 --no-repeat-ngram-size 3"
    )
    argv += " --min-new-tokens 4 --ignore-eos --stop-token-ids 7 11 --stop END --stop ###"
    args = p.parse_args(argv.split())
    assert runner.sampling_from(args) == SamplingConfig(
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        no_repeat_ngram_size=3,
        min_new_tokens=4,
        ignore_eos=True,
        stop_token_ids=(7, 11),
    )
    assert args.stop == ["END", "###"]
    assert runner.sampling_from(p.parse_args([])) == SamplingConfig()
