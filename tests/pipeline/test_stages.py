"""The stage contract (issue 11): every stage runs alone on a run directory prepared by the
stages before it, a run stopped between two stages resumes with the next stage only, and a stage
whose inputs are missing fails with one line naming the stage to run first."""

from __future__ import annotations

import os
import shutil

import pytest

from rayclust import cli, storage
from rayclust.config import ConfigError
from rayclust.pipeline.run import STAGE_NAMES, open_run, run, stage
from tests.pipeline.conftest import tiny_config

pytestmark = pytest.mark.ray

# what each stage writes in the run directory (its folder first, holding `_SUCCESS`)
OUTPUTS = {"embed": ("embeddings", "manifest", "errors", "thumbnails"),
           "vocabulary": ("vocabulary",),
           "stage1": ("stage1",),
           "assign": ("assignments", "clusters.parquet", "metrics.json")}
ORDER = ("embed", "vocabulary", "stage1", "assign")  # stage 2 is off in the tiny config


def _prepared(finished_run, tmp_path, upto: int) -> str:
    """A copy of the finished run holding config.yaml and the outputs of ORDER[:upto] only:
    what a run stopped after stage ORDER[upto - 1] leaves."""
    _, source, _ = finished_run
    target = str(tmp_path / "run")
    os.makedirs(target)
    shutil.copy(os.path.join(source, "config.yaml"), target)
    for name in ORDER[:upto]:
        for item in OUTPUTS[name]:
            path = os.path.join(source, item)
            if os.path.isdir(path):
                shutil.copytree(path, os.path.join(target, item))
            elif os.path.exists(path):
                shutil.copy(path, target)
    return target


def _same_result(a: str, b: str) -> None:
    for run_dir in (a, b):
        assert storage.exists(os.path.join(run_dir, "assignments", "_SUCCESS"))
    left, right = (storage.read_parquet(os.path.join(d, "assignments")).sort_by("id")
                   for d in (a, b))
    assert left.select(["id", "cluster"]) == right.select(["id", "cluster"])


def test_stage_list_is_the_documented_order():
    assert STAGE_NAMES == ("embed", "vocabulary", "stage1", "stage2", "assign")


@pytest.mark.parametrize("name", ["vocabulary", "stage1", "assign"])
def test_each_stage_runs_alone_on_the_previous_stages_output(finished_run, tmp_path, name):
    """Only config.yaml and the outputs of the stages before it: the stage reads nothing else,
    does its work once, and gives the finished run's result. (The embed stage alone on a fresh
    run directory is the `embed` command, tests/test_commands.py, and `embed` resuming its
    missing shards is tests/pipeline/test_run_local.py.)"""
    index = ORDER.index(name)
    run_dir = _prepared(finished_run, tmp_path, index)
    out = stage(name, run_dir)
    assert out["stages"] == {name: "ran"}
    assert storage.exists(os.path.join(run_dir, OUTPUTS[name][0], "_SUCCESS"))
    assert stage(name, run_dir)["stages"] == {name: "skipped"}  # idempotent
    # the rest of the stages complete the run with the finished run's result
    for later in ORDER[index + 1:]:
        stage(later, run_dir)
    _same_result(run_dir, finished_run[1])


@pytest.mark.parametrize("stopped_after", [1, 2, 3])
def test_a_run_stopped_between_stages_resumes_with_the_next_stage(finished_run, tmp_path,
                                                                    stopped_after):
    config = finished_run[0]
    run_dir = _prepared(finished_run, tmp_path, stopped_after)
    out = run(config, run_dir)
    expected = {name: ("skipped" if i < stopped_after else "ran")
                for i, name in enumerate(ORDER)}
    assert out["stages"] == expected
    _same_result(run_dir, finished_run[1])
    assert run(config, run_dir)["stages"] == dict.fromkeys(ORDER, "skipped")


def test_a_changed_stage1_setting_reruns_stage1_and_assign_only(finished_run, tmp_path):
    config = finished_run[0]
    run_dir = _prepared(finished_run, tmp_path, len(ORDER))
    changed = tiny_config(tmp_path, config.input.path, **{"guard.margin": 3.0})
    assert run(changed, run_dir)["stages"] == {"embed": "skipped", "vocabulary": "skipped",
                                               "stage1": "ran", "assign": "ran"}


MISSING = [("vocabulary", None), ("stage1", "embed"), ("stage2", "embed"), ("assign", "embed")]


@pytest.mark.parametrize("name, missing", [m for m in MISSING if m[1]])
def test_a_stage_without_its_inputs_names_the_missing_stage(tmp_path, name, missing, capsys):
    config = tiny_config(tmp_path, **{"stage2.enabled": "true"})
    run_dir = str(tmp_path / "run")
    open_run(config, run_dir)
    with pytest.raises(ConfigError, match=f"stage `{name}` needs the output of stage "
                                          f"`{missing}`"):
        stage(name, run_dir)
    # the command: one line, status 2, no traceback
    assert cli.main(["stage", name, "--run-dir", run_dir]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("rayclust: error:")]
    assert len(lines) == 1 and f"rayclust stage {missing} --run-dir" in lines[0]
    assert "Traceback" not in err


def test_stage1_needs_the_vocabulary_too(finished_run, tmp_path):
    run_dir = _prepared(finished_run, tmp_path, 1)  # embeddings only
    with pytest.raises(ConfigError, match="needs the output of stage `vocabulary`"):
        stage("stage1", run_dir)


def test_stage_on_a_folder_that_is_not_a_run_directory(tmp_path, capsys):
    assert cli.main(["stage", "stage1", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a run directory (it has no config.yaml)" in err and "Traceback" not in err


def test_stage_overrides_are_written_back(finished_run, tmp_path):
    run_dir = _prepared(finished_run, tmp_path, 3)
    stage("assign", run_dir, ["output.rows_per_file=7"])
    text = open(os.path.join(run_dir, "config.yaml")).read()
    assert "rows_per_file: 7" in text
    parts = storage.parquet_files(os.path.join(run_dir, "assignments"))
    assert [storage.read_parquet(p).num_rows for p in parts][0] == 7
