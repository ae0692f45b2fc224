"""runtime.eval --ray on a local Ray cluster: the same records as a local run, a replica killed mid-run,
Ctrl-C and resume."""

from __future__ import annotations

import json
import re

import pytest

ray = pytest.importorskip("ray")

from runtime.eval import distributed  # noqa: E402
from runtime.eval.__main__ import main as eval_main  # noqa: E402


class DyingReplica(distributed.Replica):
    """Fault injection from the test's side: the first replica process to reach its ``at``-th sample exits (a
    replica killed mid-sample), once in the whole run (the marker file makes it once across processes)."""

    at, marker = 1, ""

    def __init__(self, *args):
        super().__init__(*args)
        self.done = 0

    def evaluate(self, *args):
        import os

        self.done += 1
        if self.done == self.at:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        return super().evaluate(*args)


def dying(monkeypatch, tmp_path, at: int) -> None:
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # the replicas run this module's class
    monkeypatch.setattr(DyingReplica, "at", at)
    monkeypatch.setattr(DyingReplica, "marker", str(tmp_path / "killed"))
    monkeypatch.setattr(distributed, "Replica", DyingReplica)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local(engine_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "eval"
    assert eval_main(args_for(engine_dir, out)) == 0
    return records(out)


def args_for(engine_dir, out, *extra):
    return ["--engine", str(engine_dir), "--sample", "--out", str(out), "--max-new-tokens", "6", "--method",
            "base", "vreason", "--video-min-pixels", "3136", "--video-max-pixels", "12544", *extra]


def records(out) -> dict:
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    keys = [(r["dataset"], r["id"], r["method"]) for r in rows]
    assert len(keys) == len(set(keys)), "a sample was recorded twice"
    return {k: (r["text"], r["tokens"], r["answer"], r["score"], r["error"]) for k, r in zip(keys, rows)}


def test_ray_run_equals_the_local_run(cluster, engine_dir, local, tmp_path, capsys):
    out = tmp_path / "ray"
    assert eval_main(args_for(engine_dir, out, "--ray", "--replicas", "2")) == 0
    assert records(out) == local and len(local) == 28
    assert "ray: 2 replicas" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"base", "vreason"} and summary["settings"]["backend"] == "ort"


def test_a_killed_replica_is_replaced_and_its_sample_retried(cluster, engine_dir, local, tmp_path, monkeypatch,
                                                             capsys):
    dying(monkeypatch, tmp_path, 3)
    out = tmp_path / "ray"
    assert eval_main(args_for(engine_dir, out, "--ray", "--replicas", "2")) == 0
    assert records(out) == local  # every sample exactly once, the same answers
    assert re.search(r"replica \d died", capsys.readouterr().err)
    assert (tmp_path / "killed").exists()


def test_a_sample_whose_replica_keeps_dying_is_recorded_as_failed(cluster, engine_dir, tmp_path, monkeypatch):
    dying(monkeypatch, tmp_path, 1)
    out = tmp_path / "ray"
    assert eval_main(args_for(engine_dir, out, "--ray", "--replicas", "1", "--max-retries", "0", "--limit",
                              "1")) == 0
    got = records(out)
    assert len(got) == 2 and sum("replica died" in (v[4] or "") for v in got.values()) == 1


def test_interrupted_ray_run_resumes_only_what_is_missing(cluster, engine_dir, local, tmp_path, monkeypatch,
                                                          capsys):
    real = distributed.RayPool.run

    def interrupted(self, todo, submit, on_record, failed, progress):
        seen = []

        def stop_after_five(item, rec):
            on_record(item, rec)
            seen.append(1)
            if len(seen) == 5:
                raise KeyboardInterrupt

        return real(self, todo, submit, stop_after_five, failed, progress)

    out = tmp_path / "ray"
    monkeypatch.setattr(distributed.RayPool, "run", interrupted)
    assert eval_main(args_for(engine_dir, out, "--ray", "--replicas", "2")) == 130
    assert len((out / "samples.jsonl").read_text().splitlines()) == 5
    monkeypatch.setattr(distributed.RayPool, "run", real)
    capsys.readouterr()
    assert eval_main(args_for(engine_dir, out, "--ray", "--replicas", "2")) == 0
    assert "23 to run, 5 done earlier" in capsys.readouterr().err
    assert records(out) == local


def test_ray_missing_is_one_line(engine_dir, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    out = tmp_path / "never"
    assert eval_main(args_for(engine_dir, out, "--ray")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install" in err[0] and not out.exists()


def test_scaling_report_runs(cluster, engine_dir, capsys):
    from runtime.eval.scaling import main as scaling_main

    assert scaling_main(["--engine", str(engine_dir), "--copies", "1", "--max-new-tokens", "4", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["replicas"]) == {"1", "2"} and rep["speedup"] > 0 and rep["overhead_fraction"] >= 0
