"""longflow-generate: the demo builds its own model; --ckpt generates from a converted checkpoint."""

from longflow_jax import cli


def test_demo_prints_both_caches_and_the_saving(capsys):
    argv = ["--demo", "--batch", "2", "--prompt-len", "16", "--max-new-tokens", "8", "--budget", "8"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "longflow C=8" in out and "full" in out and "saved" in out


def test_checkpoint_generates_a_text_per_prompt(chat_ckpt, capsys):
    argv = ["--ckpt", chat_ckpt, "--prompt", "hi", "--prompt", "x", "--max-new-tokens", "8", "--budget", "8"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("--- [") == 2 and "tokens in" in out
    assert cli.main(["--ckpt", chat_ckpt]) == 2  # --ckpt needs a --prompt
