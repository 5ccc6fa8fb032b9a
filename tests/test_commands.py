"""Every documented command as a user runs it: the installed `rayclust` entry point in a fresh
process, with no Ray cluster to join (issue 10).

The pipeline tests call the entry functions in-process inside the session's Ray cluster, which
hid every path where the command itself must start Ray (`cluster-embeddings` crashed with
"Ray has not been started yet"). Here each command starts, or refuses to start, its own local
cluster. Bad inputs must end in one `rayclust: error:` line and exit status 2 before Ray starts
(the child gets an unreachable RAY_ADDRESS, so any Ray use fails the test), or put the bad rows
in `errors/` and cluster the rest.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayclust import storage
from rayclust.synthetic import generate_image_folder
from tests.pipeline.conftest import VOCAB_CACHE

# every test starts the installed script in a fresh process (torch and open_clip imports
# included): seconds each even before Ray, so all of them stay out of the fast lane
pytestmark = pytest.mark.slow

RAYCLUST = os.path.join(os.path.dirname(sys.executable), "rayclust")  # the installed script
TINY = ["--no-progress", "--set", "clusters=3", "--set", "model.name=rayclust-tiny",
        "--set", "model.pretrained=none", "--set", "model.batch_size=8",
        "--set", "vocabulary.max_nouns=300", "--set", f"vocabulary.cache_dir={VOCAB_CACHE}",
        "--set", "seic.epochs=2", "--set", "seic.batch_size=16",
        "--set", "seic.candidate_nouns_per_centre=50", "--set", "seic.nouns_per_image=10",
        "--set", "guard.neighbours=5"]
NO_RAY = "127.0.0.1:9"  # RAY_ADDRESS for commands that must fail before they touch Ray


@dataclass
class Result:
    code: int
    out: str
    err: str
    after_error_s: float | None  # seconds from the `rayclust: error:` line to the exit
    pid: int

    def ray_processes_left(self) -> list[str]:
        """Daemons (GCS, raylet, dashboard, monitors) of the Ray session this command started
        that still run: their command lines name the session directory, which ends in the
        driver's pid (`session_<date>_<time>_<us>_<pid>`). Workers die with their raylet."""
        pattern = re.compile(rf"session_[0-9_-]+_{self.pid}\b")
        left = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # not a process, or gone meanwhile
                continue
            if pattern.search(cmdline):
                left.append(f"{entry}: {cmdline[:120]}")
        return left

    def user_error(self) -> str:
        """The one error line; asserts the shape of a user error."""
        assert self.code == 2, self.err[-3000:]
        assert "Traceback" not in self.err and 'File "' not in self.err, self.err[-3000:]
        lines = [x for x in self.err.splitlines() if x.startswith("rayclust: error:")]
        assert len(lines) == 1, self.err[-3000:]
        return lines[0]


def rayclust(*args: str, cwd, timeout: float = 300, ray_address: str | None = None,
             env: dict | None = None) -> Result:
    """Run `rayclust ARGS` in `cwd` as a user would; kill it (and its Ray processes) on timeout.
    `env`: variables added to the environment."""
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("RAY_ADDRESS", "RAY_ENABLE_UV_RUN_RUNTIME_ENV")}, **(env or {})}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    proc = subprocess.Popen([RAYCLUST, *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    out: list[str] = []
    err: list[str] = []
    error_at: list[float] = []

    def read(stream, sink, watch):
        for line in stream:
            if watch and line.startswith("rayclust: error:") and not error_at:
                error_at.append(time.monotonic())
            sink.append(line)

    readers = [threading.Thread(target=read, args=(proc.stdout, out, False), daemon=True),
               threading.Thread(target=read, args=(proc.stderr, err, True), daemon=True)]
    for r in readers:
        r.start()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"rayclust {' '.join(args)} did not exit within {timeout} s; stderr:\n"
                    + "".join(err)[-3000:])
    ended = time.monotonic()
    for r in readers:
        r.join(10)
    return Result(code, "".join(out), "".join(err),
                  ended - error_at[0] if error_at else None, proc.pid)


# -- inputs ------------------------------------------------------------------------------------

def _planted(n_per: int, d: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """3 well separated clusters of unit vectors, with their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, d))
    x = np.concatenate([c + 0.2 * rng.normal(size=(n_per, d)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [f"class-{c}" for c in range(3) for _ in range(n_per)]


def _vocabulary(path, d: int, n: int = 40, seed: int = 1) -> str:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, d)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    pq.write_table(pa.table({"noun": [f"noun{i}" for i in range(n)],
                             "embedding": pa.array(list(v), pa.list_(pa.float32()))}), path)
    return str(path)


def _embeddings(path, rows: list, ids: list | None = None, **columns) -> str:
    table = {"embedding": pa.array(rows, pa.list_(pa.float32()))}
    if ids is not None:
        table = {"id": ids, **table}
    pq.write_table(pa.table({**table, **columns}), path)
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """18 generated images in 3 class folders, and one broken file."""
    root = str(tmp_path_factory.mktemp("images"))
    generate_image_folder(root, ("circle", "square", "stripes"), per_class=6, size=48, seed=5)
    with open(os.path.join(root, "circle", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


def _rows(uri: str) -> int:
    return storage.read_parquet(uri).num_rows


@pytest.fixture
def shared_cluster(ray_cluster) -> str:
    """The address of the session's Ray cluster. Commands whose subject is not starting Ray join
    it (as users with RAY_ADDRESS do) instead of starting one each; the commands that must start
    and stop their own cluster (the issue-10 cases) do not use it."""
    return ray_cluster.get_runtime_context().gcs_address


# -- every command shape, in a fresh process ----------------------------------------------------

@pytest.mark.slow
@pytest.mark.ray
def test_cluster_embeddings_with_vocabulary_sets_bad_rows_aside(tmp_path):
    """The issue's crash (`Ray has not been started yet`), with every kind of bad row: each one
    in errors/ under its id, the rest clustered, nothing silently dropped."""
    x, _ = _planted(20, 32)
    good_ids = [f"img-{i:03d}" for i in range(len(x))]
    nan, zero = x[0].copy(), np.zeros(32, np.float32)
    nan[3] = np.nan
    bad = {"bad-nan": nan, "bad-zero": zero, good_ids[5]: -x[5],
           "bad-short": x[1][:31], "bad-null": None}
    rows = [*x, *bad.values()]
    emb = _embeddings(tmp_path / "E.parquet", rows, [*good_ids, *bad])
    vocab = _vocabulary(tmp_path / "V.parquet", 32)
    r = rayclust("cluster-embeddings", "--embeddings", emb, "--vocabulary", vocab,
                 "--run-dir", "out", *TINY, cwd=tmp_path)
    assert r.code == 0, r.err[-3000:]
    assert "60 images -> 3 clusters" in r.out and "5 input(s) skipped" in r.out
    assignments = storage.read_parquet(str(tmp_path / "out" / "assignments"))
    assert sorted(assignments["id"].to_pylist()) == good_ids
    errors = storage.read_parquet(str(tmp_path / "out" / "errors")).to_pylist()
    assert sorted(e["uri"] for e in errors) == sorted(bad)  # no uri column: the id stands in
    assert {e["stage"] for e in errors} == {"cluster-embeddings"}
    assert any("duplicate id" in e["error"] for e in errors)
    assert assignments.num_rows + len(errors) == len(rows)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["images"] == 60 and metrics["errors"] == 5


@pytest.mark.slow
@pytest.mark.ray
def test_cluster_embeddings_encodes_the_vocabulary(tmp_path, shared_cluster):
    """Without --vocabulary the nouns are encoded by the model on the cluster it joins."""
    x, labels = _planted(8, 64)  # rayclust-tiny's dimension
    emb = _embeddings(tmp_path / "E.parquet", list(x), label=labels)
    r = rayclust("cluster-embeddings", "--embeddings", emb, *TINY, cwd=tmp_path,
                 ray_address=shared_cluster)
    assert r.code == 0, r.err[-3000:]
    run = tmp_path / "runs" / "E"  # the documented default run directory
    assert _rows(str(run / "assignments")) == 24 and _rows(str(run / "vocabulary")) == 300
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["images"] == 24 and "labels" in metrics and "ACC" in r.out


@pytest.mark.slow
@pytest.mark.ray
def test_embed_then_run_commands(tmp_path, images, shared_cluster):
    """`embed` alone, then `run` over the same run directory (it finds the embeddings and does
    not embed again): both command shapes, each in its own fresh process."""
    r = rayclust("embed", "--input", images, "--run-dir", "out", *TINY,
                 "--set", "input.labels=from_folder", cwd=tmp_path, ray_address=shared_cluster)
    assert r.code == 0, r.err[-3000:]
    assert "18 images embedded, 1 skipped" in r.out
    run = tmp_path / "out"
    assert _rows(str(run / "embeddings")) == 18 and _rows(str(run / "errors")) == 1
    assert _rows(str(run / "manifest")) == 19
    assert not (run / "assignments").exists()
    embedded = sorted(os.listdir(run / "embeddings"))
    stamps = {name: os.stat(run / "embeddings" / name).st_mtime_ns for name in embedded}

    config = tmp_path / "folder.yaml"
    config.write_text(f"input:\n  path: {images}\n  labels: from_folder\n")
    r = rayclust("run", str(config), "--run-dir", "out", *TINY, cwd=tmp_path,
                 ray_address=shared_cluster)
    assert r.code == 0, r.err[-3000:]
    assert _rows(str(run / "assignments")) == 18 and _rows(str(run / "errors")) == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["images"] == 18 and metrics["errors"] == 1
    assert "18 images -> 3 clusters" in r.out and "1 input(s) skipped" in r.out
    assert "labels" in metrics  # the manifest listed by `embed` kept the folder labels
    assert {n: os.stat(run / "embeddings" / n).st_mtime_ns for n in embedded} == stamps


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_demo_command_offline(tmp_path, shared_cluster):
    r = rayclust("demo", "--run-dir", "runs/demo", *TINY, "--set", "clusters=6", cwd=tmp_path,
                 timeout=600, ray_address=shared_cluster)
    assert r.code == 0, r.err[-3000:]
    run = tmp_path / "runs" / "demo"
    assert "300 images -> 6 clusters" in r.out and "ACC" in r.out and str(run) in r.out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["images"] == 300 and metrics["classes"] == 6
    assert len(os.listdir(tmp_path / "runs" / "demo-images")) == 6


# -- user errors: one line, status 2, prompt exit ------------------------------------------------

def test_unknown_model_fails_before_anything_starts(tmp_path):
    """The issue's `demo --set model.name=ViT-Q-99`: the close matches, status 2, and no images
    drawn, no run directory, no Ray (any Ray use would fail on the unreachable address)."""
    r = rayclust("demo", *TINY, "--set", "model.name=ViT-Q-99", cwd=tmp_path, timeout=120,
                 ray_address=NO_RAY)
    line = r.user_error()
    assert "Unknown open_clip model 'ViT-Q-99'" in line and "Close matches:" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_user_error_after_ray_started_exits_promptly(tmp_path):
    """A mistake found only once the command's own cluster runs (more training workers than
    CPUs) still ends in one line and status 2, and the process (Ray included) exits at once."""
    x, _ = _planted(10, 32)
    emb = _embeddings(tmp_path / "E.parquet", list(x))
    vocab = _vocabulary(tmp_path / "V.parquet", 32)
    r = rayclust("cluster-embeddings", "--embeddings", emb, "--vocabulary", vocab, *TINY,
                 "--set", "train.workers=8", "--set", "ray.num_cpus=2", cwd=tmp_path,
                 timeout=240)
    line = r.user_error()
    assert "need 8 CPUs but the Ray cluster has 2" in line  # asked the cluster it started
    assert r.after_error_s is not None and r.after_error_s < 60, r.after_error_s
    deadline = time.monotonic() + 15  # the cluster's processes may take a moment to go
    while r.ray_processes_left() and time.monotonic() < deadline:
        time.sleep(1)
    assert not r.ray_processes_left()


@pytest.mark.slow
@pytest.mark.ray
def test_weights_that_cannot_be_downloaded_are_one_line(tmp_path, images):
    """The README's first command on a machine without internet (`demo` with its pretrained
    ViT-B-32, here `embed` with the same weights): the download is tried once, in the Ray task
    that describes the model, and fails as the offline message (one line, status 2), not as an
    encoder actor dying mid-pipeline. Its own cluster, so HF_HUB_OFFLINE reaches the workers."""
    r = rayclust("embed", "--input", images, "--run-dir", "out", "--no-progress",
                 "--set", "model.name=ViT-B-32", "--set", "model.pretrained=laion2b_s34b_b79k",
                 "--set", f"model.cache_dir={tmp_path / 'empty-cache'}", cwd=tmp_path,
                 timeout=240, env={"HF_HUB_OFFLINE": "1"})
    line = r.user_error()
    assert "Could not download the pretrained weights for model 'ViT-B-32'" in line
    assert "model.pretrained=none" in r.err  # the offline advice follows the line
    assert not os.path.exists(tmp_path / "out" / "embeddings")


def _vocab_columns(path, **kwargs) -> str:
    pq.write_table(pa.table(kwargs), path)
    return str(path)


def _not_parquet(path) -> str:
    path.write_text("id,embedding\n1,0.5\n")
    return str(path)


GOOD = list(_planted(4, 32)[0])  # 12 good rows of dimension 32

BAD_INPUTS = {
    # name: (embeddings file, vocabulary file or None, extra args, message)
    "not parquet": (lambda p: _not_parquet(p / "e.csv"), None, [],
                    "is not a readable Parquet file"),
    "no embedding column": (lambda p: _vocab_columns(p / "e.parquet", id=["a", "b"],
                                                     vector=[[1.0], [2.0]]),
                            None, [], "has no `embedding` column (columns: id, vector)"),
    "embedding is not a list": (lambda p: _vocab_columns(p / "e.parquet", embedding=[1.0, 2.0]),
                                None, [], "must be a list of floats"),
    "embedding of strings": (lambda p: _vocab_columns(p / "e.parquet",
                                                      embedding=[["a", "b"], ["c", "d"]]),
                             None, [], "must hold numbers"),
    "every row bad": (lambda p: _embeddings(p / "e.parquet", [[np.nan] * 4, [0.0] * 4]),
                      None, [], "none of the 2 rows is usable"),
    "fewer rows than clusters": (lambda p: _embeddings(p / "e.parquet",
                                                       [*GOOD[:4], [np.nan] * 32]),
                                 "vocab", ["--set", "clusters=10"],
                                 "4 usable embedding(s) (1 more skipped as unusable) cannot "
                                 "form 10 clusters"),
    "vocabulary of another dimension": (lambda p: _embeddings(p / "e.parquet", GOOD), "vocab16",
                                        [], "has 16: both must come from the same CLIP model"),
    "vocabulary without nouns": (lambda p: _embeddings(p / "e.parquet", GOOD), "nonouns", [],
                                 "lacks column(s) noun"),
    "vocabulary not parquet": (lambda p: _embeddings(p / "e.parquet", GOOD), "csv", [],
                               "is not a readable Parquet file"),
    "model of another dimension": (lambda p: _embeddings(p / "e.parquet", GOOD), None, [],
                                   "model rayclust-tiny encodes the vocabulary with dimension 64"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_before_ray(case, tmp_path):
    make_embeddings, vocabulary, extra, message = BAD_INPUTS[case]
    args = ["cluster-embeddings", "--embeddings", make_embeddings(tmp_path), *TINY, *extra,
            "--run-dir", "out"]
    if vocabulary:
        args += ["--vocabulary", {
            "vocab": lambda: _vocabulary(tmp_path / "v.parquet", 32),
            "vocab16": lambda: _vocabulary(tmp_path / "v.parquet", 16),
            "nonouns": lambda: _vocab_columns(tmp_path / "v.parquet", word=["a"],
                                              embedding=[[1.0] * 32]),
            "csv": lambda: _not_parquet(tmp_path / "v.csv"),
        }[vocabulary]()]
    r = rayclust(*args, cwd=tmp_path, timeout=120, ray_address=NO_RAY)
    assert message in r.user_error()
    assert not (tmp_path / "out").exists()  # checked before anything is written


# -- the rows set aside, in-process (no Ray) ----------------------------------------------------

def test_rejected_rows_keep_their_uri_and_the_part_is_rewritten(tmp_path):
    from rayclust.pipeline.corpus import Corpus
    from rayclust.pipeline.run_directory import RunDirectory
    from rayclust.pipeline.run_tables import write_rejected

    x = list(_planted(2, 8)[0])
    table = pa.table({"id": ["a", "b", "c", None, "a", "d", "e"],
                      "uri": ["s3://b/a.jpg", "s3://b/b.jpg", None, "s3://b/n.jpg",
                              "s3://b/a2.jpg", "s3://b/d.jpg", "s3://b/e.jpg"],
                      "embedding": pa.array([x[0], x[1], [np.inf] + [0.0] * 7, x[2], x[3],
                                             x[4][:5], x[5]], pa.list_(pa.float32()))})
    corpus = Corpus.from_table(table, "t.parquet")
    assert corpus.ids == ["a", "b", "e"]
    np.testing.assert_allclose(corpus.features, np.stack([x[0], x[1], x[5]]))
    reasons = {r["uri"]: r["error"] for r in corpus.rejected}
    assert reasons == {"c": "row 2: embedding has NaN or infinite values",  # no uri: the id
                       "s3://b/n.jpg": "row 3: null id",
                       "s3://b/a2.jpg": "row 4: duplicate id 'a' (the first row is kept)",
                       "s3://b/d.jpg": "row 5: embedding has 5 values, the others have 8"}
    rd = RunDirectory(str(tmp_path / "run"))
    for _ in range(2):  # a re-run rewrites the same part
        write_rejected(rd, corpus.rejected, "embeddings")
    assert storage.read_parquet(rd.errors).num_rows == 4
    clean = Corpus.from_table(table.slice(0, 2), "t.parquet")
    write_rejected(rd, clean.rejected, "embeddings")  # a clean input removes it
    assert not os.path.exists(os.path.join(rd.errors, "part-embeddings.parquet"))
