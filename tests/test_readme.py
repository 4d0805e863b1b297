"""The README's two commands stay true: CI runs exactly the README's test command."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_ci_runs_the_readme_test_command():
    demo, test = readme_commands()[:2]
    assert demo.endswith("draftdata demo")
    assert "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run runs the same installs and pytest (pip's -q aside)
    assert test.replace("pip install ", "pip install -q ") in ci


def test_makefile_runs_the_readme_commands():
    """`make install` is the README's test install, `make test` is CI's entry point."""
    make = (ROOT / "Makefile").read_text()
    readme = (ROOT / "README.md").read_text()
    install = re.search(r"^install:\n\t(.+)$", make, re.M).group(1)
    assert f"{install} && python -m pytest -q" in readme
    assert re.search(r"^test:\n\t\.ci/run$", make, re.M)


def test_every_cli_command_has_a_module_and_help():
    from draftdata.cli import COMMANDS, build_parser

    parser = build_parser()
    help_text = parser.format_help()
    for name in COMMANDS:
        assert name in help_text, f"`draftdata {name}` is not available"



def test_an_unknown_flag_shows_its_commands_usage(capsys):
    """`draftdata inspect --nope`: the command's usage and exit status 2 (it showed the top-level one)."""
    import pytest

    from draftdata.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["inspect", "--nope", "ds"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "usage: draftdata inspect" in err and "unrecognized arguments: --nope" in err


def test_demo_and_vocab_refuse_bad_arguments_in_one_line(tmp_path, capsys):
    """Mistakes a user makes with the first command's options: a missing prompts file, a hold-out
    that leaves nothing to train on or evaluate, a directory as `vocab --out`."""
    from draftdata.cli import main

    assert main(["demo", "--prompts", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "d")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    for holdout in ("0", "999"):
        assert main(["demo", "--holdout", holdout, "--out", str(tmp_path / "d")]) == 2
        assert f"--holdout {holdout}: keep between 1 and" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    assert main(["vocab", str(tmp_path), "-n", "10", "--out", str(tmp_path)]) == 2
    assert "is a directory; name the file to write" in capsys.readouterr().err
    # numbers that cannot work are refused before any step runs (they failed late, with exit status 1)
    for flag, value in (("--eval-tokens", "0"), ("--train-minutes", "0"), ("--draft-vocab-size", "-1")):
        assert main(["demo", flag, value, "--out", str(tmp_path / "d")]) == 2
        assert f"{flag} {value}: must be" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    one = tmp_path / "one.jsonl"
    one.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["demo", "--prompts", str(one), "--out", str(tmp_path / "d")]) == 2
    assert "holds 1 record(s); the demo needs at least 2" in capsys.readouterr().err
    # a rerun into an earlier demo's directory with another split is refused (it trained on held-out prompts)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "demo_settings.json").write_text('{"holdout": 2}')
    assert main(["demo", "--holdout", "5", "--out", str(tmp_path / "old")]) == 2
    assert "holds a demo run with other settings (" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["demo_settings.json"]
    # a damaged settings file switched the check off (or was a traceback)
    (tmp_path / "old" / "demo_settings.json").write_text("[]")
    assert main(["demo", "--out", str(tmp_path / "old")]) == 2
    assert "demo_settings.json is damaged" in capsys.readouterr().err
    # a directory of the user's own: the demo overwrote train_prompts.jsonl there and trained into train/
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train_prompts.jsonl").write_text("MY NOTES\n")
    assert main(["demo", "--out", str(mine)]) == 2
    assert "holds train_prompts.jsonl and no demo_settings.json" in capsys.readouterr().err
    assert (mine / "train_prompts.jsonl").read_text() == "MY NOTES\n"
    # a bad record is named in the user's file before any step (it failed at eval, the last step,
    # naming the demo's copy); a bad --device before anything is written
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"id": f"t{i}", "messages": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                           for i in range(3)) + '{"id": "e0", "prompt": "Say hi"}\n')
    assert main(["demo", "--prompts", str(bad), "--holdout", "1", "--out", str(tmp_path / "b")]) == 2
    assert f"{bad}:4: missing_conversations" in capsys.readouterr().err
    assert main(["demo", "--device", "bogus", "--out", str(tmp_path / "b")]) == 2
    assert "--device" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_progress_interval_env_var_must_be_a_number(monkeypatch):
    import pytest

    from draftdata.errors import DraftdataError
    from draftdata.progress import INTERVAL_ENV, JobProgress

    monkeypatch.setenv(INTERVAL_ENV, "30s")
    with pytest.raises(DraftdataError, match=rf"{INTERVAL_ENV}='30s': expected a number of seconds"):
        JobProgress(total=1)
