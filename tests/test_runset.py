"""Run sets: one run's rank files read and analysed as one, on planted sets with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _synth import info, rank_files, records, write_run
from typer.testing import CliRunner

import dropspy
from dropspy.analysis import analyze_run, analyze_summaries
from dropspy.analysis.summary import from_dict, to_dict
from dropspy.cli import app
from dropspy.errors import RunFileError
from dropspy.records import Record
from dropspy.report import load_schema
from dropspy.report import to_dict as report_dict
from dropspy.runset import RunSet, RunSetError, analyze_files, resolve_set, summarize_file

runner = CliRunner()


def _codes(result, site=None):
    found = result.all_findings if site is None else result[site].findings
    return {f.code for f in found}


def test_load_of_a_base_name_with_rank_siblings_is_a_set_with_per_rank_access(tmp_path):
    paths = rank_files(tmp_path, [1, 2])
    with dropspy.load(tmp_path / "run.h5") as s:
        assert isinstance(s, RunSet)
        assert s.ranks == (0, 1) and s.sites == ("drop", "spatial")
        site = s["drop"]
        assert site.ranks == (0, 1) and len(site) == 12
        assert np.array_equal(site.record_ranks, [0] * 6 + [1] * 6)
        with dropspy.load(paths[1]) as one:
            assert np.array_equal(site.mask(6), one["drop"].mask(0))
            assert np.array_equal(s.rank(1)["drop"].noise(3), one["drop"].noise(3))
        assert len(site.masks(2)) == 2 and len(site.masks(2, rank=1)) == 1


def test_testing_helpers_take_a_run_set(tmp_path):
    from dropspy.testing import assert_mask_structure

    rank_files(tmp_path, [1, 2])
    assert_mask_structure(tmp_path / "run.h5", "spatial", shared=["time"], rate=0.3,
                          ranks="independent")
    with pytest.raises(AssertionError, match="ranks: expected identical, observed independent"):
        assert_mask_structure(tmp_path / "run.h5", "drop", ranks="identical")
    with dropspy.load(tmp_path / "run.h5") as s:
        assert analyze_run(s) == s.report()


def test_identical_ranks_are_a_warning_with_counts_and_chance(tmp_path):
    rank_files(tmp_path, [7, 7])
    with dropspy.load(str(tmp_path / "run.rank*.h5")) as s:
        result = s.report()
    for name in ("drop", "spatial"):
        site = result[name]
        assert site.across.verdict == "identical"
        assert (site.across.identical, site.across.pairs) == (6, 6)
        assert site.across.log10_chance < -9
        (f,) = [f for f in site.findings if f.code == "identical-across-ranks"]
        assert f.severity == "warning" and "torch.manual_seed(base + rank)" in f.message
        assert f.data["by_copy"] == {"rank 1": [6, 6]}
    assert [r.rank for r in result["drop"].ranks] == [0, 1]
    assert [r.records for r in result["drop"].ranks] == [6, 6]


def test_independent_ranks_are_not_a_finding(tmp_path):
    rank_files(tmp_path, [1, 2, 3])
    result = analyze_files(sorted(tmp_path.glob("*.h5")), jobs=1)
    for name in ("drop", "spatial"):
        assert result[name].across.verdict == "independent"
        assert result[name].across.pairs == 12 and result[name].across.identical == 0
    assert "identical-across-ranks" not in _codes(result)


def test_mixed_ranks_say_which_rank_repeats_which(tmp_path):
    rank_files(tmp_path, [4, 4, 9])
    result = analyze_files(sorted(tmp_path.glob("*.h5")), jobs=1)
    c = result["drop"].across
    assert c.verdict == "partial" and (c.identical, c.pairs) == (6, 12)
    (f,) = [f for f in result["drop"].findings if f.code == "identical-across-ranks"]
    assert f.data["by_copy"] == {"rank 1": [6, 6], "rank 2": [0, 6]}


def test_verdicts_over_the_set_pool_every_rank(tmp_path):
    paths = rank_files(tmp_path, [1, 2])
    result = analyze_files(paths, jobs=1)
    singles = [analyze_run(dropspy.load(p)) for p in paths]
    site = result["drop"]
    assert site.records == sum(r["drop"].records for r in singles)
    assert site.rate.elements == sum(r["drop"].rate.elements for r in singles)
    assert site.pattern == "elementwise" and result["spatial"].pattern == "time-shared"
    assert [r.rate_observed for r in site.ranks] == [r["drop"].rate.observed for r in singles]


def test_missing_rank_is_said_plainly(tmp_path):
    rank_files(tmp_path, [1, 2], world_size=3)
    result = analyze_files(sorted(tmp_path.glob("*.h5")), jobs=1)
    (f,) = [f for f in result.findings if f.code == "rank-missing"]
    assert f.data["missing"] == [2] and "missing rank(s): 2" in f.message


def test_a_rank_with_other_sites_is_said_plainly(tmp_path):
    rank_files(tmp_path, [1, 2], extra_site=1)
    result = analyze_files(sorted(tmp_path.glob("*.h5")), jobs=1)
    differ = [f for f in result.findings if f.code == "rank-sites-differ"]
    assert {f.data["rank"] for f in differ} == {0, 1}
    assert [r.rank for r in result["only_here"].ranks] == [1]


def test_files_of_different_runs_are_refused_unless_forced(tmp_path):
    rank_files(tmp_path, [1], run_id="a", stem="x")
    rank_files(tmp_path, [2], run_id="b", stem="y", ranks=[1])
    paths = sorted(tmp_path.glob("*.h5"))
    with pytest.raises(RunSetError, match="run ids differ"):
        analyze_files(paths, jobs=1)
    with pytest.raises(RunSetError, match="run ids differ"):
        RunSet(paths)
    forced = analyze_files(paths, jobs=1, force=True)
    assert "ranks-from-different-runs" in _codes(forced)


def test_ranks_started_far_apart_under_one_run_id_are_different_runs():
    from dropspy.analysis.runset import different_runs

    a = {"rank": 0, "world_size": 2, "run_id": "x", "started": "2026-11-29T09:00:00+0000"}
    near = dict(a, rank=1, started="2026-11-29T09:00:40+0000")
    far = dict(a, rank=1, started="2026-11-29T10:00:00+0000")
    assert different_runs([("a", a), ("b", near)]) == []
    assert different_runs([("a", a), ("b", far)]) == ["start times are 60 minutes apart"]
    assert different_runs([("a", a), ("b", dict(near, world_size=4))]) == [
        "world_size differs: 2, 4"]


def test_two_files_of_one_rank_are_different_runs(tmp_path):
    write_run(tmp_path / "a.h5", [(info("drop"), records("drop", (4, 8), (4, 8), 0.3))])
    write_run(tmp_path / "b.h5", [(info("drop"), records("drop", (4, 8), (4, 8), 0.3))])
    with pytest.raises(RunSetError, match="rank 0 appears in 2 files"):
        analyze_files(sorted(tmp_path.glob("*.h5")), jobs=1)


def test_a_corrupt_member_is_named_and_the_others_reported(tmp_path):
    paths = rank_files(tmp_path, [1, 2, 3])
    paths[1].write_bytes(paths[1].read_bytes()[:4096])
    result = analyze_files(paths, jobs=1)
    (f,) = [f for f in result.findings if f.code == "rank-unreadable"]
    assert f.data["path"] == str(paths[1])
    assert [r.rank for r in result["drop"].ranks] == [0, 2]
    assert [m.error is not None for m in result.members] == [False, False, True]
    for p in paths[::2]:
        p.write_bytes(b"not hdf5")
    with pytest.raises(RunSetError, match="no readable run file"):
        analyze_files(paths, jobs=1)


def test_summaries_merged_elsewhere_give_the_same_report_as_one_place(tmp_path):
    paths = rank_files(tmp_path, [5, 5, 6])
    together = analyze_files(paths, jobs=2)
    shipped = [from_dict(json.loads(json.dumps(to_dict(summarize_file(p))))) for p in paths]
    merged = analyze_summaries(shipped, as_set=True)
    assert report_dict(merged) == report_dict(together)
    assert merged == together


def test_a_single_files_summary_gives_its_report(tmp_path):
    (path,) = rank_files(tmp_path, [5])
    direct = analyze_run(dropspy.load(path))
    again = analyze_summaries([from_dict(to_dict(summarize_file(path)))], as_set=False)
    assert again == direct


def test_replicas_in_one_file_are_compared_like_ranks(tmp_path):
    # Two replicas per step (MirroredStrategy): the same noise for both replicas.
    rng = np.random.default_rng(0)
    recs = []
    for step in range(5):
        x = rng.random((8, 16)) >= 0.3
        recs += [Record("drop", step, 0, True, (8, 16), noise=x, replica=r) for r in range(2)]
    path = write_run(tmp_path / "mirrored.h5", [(info("drop", ("batch", "feature")), recs)])
    with dropspy.load(path) as run:
        assert list(run["drop"].replicas) == [0, 1] * 5
        result = analyze_run(run)
    c = result["drop"].across
    assert c.verdict == "identical" and (c.identical, c.pairs) == (5, 5)
    assert result["drop"].replicas == (0, 1)
    # Within a replica the masks are fresh: replicas are not mistaken for repeated steps.
    assert result["drop"].freshness.verdict == "fresh"


def test_resolve_set_forms(tmp_path):
    paths = rank_files(tmp_path, [1, 2])
    assert resolve_set(tmp_path) == paths
    assert resolve_set(tmp_path / "run.h5") == paths
    assert resolve_set(str(tmp_path / "run.rank*.h5")) == paths
    assert resolve_set(paths[0]) is None
    with pytest.raises(RunFileError, match="no file matches"):
        resolve_set(str(tmp_path / "other.rank*.h5"))


# -- command line -----------------------------------------------------------------------


def test_cli_inspect_of_a_set_shows_ranks_and_passes_the_schema(tmp_path):
    import jsonschema

    rank_files(tmp_path, [3, 3])
    result = runner.invoke(app, ["inspect", str(tmp_path / "run.h5"), "--json", "-j", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    jsonschema.validate(data, load_schema("report"))
    assert [m["rank"] for m in data["members"]] == [0, 1]
    assert data["sites"][0]["across"]["verdict"] == "identical"
    text = runner.invoke(app, ["inspect", str(tmp_path), "-j", "1"])
    assert text.exit_code == 0 and "identical-across-ranks" in text.stdout
    assert "records/rank" in text.stdout and "identical (6/6 same)" in text.stdout


def test_cli_narrow_terminal_gets_one_ranks_block_per_site(tmp_path, monkeypatch):
    rank_files(tmp_path, [3, 4])
    monkeypatch.setenv("COLUMNS", "50")
    out = runner.invoke(app, ["inspect", str(tmp_path), "-j", "1"])
    assert out.exit_code == 0, out.output
    assert "same masks independent (0/6 same)" in out.stdout
    assert max(len(line.rstrip()) for line in out.stdout.splitlines()) <= 50


def test_cli_summary_files_combine_to_the_same_json_report(tmp_path):
    paths = rank_files(tmp_path, [3, 4])
    jsons = []
    for p in paths:
        out = runner.invoke(app, ["inspect", "--summary", str(p)])
        assert out.exit_code == 0, out.output
        j = tmp_path / (p.stem + ".json")
        j.write_text(out.stdout)
        jsons.append(str(j))
    import jsonschema

    for j in jsons:
        jsonschema.validate(json.loads(open(j).read()), load_schema("summary"))
    combined = runner.invoke(app, ["inspect", *jsons, "--json"])
    direct = runner.invoke(app, ["inspect", *map(str, paths), "--json", "-j", "2"])
    assert combined.exit_code == direct.exit_code == 0
    assert json.loads(combined.stdout) == json.loads(direct.stdout)


def test_cli_corrupt_member_exit_1_with_report_and_2_when_nothing_readable(tmp_path):
    paths = rank_files(tmp_path, [1, 2])
    paths[1].write_bytes(paths[1].read_bytes()[:2000])
    result = runner.invoke(app, ["inspect", str(tmp_path / "run.h5"), "-j", "1"])
    assert result.exit_code == 1
    assert "rank-unreadable" in result.stdout and paths[1].name in result.stdout
    paths[0].write_bytes(b"")
    result = runner.invoke(app, ["inspect", str(tmp_path / "run.h5"), "-j", "1"])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_glob_matching_nothing_is_one_line_exit_2(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "nothing.rank*.h5")])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("dropspy: error: ") and "no file matches" in line


def test_cli_different_runs_refused_then_forced(tmp_path):
    rank_files(tmp_path, [1], run_id="a", stem="x")
    rank_files(tmp_path, [2], run_id="b", stem="y", ranks=[1])
    refused = runner.invoke(app, ["inspect", str(tmp_path), "-j", "1"])
    assert refused.exit_code == 2 and "--force" in refused.stderr
    forced = runner.invoke(app, ["inspect", str(tmp_path), "-j", "1", "--force"])
    assert forced.exit_code == 0 and "ranks-from-different-runs" in forced.stdout


@pytest.mark.parametrize(("seeds", "want", "code"), [
    ([1, 2], "independent", 0), ([1, 1], "independent", 1),
    ([1, 1], "identical", 0), ([1, 2], "identical", 1)])
def test_cli_check_expects_ranks_either_way(tmp_path, seeds, want, code):
    rank_files(tmp_path, seeds)
    result = runner.invoke(app, ["check", str(tmp_path / "run.h5"), "-j", "1",
                                 "--expect", f"drop: ranks={want}"])
    assert result.exit_code == code, result.output


def test_cli_diff_set_against_set_and_against_a_file(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    rank_files(a, [1, 1])
    rank_files(b, [1, 2])
    result = runner.invoke(app, ["diff", str(a), str(b), "--json", "-j", "1"])
    assert result.exit_code == 1
    assert {"site": "drop", "aspect": "across", "a": "identical", "b": "independent"} in \
        json.loads(result.stdout)
    same = runner.invoke(app, ["diff", str(b), str(b / "run.rank0.h5"), "--json"])
    assert {d["aspect"] for d in json.loads(same.stdout)} == {"across"}


def test_cli_plot_shows_the_asked_rank(tmp_path):
    pytest.importorskip("matplotlib")
    rank_files(tmp_path, [1, 2])
    out = tmp_path / "m.png"
    result = runner.invoke(app, ["plot", str(tmp_path / "run.h5"), "--site", "drop",
                                 "--rank", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists() and out.stat().st_size > 0
    bad = runner.invoke(app, ["plot", str(tmp_path / "run.h5"), "--site", "drop",
                              "--rank", "5", "-o", str(out)])
    assert bad.exit_code == 2 and "no file of rank 5" in bad.stderr


# -- a real 2-rank DDP run ---------------------------------------------------------------


@pytest.mark.slow
def test_real_ddp_ranks_seeded_alike_are_found_and_seeded_apart_are_not(tmp_path):
    """Two processes, torch DDP on gloo: the files the DDP recorder writes, as a set."""
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available():
        pytest.skip("torch built without distributed")
    import multiprocessing
    import socket

    import _ranks_worker

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_ranks_worker.main, args=(r, 2, port, str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0]
    same = runner.invoke(app, ["inspect", str(tmp_path / "same" / "run.h5"), "--json", "-j", "1"])
    assert same.exit_code == 0, same.output
    data = json.loads(same.stdout)
    assert [m["rank"] for m in data["members"]] == [0, 1]
    assert [m["world_size"] for m in data["members"]] == [2, 2]
    (site,) = data["sites"]
    assert site["across"]["verdict"] == "identical"
    assert site["across"]["identical"] == site["across"]["pairs"] == 5
    assert "identical-across-ranks" in {f["code"] for f in site["findings"]}
    with dropspy.load(tmp_path / "seeded" / "run.h5") as s:
        result = s.report()
    c = result.sites[0].across
    assert c.verdict == "independent" and c.pairs == 5 and c.identical == 0
    check = runner.invoke(app, ["check", str(tmp_path / "seeded"), "-j", "1",
                                "--expect", "*: ranks=independent"])
    assert check.exit_code == 0, check.output


# -- bounded by bytes ----------------------------------------------------------------------


def test_opening_and_analysing_a_run_build_no_per_record_index(tmp_path):
    (path,) = rank_files(tmp_path, [1])
    with dropspy.load(path) as run:
        sites = [run[n] for n in run.sites]
        assert all(s._ix is None and s._n is None for s in sites)  # attributes only
        analyze_run(run)
        assert all(s._ix is None for s in sites)  # the analysis streams the index
        assert len(sites[0].steps) == 6  # random access builds it on demand


def test_summaries_keep_the_same_bounded_sample_of_keys_in_every_rank(tmp_path):
    from dropspy.analysis._scan import scan_site
    from dropspy.analysis.copies import compare_copies

    paths = rank_files(tmp_path, [3, 3, 8], steps=40)
    samples = []
    for p in paths:
        with dropspy.load(p) as run:
            samples.append(scan_site(run["drop"], sample_keys=16).sample)
    assert [len(s) for s in samples] == [16, 16, 16]
    assert all(np.array_equal(samples[0].steps, s.steps) for s in samples)
    c = compare_copies(list(enumerate(samples)))
    assert c.sampled and c.keys == 16 and c.by_copy == {"rank 1": (16, 16), "rank 2": (0, 16)}


def test_every_finding_has_a_row_in_the_docs():
    from pathlib import Path

    from dropspy.analysis import FINDINGS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "analysis.md").read_text()
    for row in FINDINGS:
        assert f"`{row.code}`" in doc, row.code
