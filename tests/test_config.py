"""Bad input: one clear line, exit status 2, no traceback, nothing written."""

import json
import os
import subprocess
import sys

import pytest

import unidask

from conftest import run_main, write_config


def one_error(err: str) -> str:
    """The single error line of a failed command (a banner may come before it)."""
    errors = [line for line in err.splitlines() if line.startswith("unidask: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_quickstart_config_is_valid():
    from conftest import REPO

    spec = unidask.load_config(REPO / "configs" / "quickstart.toml")
    assert (spec.count, spec.task_size, spec.n_tasks, spec.kind, spec.params["dim"]) == \
        (20000, 1000, 20, "haar", 4)
    assert spec.cluster.nodes == 2 and spec.storage.synchronous == "NORMAL"


DASK_DEFAULTS = ("import dask, distributed; print(dask.config.get('distributed.scheduler.allowed-failures'), "
                 "dask.config.get('distributed.worker.profile.enabled'))")

CLUSTER_SETTINGS = """
import sys, dask, distributed
import unidask
from unidask.execute import cluster

def settings():
    return (dask.config.get('distributed.scheduler.allowed-failures'),
            dask.config.get('distributed.worker.profile.enabled'))

if __name__ == "__main__":
    before = settings()
    with cluster.local_cluster(unidask.load_config(sys.argv[1])) as c, distributed.Client(c) as client:
        scheduler = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
        workers = set(client.run(lambda: dask.config.get('distributed.worker.profile.enabled')).values())
    print(*before, scheduler, *workers, *settings())
"""


def test_importing_unidask_leaves_dask_config_alone():
    """A notebook that imports unidask (to read a Dataset) keeps Dask's own settings."""
    dask_only = subprocess.run([sys.executable, "-c", DASK_DEFAULTS], capture_output=True, text=True,
                               check=True).stdout
    with_unidask = subprocess.run([sys.executable, "-c", "import unidask; " + DASK_DEFAULTS],
                                  capture_output=True, text=True, check=True).stdout
    assert with_unidask == dask_only == "3 True\n"


@pytest.mark.cluster
@pytest.mark.parametrize("env, failures", [({}, "10"), ({"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "5"}, "5")])
def test_dask_settings_of_unidask_yaml_apply_to_its_clusters_only(tmp_path, env, failures):
    """unidask.yaml's Dask settings reach the scheduler and the workers of the cluster unidask
    starts, but not the process around it, and not over what the user configured."""
    script = tmp_path / "settings.py"
    script.write_text(CLUSTER_SETTINGS)
    cfg = write_config(tmp_path / "c.toml")
    r = subprocess.run([sys.executable, str(script), str(cfg)], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=120)
    assert r.returncode == 0, r.stderr
    outside = env.get("DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES", "3")
    assert r.stdout.split() == [outside, "True", failures, "False", outside, "True"]


def test_mapping_overrides_are_applied_as_data(tmp_path):
    cfg = write_config(tmp_path / "c.toml", cluster={"max_in_flight": 8})
    assert unidask.load_config(cfg).cluster.max_in_flight == 8
    assert unidask.load_config(cfg, {"cluster.max_in_flight": None}).cluster.max_in_flight is None
    spec = unidask.load_config(cfg, {"run.run_dir": str(tmp_path / "x y"), "generator.dim": 3})
    assert spec.run_dir == tmp_path / "x y" and spec.params["dim"] == 3


def test_run_record_turns_back_into_the_spec(config):
    spec = config()
    unidask.RunDir(spec.run_dir).prepare(spec, resume=False)
    assert unidask.RunDir(spec.run_dir).spec() == spec


def test_overrides_and_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCH_X", str(tmp_path / "scratch"))
    cfg = write_config(tmp_path / "c.toml", storage={"local_dir": "${SCRATCH_X}/u"})
    spec = unidask.load_config(cfg, {"run.count": 777, "generator.dim": 3, "storage.synchronous": "off"})
    assert spec.count == 777 and spec.params["dim"] == 3 and spec.storage.synchronous == "OFF"
    assert spec.local_dir == tmp_path / "scratch" / "u"
    monkeypatch.delenv("TMPDIR", raising=False)
    cfg = write_config(tmp_path / "d.toml", storage={"local_dir": "${TMPDIR:-/var/tmp}/u"})
    assert unidask.load_config(cfg).local_dir.as_posix() == "/var/tmp/u"


def test_fingerprint_is_the_data_not_the_layout(tmp_path):
    a = unidask.load_config(write_config(tmp_path / "a.toml"))
    b = unidask.load_config(write_config(tmp_path / "b.toml", cluster={"nodes": 5}), {"run.run_dir": "x"})
    c = unidask.load_config(write_config(tmp_path / "c.toml"), {"run.seed": 8})
    assert a.fingerprint == b.fingerprint != c.fingerprint


BAD = [
    ({"run": {"count": 0}}, "run.count must be an integer from 1 to"),
    ({"run": {"count": -5}}, "run.count must be an integer from 1 to"),
    ({"run": {"count": 1.5}}, "run.count must be an integer from 1 to"),
    ({"run": {"task_size": "10"}}, "run.task_size must be an integer from 1 to"),
    ({"generator": {"dim": 0}}, "generator.dim must be int >= 1"),
    ({"generator": {"dim": True}}, "generator.dim must be int"),
    ({"generator": {"kind": "nope"}}, "unknown generator kind 'nope'"),
    ({"generator": {"dtype": "float64"}}, "generator.dtype must be one of complex128, complex64"),
    ({"generator": {"colour": 1}}, "takes no generator.colour: remove it from [generator]"),
    ({"storage": {"synchronous": "SOMETIMES"}}, "storage.synchronous must be one of"),
    ({"storage": {"page_size": 3000}}, "storage.page_size must be \"auto\" or a power of 2 from 512 to 65536"),
    ({"storage": {"page_size": 4096.0}}, "storage.page_size must be \"auto\" or a power of 2"),
    ({"storage": {"stage_every": 0}}, "storage.stage_every must be a number of seconds > 0"),
    ({"storage": {"local_dir": "${UNIDASK_SURELY_UNSET}/x"}}, "UNIDASK_SURELY_UNSET"),
    ({"run": {"name": "a b/c"}}, "run.name must be"),
    ({"cluster": {"mode": "cloud"}}, "cluster.mode must be one of"),
    ({"cluster": {"nodes": 0}}, "cluster.nodes must be an integer from 1 to"),
    # found by an adversary: accepted, then every task failed, or the checker built 3.8e9 chunks
    ({"storage": {"busy_timeout": float("nan")}}, "storage.busy_timeout must be a number of seconds > 0"),
    ({"storage": {"busy_timeout": float("inf")}}, "storage.busy_timeout must be a number of seconds > 0"),
    ({"storage": {"stage_every": 1e300}}, "storage.stage_every must be a number of seconds > 0 and at most"),
    ({"run": {"task_size": 10 ** 17}}, "run.task_size must be an integer from 1 to 9,007,199,254,740,992"),
    ({"storage": {"local_dir": "~nosuchuser/x"}}, "no user 'nosuchuser' on this machine"),
]


@pytest.mark.parametrize("sections,message", BAD, ids=[m for _, m in BAD])
def test_bad_config_values(tmp_path, capsys, sections, message):
    cfg = write_config(tmp_path / "bad.toml", **sections)
    code, out, err = run_main("run", cfg, capsys=capsys)
    assert code == 2, err
    assert message in err and str(cfg) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bad_config_files(tmp_path, capsys):
    cases = {"missing.toml": None, "broken.toml": "[run\ncount = 3", "unknown.toml": "[run]\ncolour = 1\n",
             "section.toml": "[extra]\na = 1\n", "notable.toml": "run = 3\n",
             "nocount.toml": "[generator]\ndim = 2\n"}
    expect = {"missing.toml": "config file not found", "broken.toml": "not valid TOML",
              "unknown.toml": "unknown key run.colour", "section.toml": "unknown section [extra]",
              "notable.toml": "[run] must be a table", "nocount.toml": "run.count is required"}
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        code, _, err = run_main("run", path, capsys=capsys)
        assert code == 2 and expect[name] in err and err.count("\n") == 1, (name, err)


def test_bad_set_override(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.toml")
    code, _, err = run_main("run", cfg, "--set", "count=5", capsys=capsys)
    assert code == 2 and "expected section.key=value" in err
    code, _, err = run_main("run", cfg, "--set", "run.count=abc", capsys=capsys)
    assert code == 2 and "run.count must be an integer" in err


def test_unwritable_run_dir_and_local_dir(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = write_config(tmp_path / "c.toml", run={"run_dir": str(blocker / "run")})
    code, _, err = run_main("run", cfg, capsys=capsys)
    assert code == 2 and f"run_dir {blocker / 'run'} is not writable" in one_error(err)
    cfg = write_config(tmp_path / "d.toml", storage={"local_dir": str(blocker / "local")})
    code, _, err = run_main("run", cfg, capsys=capsys)
    assert code == 2 and f"local_dir {blocker / 'local'} is not writable" in one_error(err)


@pytest.mark.cluster
def test_run_dir_of_another_run_is_refused_once_it_staged(tmp_path, capsys):
    """A run dir whose first attempt staged nothing (it failed as it started) takes the corrected
    config, saying so in one line; once anything is staged, another run is refused."""
    spec = unidask.load_config(write_config(tmp_path / "a.toml"))
    unidask.RunDir(spec.run_dir).prepare(spec, resume=False)   # what a failed first attempt leaves
    code, out, err = run_main("run", write_config(tmp_path / "b.toml", run={"seed": 99}), capsys=capsys)
    assert code == 0 and "replacing the record of a run that staged nothing" in err, err
    assert json.loads((spec.run_dir / "run.json").read_text())["spec"]["run"]["seed"] == 99
    code, _, err = run_main("run", write_config(tmp_path / "c.toml", run={"seed": 5}, generator={"dim": 3}),
                            capsys=capsys)
    assert code == 2 and (f"{spec.run_dir} holds another run (run.seed = 99 there, 5 in the config; "
                          "generator.dim = 4 there, 3 in the config): choose another run.run_dir") in err, err


@pytest.mark.cluster
def test_a_complete_run_says_so(tmp_path, capsys):
    """Running a finished, merged run again (with or without --resume) generates nothing and says
    where its database is."""
    cfg = write_config(tmp_path / "a.toml")
    assert run_main("run", cfg, capsys=capsys)[0] == 0
    db_path = tmp_path / "run" / "t.db"
    before = db_path.stat().st_mtime_ns
    for extra in ([], ["--resume"]):
        code, out, err = run_main("run", cfg, *extra, capsys=capsys)
        assert code == 0 and out == f"complete: {db_path} holds all 2,000 unitaries; nothing to do\n", out + err
    assert db_path.stat().st_mtime_ns == before           # not merged again


def test_usage_errors_exit_2(capsys):
    code, _, err = run_main("export", "x.db", capsys=capsys)
    assert code == 2 and "Missing" in err
    code, _, err = run_main("frobnicate", capsys=capsys)
    assert code == 2


def test_dask_env_carries_unidask_settings_to_a_bare_dask_process(tmp_path):
    """What a job script exports (`unidask config --dask-env`) gives a `dask worker`, which never
    imports unidask, the settings of unidask.yaml, and keeps a value the user set."""
    cfg = write_config(tmp_path / "c.toml")
    r = subprocess.run([sys.executable, "-m", "unidask.cli", "config", str(cfg), "--dask-env"],
                       capture_output=True, text=True, env={**os.environ, "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "2s"})
    assert r.returncode == 0, r.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in r.stdout.splitlines())
    assert exports["DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL"] == "2s"   # the user's, not unidask's 1s
    code = ("import dask, distributed; print(dask.config.get('distributed.scheduler.allowed-failures'), "
            "dask.config.get('distributed.worker.profile.enabled'), "
            "dask.config.get('distributed.worker.memory.monitor-interval'), "
            "'unidask' in __import__('sys').modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **exports}).stdout.split()
    assert out == ["10", "False", "1s", "False"]


@pytest.mark.cluster
def test_dashboard_address_mistakes_are_one_line_and_leave_nothing(tmp_path, capsys):
    """A malformed address is refused as config; one this machine cannot listen at fails before
    the run dir exists; a port in use is one warning line, and the run goes on elsewhere."""
    import socket

    for bad, said in (("nohost:99999", "must be HOST:PORT or :PORT"), ("8787", "must be HOST:PORT"),
                      ("nohost.invalid:8787", "cannot listen there"), ("192.0.2.1:8787", "cannot listen there")):
        cfg = write_config(tmp_path / "c.toml", cluster={"dashboard_address": bad})
        code, _, err = run_main("run", cfg, capsys=capsys)
        assert code == 2 and said in one_error(err) and not (tmp_path / "run").exists(), (bad, err)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path / "d.toml", run={"count": 200}, cluster={"dashboard_address": f"127.0.0.1:{port}"})
        code, _, err = run_main("run", cfg, capsys=capsys)
    assert code == 0, err
    assert f"cluster.dashboard_address 127.0.0.1:{port}: that port is in use" in err
    assert "already in use" not in err and "Perhaps" not in err


def test_merge_into_a_place_that_takes_no_file_is_bad_input(haar_run, capsys):
    spec, _ = haar_run
    code, _, err = run_main("merge", spec.run_dir, "-o", "/proc/out.db", capsys=capsys)
    assert code == 2 and "cannot write /proc/out.db" in one_error(err)


def test_config_get_prints_the_value_the_run_uses(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.toml", cluster={"nodes": 2, "workers": 3})
    for key, value in (("cluster.max_in_flight", "16"), ("cluster.workers", "3"), ("cluster.interface", "null"),
                       ("cluster.job_extra_directives", "[]"), ("run.count", "2000")):
        code, out, _ = run_main("config", cfg, "--get", key, capsys=capsys)
        assert code == 0 and out == value + "\n", (key, out)
    code, out, _ = run_main("config", cfg, "--get", "cluster.workers", "--set", 'cluster.workers="auto"',
                            capsys=capsys)
    assert out.strip() == str(max(1, (os.cpu_count() or 1) // 2))


@pytest.mark.cluster
@pytest.mark.parametrize("name", ["quickstart", "circuits", "orthogonal"])
def test_each_shipped_config_runs(name, tmp_path, capsys):
    """configs/ has a config per generator family; each runs as shipped (smaller, elsewhere)."""
    from conftest import REPO

    cfg = REPO / "configs" / f"{name}.toml"
    code, out, err = run_main("run", cfg, "--set", "run.count=400", "--set", "run.task_size=200",
                              "--set", f'run.run_dir="{tmp_path / "run"}"',
                              "--set", f'storage.local_dir="{tmp_path / "local"}"',
                              "--set", 'cluster.dashboard_address="127.0.0.1:0"', capsys=capsys)
    assert code == 0 and "400 unitaries, 2/2 tasks" in out, out + err


def test_switching_kind_names_the_key_to_drop(capsys):
    from conftest import REPO

    code, _, err = run_main("run", REPO / "configs" / "quickstart.toml", "--set", 'generator.kind="circuit"',
                            capsys=capsys)
    assert code == 2 and "kind 'circuit' takes no generator.dim: remove it from [generator]" in one_error(err)
