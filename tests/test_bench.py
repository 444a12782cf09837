"""The benchmark scripts must not rot: their CPU smoke modes run the same code paths on tiny inputs."""

import json

import pytest
import torch

from bench import nsa


@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_nsa_benchmark_smoke(tmp_path, layout):
    payload = nsa.main(["--smoke", "--layout", layout, "--out", str(tmp_path)])
    rows = payload["rows"]
    assert {r["layout"] for r in rows} == {layout}
    assert json.loads((tmp_path / "nsa_smoke.json").read_text())["rows"] == rows
    ours = [r for r in rows if r["method"] == "nsa_flex"]
    assert ours and all("error" not in r and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in ours)
    assert set(ours[0]["stages_ms"]) == {"compress", "compressed_attn", "scoring_topk", "mask_build",
                                         "selected_attn", "window_attn", "gating"}
    assert all("error" not in r for r in rows if r["method"] == "sdpa_causal")


def test_train_lm_benchmark_smoke(tmp_path):
    from bench import train_lm

    payload = train_lm.main(["--smoke", "--out", str(tmp_path)])
    rows = payload["rows"]
    assert json.loads((tmp_path / "train_lm_smoke.json").read_text())["rows"] == rows
    assert {r["attn"] for r in rows} == {"nsa", "dense", "window"}
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows)


def test_block_topk_benchmark_smoke(tmp_path):
    from bench import block_topk

    rows = block_topk.main(["--smoke", "--out", str(tmp_path)])["rows"]
    assert json.loads((tmp_path / "block_topk_smoke.json").read_text())["rows"] == rows
    assert {r["inputs"] for r in rows} == {"random", "structured"} and all(r["ms"] > 0 for r in rows)


def test_block_mask_benchmark_smoke(tmp_path):
    from bench import block_mask

    rows = block_mask.main(["--smoke", "--out", str(tmp_path)])["rows"]
    assert json.loads((tmp_path / "block_mask_smoke.json").read_text())["rows"] == rows
    assert [r["q_blocks"] for r in rows] == [False, True] and all(r["ms"] > 0 for r in rows)
    assert rows[0]["group"] == 16 and rows[0]["q_block_size"] == 16  # the selection branch's folded tiles


def test_profile_reports_where_the_time_goes(tmp_path):
    from bench import decode

    rows = decode.main(["--smoke", "--profile", "--methods", "nsa_decode", "--out", str(tmp_path)])["rows"]
    assert rows and all(r["ops_per_step"] > 0 and r["profile_top"][0]["self_us_per_step"] > 0 for r in rows)
    ours = [r for r in nsa.main(["--smoke", "--profile", "--out", str(tmp_path)])["rows"] if r["method"] == "nsa_flex"]
    assert ours and all(r["ops_per_step"] > 0 and r["profile_top"] for r in ours)
    from bench import train_lm

    rows = train_lm.main(["--smoke", "--profile", "--attn", "nsa", "--out", str(tmp_path)])["rows"]
    assert rows and all(r["ops_per_step"] > 0 and r["profile_top"][0]["self_us_per_step"] > 0 for r in rows)


def test_decode_sweep_grid_names_fused_decode_settings():
    from bench import decode_sweep

    assert decode_sweep.parse_grid(["_TARGET_PROGRAMS=256,512", "_SPARSE_STAGES=2"]) == {
        "_TARGET_PROGRAMS": [256, 512], "_SPARSE_STAGES": [2]}
    for bad in ("_TARGET_PROGRAMS", "_TARGET_PROGRAMS=", "MAX_BLOCK=1", "merge=1", "_TARGET_PROGRAMS=a"):
        with pytest.raises(ValueError, match="--grid"):
            decode_sweep.parse_grid([bad])


@pytest.mark.parametrize("name, argv, fragment", [
    ("block_mask", ["--smoke", "--group", "0"], "argument --group: expected a positive integer"),  # ZeroDivisionError
    ("block_mask", ["--smoke", "--q-block-size", "7", "--group", "2"], "--q-block-size 7 must be a multiple"),
    ("decode_sweep", ["--grid", "_TARGET_PROGRAMS=a"], "--grid: _TARGET_PROGRAMS's values must be integers"),
    ("train_lm", ["--smoke", "--contexts", "0"], "argument --contexts: expected a positive integer"),
    ("nsa", ["--smoke", "--repeats", "0"], "argument --repeats: expected a positive integer"),  # had timed nothing
    ("nsa", ["--smoke", "--methods", "foo"], "argument --methods: invalid choice: 'foo'"),  # had run no method
    ("decode", ["--smoke", "--methods", "nsa"], "argument --methods: invalid choice: 'nsa'"),
    ("peak_memory", ["--smoke", "--methods", "fla"], "argument --methods: invalid choice: 'fla'"),
])
def test_bad_arguments_are_one_line_usage_errors(capsys, name, argv, fragment):
    """Every bench command line fails as the package's do: one line, prog: error:, exit 2 (these had been
    tracebacks, or runs that measured nothing and exited 0)."""
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"bench.{name}").main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("name", ["nsa", "decode", "train_lm", "block_mask", "block_topk", "peak_memory"])
def test_without_cuda_only_the_smoke_mode_runs(capsys, name):
    """train_lm had timed the CPU (the defaults would take hours) and written its GPU result's file name."""
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"bench.{name}").main([])
    assert exit_.value.code == 2 and "needs CUDA (use --smoke" in capsys.readouterr().err


def test_peak_memory_replay_finds_what_is_alive_at_the_peak(tmp_path):
    """The replay on a trace where a freed block is larger than either of a later pair: the pair is the peak,
    named by this project's innermost frame where it has one; the steps themselves run on CPU."""
    from bench import peak_memory

    peak, blocks = peak_memory.live_at_peak(peak_memory.SMOKE_TRACE)
    assert peak == 130 and [b["bytes"] for b in blocks] == [70, 60]
    assert blocks[0]["where"] == "x.py:9 g"
    assert peak_memory.where([{"filename": "torch/y.py", "line": 1, "name": "h"},
                              {"filename": "/r/nsa_flex/functional/a.py", "line": 5, "name": "f"}]) == "a.py:5 f"
    assert peak_memory.live_at_peak(peak_memory.SMOKE_TRACE, min_bytes=65)[1] == [blocks[0]]
    rows = peak_memory.main(["--smoke", "--out", str(tmp_path)])["rows"]
    assert [r["method"] for r in rows] == ["sdpa_causal", "nsa_flex"]


def test_train_toy_benchmark_smoke(tmp_path):
    from bench import train_toy

    payload = train_toy.main(["--smoke", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "train_toy_smoke.json").read_text())["losses"] == payload["losses"]
    assert len(payload["losses"]) == payload["args"]["steps"] and all(loss > 0 for loss in payload["losses"])


def test_results_default_to_bench_results_under_the_working_directory(tmp_path, monkeypatch):
    from bench import common

    monkeypatch.chdir(tmp_path)
    assert common.save("x_smoke", {"a": 1}) == common.RESULTS / "x_smoke.json"
    assert json.loads((tmp_path / "bench" / "results" / "x_smoke.json").read_text()) == {"a": 1}


@pytest.mark.parametrize("filename, ours", [
    ("/w/main/nsa_flex/functional/nsa.py", True), ("/w/main/bench/nsa.py", True),
    ("/venv/lib/python3.12/site-packages/nsa_flex/functional/nsa.py", True),  # installed, still ours
    ("/home/u/nsa_flex/.venv/lib/python3.12/site-packages/torch/nn/functional.py", False),  # had counted
    ("/opt/torch/utils/benchmark/utils/timer.py", False),
])
def test_peak_memory_names_frames_of_this_project_only(filename, ours):
    from bench import peak_memory

    assert peak_memory._is_ours(filename) is ours
