"""The command line in-process: help texts and clear errors for user mistakes. Every command
shape run as a user runs it (a fresh process, its own Ray) is in test_commands.py."""

import pytest

from rayclust.cli import build_parser, main


def test_help_explains_every_option(capsys):
    for command, options in {
        "run": ["--run-dir", "--set", "--no-progress", "config"],
        "cluster-embeddings": ["--embeddings", "--vocabulary", "--run-dir", "--set",
                               "--no-progress", "--config"],
        "demo": ["--run-dir", "--set", "--no-progress", "--images-dir", "--config"],
        "embed": ["--input", "--run-dir", "--set", "--no-progress", "--config"],
    }.items():
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        for option in options:
            assert option in text, (command, option)
        assert "KEY=VALUE" in text


@pytest.mark.parametrize("argv, message", [
    (["run", "missing.yaml"], "config file not found: missing.yaml"),
    (["demo", "--set", "seic.epoch=3"], "unknown key `seic.epoch`"),
    (["demo", "--set", "method=kmeans"], "use one of: seic, tac"),
    (["cluster-embeddings", "--embeddings", "/nonexistent/emb.parquet"], "does not exist"),
])
def test_user_mistakes_get_one_clear_line(argv, message, capsys, tmp_path):
    code = main(argv + ["--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_run_without_input_path(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("clusters: 3\n")
    assert main(["run", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    assert "input.path is not set" in capsys.readouterr().err


def test_unknown_model_is_a_user_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"clusters: 3\ninput:\n  path: {tmp_path}\n")
    (tmp_path / "a.png").write_bytes(b"")
    code = main(["run", str(config), "--run-dir", str(tmp_path / "r"),
                 "--set", "model.name=ViT-B-33"])
    err = capsys.readouterr().err
    assert code == 2 and "ViT-B-3" in err
    assert "Traceback" not in err and 'File "' not in err  # no remote traceback either


def test_config_command_prints_resolved_and_described(capsys):
    assert main(["config", "--set", "clusters=12"]) == 0
    assert "clusters: 12" in capsys.readouterr().out
    assert main(["config", "--describe"]) == 0
    out = capsys.readouterr().out
    assert "seic.balance_weight" in out and "storage.endpoint" in out


def test_parser_commands():
    parser = build_parser()
    args = parser.parse_args(["run", "c.yaml", "--set", "a=1", "--set", "b=2"])
    assert args.overrides == ["a=1", "b=2"] and args.no_progress is False
