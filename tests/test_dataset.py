"""Reading the merged database back: Dataset, export to .npy and .txt."""

import concurrent.futures
import functools
import json
import multiprocessing
import pickle
import re
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

import unidask

from unidask.spec.generators.haar import haar

from conftest import run_main, write_config


def test_dataset_indexing_and_batches(haar_run):
    _, db = haar_run
    with unidask.Dataset(db) as ds:
        con = sqlite3.connect(db)
        raw = con.execute("SELECT data FROM unitaries WHERE id = 12345").fetchone()[0]
        assert ds[12345].tobytes() == raw and ds[12345].shape == (4, 4)
        assert np.array_equal(ds[-1], ds[19999])
        assert np.array_equal(ds[10:20], np.stack([ds[i] for i in range(10, 20)]))
        assert np.array_equal(ds[0:10:3], ds[0:10][::3])
        batches = list(ds.batches(size=7000))
        assert [len(b) for _, b in batches] == [7000, 7000, 6000]
        assert np.array_equal(np.concatenate([i for i, _ in batches]), np.arange(20000))
        assert sum(1 for _ in ds) == 20000
        assert ds.meta_of(5) is None
        with pytest.raises(IndexError):
            ds[20000]


def test_ids_and_split_of_an_incomplete_dataset(haar_run, tmp_path):
    """A dataset that lacks a task (a merge with --skip-bad) has no ids for it: neither ids() nor
    split() nor stats' sample invent them."""
    from unidask.views import stats

    _, db = haar_run
    holed = without_task_3(db, tmp_path)
    with unidask.Dataset(holed) as ds, unidask.Dataset(db) as whole:
        assert np.array_equal(whole.ids(), np.arange(20000))
        expected = np.concatenate([np.arange(3000), np.arange(4000, 20000)])
        assert np.array_equal(ds.ids(), expected)
        parts = ds.split(seed=1, train=0.5, test=0.5)
        assert np.array_equal(np.sort(np.concatenate(list(parts.values()))), expected)
        ids, u = stats.sample(ds, 19000, seed=0)
        assert len(ids) == 19000 and not np.isin(ids, np.arange(3000, 4000)).any()
        assert np.array_equal(u, whole[ids])


def test_dataset_takes_an_array_of_ids(haar_run):
    """A random minibatch: any order, repeats, negative ids; a missing id or a non-integer array
    is refused."""
    _, db = haar_run
    with unidask.Dataset(db) as ds:
        ids = np.random.default_rng(3).integers(0, 20000, 300)
        ids[:3] = [17, 17, -1]
        batch = ds[ids]
        assert batch.shape == (300, 4, 4)
        assert np.array_equal(batch, np.stack([ds[int(i)] for i in ids]))
        assert np.array_equal(ds[[5, 3]], np.stack([ds[5], ds[3]])) and ds[[]].shape == (0, 4, 4)
        with pytest.raises(IndexError, match="id 20000 is out of range: the dataset holds ids 0:20000"):
            ds[[1, 20000, 30000]]
        for bad in (np.array([1.5]), [1.5], "a", np.array(["a"])):   # as numpy: IndexError
            with pytest.raises(IndexError, match="valid indices"):
                ds[bad]


def test_dataset_indexes_as_numpy_does(haar_run):
    """Every key a numpy user would try gives what it gives on the same array in memory; what numpy
    refuses, the Dataset refuses with the same kind of error; a lone boolean is refused."""
    _, db = haar_run
    with unidask.Dataset(db) as ds:
        ref = ds[:]
        assert ref.shape == (20000, 4, 4)
        for key in (slice(None, None, -1), slice(5, 0, -1), slice(5, 0), slice(-3, None),
                    slice(None, None, 100), slice(19990, 5, -7), slice(0, 100, 20), slice(-5, -1, 2),
                    slice(30000, 40000), slice(-30000, 3), -1, -20000, 0, 19999, np.int64(5),
                    np.array(7), [3, -1, 3], np.array([19999, 0], dtype=np.uint16)):
            got = ds[key]
            assert got.shape == ref[key].shape and np.array_equal(got, ref[key]), key
        for key in (20000, -20001, 2**63, -2**63 - 1, [0, 2**63], np.array([20000])):
            with pytest.raises(IndexError, match="out of range"):
                ds[key]
        for key in (True, False, np.True_):   # numpy would add an axis to the whole dataset
            with pytest.raises(TypeError, match="a single boolean"):
                ds[key]
        for key in (np.array([True, False]), [True]):
            with pytest.raises(IndexError, match="boolean index did not match"):
                ds[key]


@settings(max_examples=1000, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_dataset_indexes_a_stack_of_matrices_as_numpy(haar_run, data):
    """Fuzzed keys (hypothesis: numpy's basic indices, integer and boolean arrays, sequences,
    ranges, in tuples with indices into the matrices): the Dataset gives what numpy gives on the
    same array in memory, or raises the same kind of error."""
    _, db = haar_run
    ds = _opened(db)
    ref = _whole(db)
    n = len(ref)
    first = st.one_of(
        st.integers(-n - 3, n + 3), st.slices(n + 5), st.just(Ellipsis), st.none(),
        npst.integer_array_indices((n,), result_shape=npst.array_shapes(min_dims=1, max_dims=2, max_side=5)).map(
            lambda t: t[0]),
        st.lists(st.integers(-n, n - 1), max_size=6), st.builds(range, st.integers(-3, 30), st.integers(-3, 30)),
        st.sampled_from([np.arange(n) % 7 == 0, np.ones(3, bool)]))   # a mask, and one of a wrong length
    inner = st.one_of(st.integers(-5, 4), st.slices(4), st.lists(st.integers(-4, 3), min_size=1, max_size=3),
                      st.just(Ellipsis), st.none())
    key = data.draw(st.one_of(first, st.tuples(first), st.tuples(first, inner), st.tuples(first, inner, inner),
                              st.tuples(first, inner, inner, inner)))
    try:
        want = ref[key]
    except (IndexError, TypeError, ValueError) as e:
        with pytest.raises(type(e)):
            ds[key]
        return
    got = ds[key]
    assert np.shape(got) == np.shape(want) and np.array_equal(got, want), key


_OPEN: dict = {}


def _opened(db) -> unidask.Dataset:
    if db not in _OPEN:
        _OPEN[db] = unidask.Dataset(db)
    return _OPEN[db]


def _whole(db) -> np.ndarray:
    if ("ref", db) not in _OPEN:
        _OPEN["ref", db] = _opened(db)[:]
    return _OPEN["ref", db]


def without_task_3(db, tmp_path):
    """A copy of the haar run's database without task 3 (ids 3000-3999), as a merge with
    --skip-bad leaves one."""
    holed = tmp_path / "holed.db"
    shutil.copyfile(db, holed)
    con = sqlite3.connect(holed)
    con.execute("DELETE FROM unitaries WHERE id >= 3000 AND id < 4000")
    con.execute("DELETE FROM tasks WHERE task = 3")
    con.execute("DELETE FROM meta WHERE key = 'rows'")
    con.commit()
    con.close()
    return holed


def test_dataset_is_array_like(haar_run):
    """shape, dtype, ndim, np.asarray: a Dataset goes wherever numpy takes an array."""
    _, db = haar_run
    with unidask.Dataset(db) as ds:
        assert ds.shape == (20000, 4, 4) and ds.ndim == 3 and ds.dtype == np.complex128
        whole = np.asarray(ds)
        assert whole.shape == ds.shape and np.array_equal(whole, ds[:])
        assert np.asarray(ds, dtype=np.complex64).dtype == np.complex64
        assert ds[5, 0, 0] == ds[5][0, 0] and np.ndim(ds[5, 0, 0]) == 0
        assert np.array_equal(ds[(1, 2)], ds[1][2]) and np.array_equal(ds[range(3)], ds[:3])
        with pytest.raises(IndexError, match="too many indices for array: array is 3-dimensional, but 4"):
            ds[0, 0, 0, 0]
        for size in (0, -5, 2.5, True):
            with pytest.raises(ValueError, match="batch size must be an integer >= 1"):
                next(ds.batches(size))


def test_positions_read_an_incomplete_dataset_as_a_data_loader_does(haar_run, tmp_path):
    """A dataset without some tasks: ids keep their gaps (the stable key), `ds.at[k]` reads the
    k-th row for every k < len(ds), as `for k in range(len(...))` and a DataLoader do."""
    _, db = haar_run
    with unidask.Dataset(db) as whole, unidask.Dataset(without_task_3(db, tmp_path)) as ds:
        assert len(ds) == len(ds.at) == 19000 and ds.shape == (19000, 4, 4)
        with pytest.raises(IndexError, match="no unitary with id 3000"):
            ds[3000]
        ids = ds.ids()
        for k in (0, 2999, 3000, 18999, -1):
            assert np.array_equal(ds.at[k], whole[int(ids[k])]), k
        assert np.array_equal(ds.at[2999:3002], whole[[2999, 4000, 4001]])
        assert np.array_equal(ds.at[[3000, 0], 1, 1], whole[[4000, 0], 1, 1])
        assert np.array_equal(np.asarray(ds), whole[ids])
        with pytest.raises(IndexError):
            ds.at[19000]
        loaded = pickle.loads(pickle.dumps(ds.at))   # a DataLoader's worker gets it pickled
        assert np.array_equal(loaded[3000], ds.at[3000])


def test_dataset_arrays_are_the_callers(haar_run):
    """Writable arrays (torch.from_numpy warns of a read-only one), not views of shared memory."""
    _, db = haar_run
    with unidask.Dataset(db) as ds:
        for a in (ds[0], ds[0:5], ds[::-3], ds[[1, 2, 1]], next(ds.batches(10))[1]):
            assert a.flags.writeable and a.flags.owndata or a.base is not None and a.flags.writeable
            before = ds[1].copy()
            a[...] = 0
            assert np.array_equal(ds[1], before)


def read_rows(ds: unidask.Dataset, ids: list[int]) -> bytes:
    return ds[ids].tobytes() + json.dumps(ds.meta_of(ids[0])).encode()


def test_dataset_goes_to_spawned_processes_and_threads(haar_run):
    """A DataLoader's workers: the Dataset pickled to processes started with spawn (macOS's
    default, Linux's forkserver from Python 3.14) and read from many threads at once."""
    _, db = haar_run
    ds = unidask.Dataset(db)
    batches = [list(np.random.default_rng(i).integers(0, 20000, 256)) for i in range(16)]
    want = [read_rows(ds, b) for b in batches]
    assert pickle.loads(pickle.dumps(ds)).path == ds.path
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert pool.map(functools.partial(read_rows, ds), batches) == want
    with concurrent.futures.ThreadPoolExecutor(8) as threads:
        assert list(threads.map(functools.partial(read_rows, ds), batches * 4)) == want * 4
    ds.close()                      # every thread's connection, from this one
    assert read_rows(ds, batches[0]) == want[0]   # and it opens again when read
    ds.close()


def test_split_is_deterministic_disjoint_and_by_fraction(haar_run):
    _, db = haar_run
    with unidask.Dataset(db) as ds:
        parts = ds.split(seed=1, train=0.8, validation=0.1, test=0.1)
        again = unidask.Dataset(db).split(seed=1, train=0.8, validation=0.1, test=0.1)
        assert list(parts) == ["train", "validation", "test"]
        assert all(np.array_equal(parts[k], again[k]) for k in parts)
        assert np.array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(20000))
        for name, f in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
            sigma = (20000 * f * (1 - f)) ** 0.5
            assert abs(len(parts[name]) - 20000 * f) < 4 * sigma, (name, len(parts[name]))
        other = ds.split(seed=2, train=0.8, validation=0.1, test=0.1)
        assert not np.array_equal(other["test"], parts["test"])
        # an id's part depends on the id and the seed only, not on what else the dataset holds
        small = ds.split(seed=1, train=0.8, rest=0.2)
        assert np.array_equal(small["train"], parts["train"])
        for bad in ({"train": 0.8}, {"train": 1.2, "test": -0.2}, {}):
            with pytest.raises(ValueError, match="sum to 1"):
                ds.split(**bad)


def test_export_npy_round_trip(haar_run, tmp_path, capsys):
    _, db = haar_run
    out = tmp_path / "u.npy"
    code, stdout, _ = run_main("export", db, out, "--ids", "100:1100", capsys=capsys)   # npy: OUT's suffix
    assert code == 0 and "exported 1,000" in stdout
    with unidask.Dataset(db) as ds:
        assert np.array_equal(np.load(out), ds[100:1100])


def test_export_txt_round_trip(haar_run, tmp_path, capsys):
    _, db = haar_run
    out = tmp_path / "txt"
    code, _, _ = run_main("export", db, out, "--ids", "5:25", capsys=capsys)   # txt: OUT is no .npy
    assert code == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files[:2]] == ["00005.txt", "00006.txt"] and len(files) == 20
    with unidask.Dataset(db) as ds:
        for f, i in zip(files, range(5, 25)):
            assert np.array_equal(np.loadtxt(f, dtype=complex), ds[i])   # exact, bit for bit


def test_export_of_many_text_files_must_be_asked_for(haar_run, tmp_path, capsys):
    """An OUT that is no .npy would mean a text file per unitary: thousands of them (the pattern
    unidask exists to avoid) only with --format txt, and the refusal writes nothing."""
    _, db = haar_run
    code, _, err = run_main("export", db, tmp_path / "all", capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "that would be 20,000 text files" in err, err
    assert f"{tmp_path / 'all'}.npy" in err and "--format txt" in err and not (tmp_path / "all").exists()
    code, stdout, _ = run_main("export", db, tmp_path / "all", "--format", "txt", "--ids", "0:1001", capsys=capsys)
    assert code == 0 and len(list((tmp_path / "all").iterdir())) == 1001


@pytest.mark.cluster
def test_export_txt_of_complex64_is_exact(config, tmp_path):
    spec = config(run={"count": 50, "task_size": 25}, generator={"dtype": "complex64", "dim": 3})
    db = unidask.run(spec).merged.out
    unidask.export(db, "txt", tmp_path / "t")
    with unidask.Dataset(db) as ds:
        assert ds[0].dtype == np.complex64
        back = np.loadtxt(tmp_path / "t" / "00.txt", dtype=complex)
        assert np.array_equal(back, ds[0].astype(complex))
        assert np.array_equal(back.astype(np.complex64), ds[0])


@pytest.mark.parametrize("ids", ["0:20001", "5:5", "-1:3", "abc", "3"])
def test_export_refuses_bad_ids(haar_run, tmp_path, ids, capsys):
    _, db = haar_run
    code, _, err = run_main("export", db, "--format", "npy", tmp_path / "x.npy", "--ids", ids, capsys=capsys)
    assert code == 2 and "--ids" in err and err.count("\n") == 1
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("out,reason", [("missing/u.npy", "No such file or directory"),
                                        ("a-file/u.npy", "Not a directory"),
                                        ("a-file", "File exists")])   # txt: OUT must be a directory
def test_export_to_a_path_it_cannot_write(haar_run, tmp_path, out, reason, capsys):
    _, db = haar_run
    (tmp_path / "a-file").write_text("mine")
    code, _, err = run_main("export", db, tmp_path / out, "--ids", "0:10", capsys=capsys)
    assert code == 2 and err == f"unidask: error: cannot write {tmp_path / out}: {reason}\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]   # no temp file left
    assert (tmp_path / "a-file").read_text() == "mine"


def test_export_refuses_what_is_not_a_unidask_database(tmp_path, capsys):
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE x(a)")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    for path in (other, junk, tmp_path / "missing.db"):
        code, _, err = run_main("export", path, "--format", "npy", tmp_path / "x.npy", capsys=capsys)
        assert code == 2 and str(path) in err and err.count("\n") == 1, err
        with pytest.raises(unidask.InputError):
            unidask.Dataset(path)


def test_info_says_what_a_database_holds(haar_run, capsys, tmp_path):
    spec, db = haar_run
    code, out, err = run_main("info", db, capsys=capsys)
    assert code == 0 and err == ""
    assert "20,000 unitaries of 4x4 complex128" in out and "haar (dim=4" in out
    assert "seed       7 " in out and "complete: 20 of 20 tasks" in out
    assert f"fingerprint {spec.fingerprint}" in out and "merged     -" not in out
    assert re.search(r"merged     \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", out), out   # a date with the time
    code, out, _ = run_main("info", db, "--json", capsys=capsys)
    i = json.loads(out)
    assert code == 0 and (i["rows"], i["dim"], i["kind"], i["tasks"], i["tasks_planned"]) == \
        (20000, 4, "haar", 20, 20) and i["merged"] > 0 and i["bytes"] == db.stat().st_size
    shard = unidask.RunDir(spec.run_dir).staged_shards()[0]
    code, out, _ = run_main("info", shard, capsys=capsys)
    assert code == 0 and "INCOMPLETE" in out and "merged     -" in out
    (tmp_path / "text.db").write_text("not sqlite")
    for bad in (tmp_path / "text.db", tmp_path / "missing.db"):
        code, out, err = run_main("info", bad, capsys=capsys)
        assert code == 2 and out == "" and err.startswith(f"unidask: error: {bad}") and err.count("\n") == 1


@pytest.fixture(scope="module")
def circuit_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("circ")
    spec = unidask.load_config(write_config(base / "c.toml", run={"count": 600, "task_size": 100},
                                            generator={"kind": "circuit", "qubits": 2, "depth": 4}))
    return spec, unidask.run(spec).merged.out


def test_export_keeps_what_the_database_knows(circuit_run, tmp_path, capsys):
    """.npy: the array, and beside it the ids, the spec and every row's circuit; HDF5: the same
    in one file, read with plain h5py."""
    h5py = pytest.importorskip("h5py")
    spec, db = circuit_run
    ds = unidask.Dataset(db)
    code, out, _ = run_main("export", db, tmp_path / "c.npy", "--ids", "100:400", capsys=capsys)
    assert code == 0 and "exported 300" in out
    assert np.array_equal(np.load(tmp_path / "c.npy"), ds[100:400])
    about = json.loads((tmp_path / "c.npy.json").read_text())
    assert about["ids"] == {"start": 100, "stop": 400} and about["spec"] == ds.spec
    assert about["meta"]["fingerprint"] == spec.fingerprint and about["meta"]["dtype"] == "complex128"
    lines = [json.loads(x) for x in (tmp_path / "c.npy.meta.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == list(range(100, 400))
    assert all(x["meta"] == ds.meta_of(x["id"]) and "qasm" in str(x["meta"]) for x in lines)

    code, out, _ = run_main("export", db, tmp_path / "c.h5", capsys=capsys)
    assert code == 0 and "exported 600" in out
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert np.array_equal(f["unitaries"][:], ds[:]) and np.array_equal(f["ids"][:], np.arange(600))
        assert f["unitaries"].chunks is not None
        assert [json.loads(m) for m in f["meta"].asstr()[:]] == [ds.meta_of(i) for i in range(600)]
        assert json.loads(f.attrs["spec"]) == ds.spec and f.attrs["fingerprint"] == spec.fingerprint
        assert f.attrs["ids_start"] == 0 and f.attrs["ids_stop"] == 600 and f["meta"].chunks is not None
    # a group dataset has no per-row metadata: no meta file beside the array, no meta dataset
    ds.close()


def test_export_of_group_data_has_no_meta_file(haar_run, tmp_path):
    h5py = pytest.importorskip("h5py")
    _, db = haar_run
    assert unidask.export(db, None, tmp_path / "u.npy") == 20000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.npy", "u.npy.json"]
    assert unidask.export(db, "h5", tmp_path / "u.data") == 20000
    with h5py.File(tmp_path / "u.data", "r") as f:
        assert sorted(f) == ["ids", "unitaries"]


def test_hdf5_as_an_h5py_user_expects_it(haar_run, tmp_path, capsys):
    """Attributes typed (numbers as numbers, the merge's time in ISO 8601, the run's dim, kind,
    dtype, law, seed, count of their own), chunks sized for random reads or as asked, ids chunked,
    gzip or lzf that plain h5py reads; HDF5's options refused for other formats."""
    import datetime

    h5py = pytest.importorskip("h5py")
    spec, db = haar_run
    with unidask.Dataset(db) as ds:
        whole = ds[:]
        merged = float(ds.meta["merged"])
    code, out, _ = run_main("export", db, tmp_path / "u.h5", capsys=capsys)
    assert code == 0, out
    with h5py.File(tmp_path / "u.h5", "r") as f:
        a = f.attrs
        assert (a["dim"], a["kind"], a["dtype"], a["law"], a["seed"], a["count"], a["task_size"]) == \
            (4, "haar", "complex128", "U(n)", 7, 20000, 1000)
        assert isinstance(a["rows"], (int, np.integer)) and a["rows"] == 20000 and a["tasks"] == 20
        assert isinstance(a["fingerprint"], str) and a["fingerprint"] == spec.fingerprint
        when = datetime.datetime.fromisoformat(a["merged"])
        assert when.tzinfo is not None and abs(when.timestamp() - merged) < 1e-3
        assert f["unitaries"].chunks == (256, 4, 4) and f["unitaries"].compression is None   # 64 KiB
        assert f["ids"].chunks is not None
        assert np.array_equal(f["unitaries"][:], whole)
    for compression in ("gzip", "lzf"):
        code, out, _ = run_main("export", db, tmp_path / f"{compression}.h5", "--compression", compression,
                                "--chunk-rows", "1000", capsys=capsys)
        assert code == 0, out
        with h5py.File(tmp_path / f"{compression}.h5", "r") as f:
            assert f["unitaries"].compression == compression and f["unitaries"].chunks == (1000, 4, 4)
            assert np.array_equal(f["unitaries"][:], whole) and np.array_equal(f["ids"][:], np.arange(20000))
    code, _, err = run_main("export", db, tmp_path / "u.npy", "--compression", "gzip", capsys=capsys)
    assert code == 2 and err.strip().endswith("chunk_rows and compression are HDF5's: "
                                              f"{tmp_path / 'u.npy'} is written as npy"), err
    assert not (tmp_path / "u.npy").exists()


# the process's own memory (RssAnon, sampled every 2 ms): the pages of the files it maps or
# writes are the page cache's, which the kernel writes back and drops as it needs
EXPORT_RSS = """
import re, sys, threading, time, unidask
peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        anon = re.search(r"RssAnon:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)
        peak[0] = max(peak[0], int(anon) * 1024)
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
time.sleep(0.05)
unidask.export(sys.argv[1], None, sys.argv[2])
done.set()
print(peak[0])
"""


@pytest.mark.cluster
def test_export_streams_with_flat_memory(config, tmp_path):
    """An export several times larger than the memory the exporting process ever holds, measured
    in a fresh process, for .npy and HDF5 (both written in batches)."""
    spec = config(run={"count": 120_000, "task_size": 10_000}, generator={"dim": 16})
    db = unidask.run(spec).merged.out
    data = 120_000 * 16 * 16 * 16
    idle = int(subprocess.run([sys.executable, "-c", "import h5py\n" + EXPORT_RSS.replace(
        "unidask.export(sys.argv[1], None, sys.argv[2])", "time.sleep(0.2)")],
        capture_output=True, text=True, check=True).stdout)   # the imports alone
    for out in ("big.npy", "big.h5"):
        r = subprocess.run([sys.executable, "-c", EXPORT_RSS, str(db), str(tmp_path / out)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        peak = int(r.stdout)
        # the .npy's pages written through the map count as resident while dirty: bound by data / 3
        print(f"{out}: peak anonymous RSS {peak / 1e6:.0f} MB, imports alone {idle / 1e6:.0f} MB, "
              f"data {data / 1e6:.0f} MB")
        assert peak - idle < data / 3, (out, peak / 1e6, idle / 1e6, data / 1e6)
        (tmp_path / out).unlink()


@pytest.mark.cluster
def test_duplicates_dropped_by_circuit_or_by_unitary(config, tmp_path, capsys):
    """One qubit, two gates from {s, sdg}: 4 circuits (s s, s sdg, sdg s, sdg sdg) and 2 unitaries
    (Z and I). The database keeps every row; the export drops the repeats and says how many."""
    spec = config(run={"count": 400, "task_size": 100},
                  generator={"kind": "circuit", "qubits": 1, "gates": 2, "gate_set": ["s", "sdg"]})
    db = unidask.run(spec).merged.out
    with unidask.Dataset(db) as ds:
        by_circuit, by_unitary = ds.unique_ids("circuit"), ds.unique_ids("unitary")
        assert len(by_circuit) == 4 and len(by_unitary) == 2 and len(ds) == 400
        circuits = {ds.meta_of(int(i))["qasm"] for i in by_circuit}
        assert len(circuits) == 4 and by_circuit[0] == 0
        first = {}
        for i in range(400):
            first.setdefault(ds.meta_of(i)["qasm"], i)
        assert sorted(first.values()) == by_circuit.tolist()   # the first of each
        with pytest.raises(ValueError, match="circuit' or 'unitary"):
            ds.unique_ids("gates")
    code, out, err = run_main("export", db, tmp_path / "u.npy", "--unique", "circuit", capsys=capsys)
    assert code == 0 and "exported 4 unitaries" in out and "dropped 396 of 400 rows that repeat an earlier circuit" in err
    assert json.loads((tmp_path / "u.npy.json").read_text())["ids"] == by_circuit.tolist()
    assert len((tmp_path / "u.npy.meta.jsonl").read_text().splitlines()) == 4
    code, out, err = run_main("export", db, tmp_path / "u.h5", "--unique", "unitary", capsys=capsys)
    assert code == 0 and "exported 2 unitaries" in out and "dropped 398" in err


def test_up_to_phase_identifies_a_global_phase_only():
    from unidask.store.dataset import up_to_phase

    u = haar(np.random.default_rng(2), 50, dim=4)
    phased = u * np.exp(1j * np.random.default_rng(3).uniform(0, 2 * np.pi, 50))[:, None, None]
    assert np.array_equal(up_to_phase(u, 9), up_to_phase(phased, 9))
    assert len({r.tobytes() for r in up_to_phase(np.concatenate([u, phased]), 9)}) == 50
    other = u.copy()
    other[:, 0] *= -1                     # a phase on one column is not a global phase
    assert not np.array_equal(up_to_phase(u, 9), up_to_phase(other, 9))
