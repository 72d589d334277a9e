import subprocess
import sys

from serialgen.cli import build_parser, main


def test_help_lists_the_groups():
    out = subprocess.run([sys.executable, "-m", "serialgen.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for group in ("assets", "shards", "data", "train", "eval"):
        assert group in out.stdout


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    names = []
    for name, sub in actions[0].choices.items():
        names.append([name])
        for a in sub._actions:
            if a.__class__.__name__ == "_SubParsersAction":
                names += [[name, child] for child in a.choices]
    for argv in names:
        try:
            main(argv + ["--help"])
        except SystemExit as exc:
            assert exc.code == 0, argv
        assert "usage:" in capsys.readouterr().out


import pytest


@pytest.mark.parametrize("argv, says", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["render", "--assets", "a", "--out", "b", "--engine", "vray"], "invalid choice: 'vray'"),
    (["render", "--assets", "a", "--out", "b", "--resolution", "12x"], "--resolution"),
    (["data", "preview"], "required: SHARDS, --out"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
])
def test_every_usage_error_is_one_line_and_exit_2(capsys, argv, says):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and err[0].startswith("serialgen"), err
