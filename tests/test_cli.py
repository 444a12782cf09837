"""The ``nsa-flex`` command line: safe expression parsing, exit codes, show/check/demo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsa_flex import masks
from nsa_flex.cli import CLIError, ExpressionError, main, mask_generators, parse_mask, require_device

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the whitelist ----------------------------------------------------------------------------------------
def test_whitelist_is_the_generators_that_take_plain_values():
    names = mask_generators()
    for expected in ("causal", "full", "sliding_window", "chunked", "dilated", "global_tokens", "prefix_lm",
                     "compressed_causal", "neighborhood"):
        assert expected in names
    for excluded in ("Mask", "Extent", "as_mask", "block_mask_from_indices", "num_compressed_blocks",
                     "fine_selection", "document", "block_layout"):
        assert excluded not in names
    # Every whitelisted name is a public generator of nsa_flex.masks.
    assert all(getattr(masks, name) is fn for name, fn in names.items())


def test_parse_builds_the_same_mask_as_python():
    m = parse_mask("causal() & sliding_window(window_size=64) | global_tokens(4)")
    expected = masks.causal() & masks.sliding_window(64) | masks.global_tokens(4)
    assert repr(m) == repr(expected)
    assert torch.equal(m.to_dense(100, 100), expected.to_dense(100, 100))
    inverted = parse_mask("~(causal() | full())")
    assert repr(inverted) == "~(causal() | full())"
    assert not inverted.to_dense(8, 8).any()


def test_parse_accepts_negative_numbers_and_lists_but_the_generator_decides():
    with pytest.raises(ExpressionError, match=r"sliding_window\(-3\): window_size"):
        parse_mask("sliding_window(-3)")
    # A list of ints reaches the generator (here a type error from it, still one line).
    with pytest.raises(ExpressionError, match=r"dilated\(\[1, 2\], 3\)"):
        parse_mask("dilated([1, 2], 3)")


def test_expression_is_never_evaluated(tmp_path):
    target = tmp_path / "pwned"
    for expr in (
        f"__import__('pathlib').Path({str(target)!r}).touch()",
        f"causal() | open({str(target)!r}, 'w')",
        f"[open({str(target)!r}, 'w') for _ in (1,)]",
        f"causal(open({str(target)!r}, 'w'))",
    ):
        with pytest.raises(ExpressionError):
            parse_mask(expr)
    assert not target.exists()


# --- exit status 2 with a one-line message -----------------------------------------------------------------
@pytest.mark.parametrize(
    "expr, fragment",
    [
        ("foo()", "unknown mask 'foo' (known: "),
        ("__import__('os')", "unknown mask '__import__'"),
        ("__import__('os').system('true')", "attribute access is not allowed"),
        ("masks.causal()", "attribute access is not allowed"),
        ("lambda b, h, q, k: q >= k", "lambda is not allowed"),
        ("sliding_window(-3)", "window_size must be an int >= 1, got -3"),
        ("causal(", "invalid mask expression"),
        ("causal() &", "invalid mask expression"),
        ("causal", "'causal' is a mask generator: call it"),
        ("causal() + full()", "unsupported operator '+'"),
        ("causal() and full()", "'and'/'or' is not allowed"),
        ("sliding_window(x)", "argument 1 of sliding_window() must be"),
        ("sliding_window(*[3])", "argument 1 of sliding_window() must be"),
        ("sliding_window(**{'window_size': 3})", "**unpacking is not allowed"),
        ("sliding_window(2 ** 10)", "argument 1 of sliding_window() must be"),
        ("sliding_window(window_size=8, foo=1)", "unexpected keyword argument 'foo'"),
        ("3", "expected a mask"),
        ("", "empty mask expression"),
        ("sliding_window(100000000000000000000000)", "window_size must be an int <= 2**63 - 1"),
        ("~" * 400 + "causal()", "nested too deeply (404 levels, limit 100)"),
        (" | ".join(["causal()"] * 900), "nested too deeply"),
        ("bigbird(200000)", "seq_len=200000 is too long to draw or check"),  # before its layout is built
        ("fixed(64, device='meta')", "holds its tensors on meta"),
    ],
)
def test_bad_expressions_exit_2_with_one_line(capsys, expr, fragment):
    code, out, err = run_cli(capsys, "show", expr, "--q-len", "16")
    assert code == 2
    assert out == ""
    assert err.startswith("nsa-flex: error: ")
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert fragment in err


def test_mask_not_defined_for_lengths_exits_2(capsys):
    code, _, err = run_cli(capsys, "show", "fixed(64)", "--q-len", "128")
    assert code == 2 and err.count("\n") == 1 and "covers q_len <= 64" in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["show", "causal()", "--q-len", "100000"], "too many to draw"),
        (["show", "causal()", "--q-len", "64", "--block-size", "100000"], "in whole blocks 100000 x 100000"),
        (["check", "causal()", "--q-len", "100000", "--examples", "1"], "too many to check"),
        # check's inputs have batch 2 and 2 heads: four times the entries of the drawing
        (["check", "causal()", "--q-len", "8192", "--examples", "1"], "(B=2, H=2, q_len=8192"),
    ],
)
def test_too_large_to_materialize_exits_2_before_any_work(capsys, argv, fragment):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["show"], "the following arguments are required: EXPR"),
        (["show", "causal()", "--q-len", "-5"], "argument --q-len: expected a positive integer, got -5"),
        (["show", "causal()", "--q-len", "0"], "argument --q-len: expected a positive integer, got 0"),
        (["show", "causal()", "--q-len", "ten"], "argument --q-len: expected a positive integer, got 'ten'"),
        (["show", "causal()", "--kv-len", "0"], "argument --kv-len: expected a positive integer, got 0"),
        (["show", "causal()", "--block-size", "16,0"], "argument --block-size: expected B or Q_BLOCK,KV_BLOCK"),
        (["show", "causal()", "--block-size", "1,2,3"], "got '1,2,3'"),
        (["show", "causal()", "--block-size", "-16"], "got '-16'"),
        (["show", "causal()", "--out", "mask.txt"], "argument --out: expected a file name ending in .png"),
        (["check", "causal()", "--examples", "-1"], "argument --examples: expected a positive integer, got -1"),
        (["check", "causal()", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
        (["check", "causal()", "--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
        (["check", "causal()", "--seed", "-3"], "argument --seed: must be an int >= 0, got -3"),
        (["check", "causal()", "--seed", str(2**70)], "argument --seed: must be an int <= 2**63 - 1"),
        (["demo", "extra"], "unrecognized arguments: extra"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, argv, fragment):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and re.match(r"nsa-flex( \w+)?: error: ", err), err  # no usage block
    assert fragment in err, err


@pytest.mark.parametrize("argv", [["--help"], ["show", "--help"], ["check", "-h"], ["bench", "--help"]])
def test_help_prints_the_full_help_and_exits_0(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and err == "" and out.startswith("usage: ")
    if argv == ["--help"]:
        words = " ".join(out.split())  # argparse wraps the help to the terminal's width
        assert "show" in words and "causal" in words and "--smoke is a quick CPU check" in words
    if argv[0] == "show":
        assert "--block-size" in out and "FILE.png" in out


@pytest.mark.parametrize(
    "argv",
    [["bench"], ["bench", "nonesuch"], ["bench", "train_toy", "--seq-len", "x"], ["bench", "train_toy", "--bogus"],
     ["bench", "train_toy", "--smoke", "--compile"], ["bench", "nsa", "--bogus"], ["bench", "block_topk", "--bogus"],
     ["bench", "decode_sweep", "--bogus"]],
)
def test_bench_usage_errors_exit_2_with_one_line(capsys, argv):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and re.match(r"nsa-flex( bench( \w+)?)?: error: ", err), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_bench_without_cuda_says_so_in_one_line(capsys):
    code, _, err = run_cli(capsys, "bench", "nsa")
    assert code == 2 and err.strip() == "nsa-flex bench nsa: error: bench.nsa needs CUDA (use --smoke for the CPU check)"


def test_bench_runs_the_checkout_benchmark(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "bench", "train_lm", "--smoke", "--out", str(tmp_path))
    assert code == 0 and "tokens/s" in out and (tmp_path / "train_lm_smoke.json").is_file()


# --- show -----------------------------------------------------------------------------------------------
def test_show_text(capsys):
    code, out, err = run_cli(
        capsys, "show", "causal() & sliding_window(64) | global_tokens(4)", "--q-len", "256", "--block-size", "32"
    )
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "causal() & sliding_window(64) | global_tokens(4)"
    m = masks.causal() & masks.sliding_window(64) | masks.global_tokens(4)
    allowed = int(m.to_dense(256, 256).sum())
    assert f"{allowed:,} of 65,536 query-key pairs allowed" in out
    assert f"density {allowed / 65536:.2%}" in out and f"sparsity {1 - allowed / 65536:.2%}" in out
    assert "block_size=32x32:" in out and "of 64 blocks computed" in out
    assert max(len(line) for line in lines) <= 100, "text output should fit a terminal"
    assert "█" in out and "·" in out


def test_show_counts_blocks_like_torch(capsys):
    code, out, _ = run_cli(capsys, "show", "causal()", "--q-len", "256", "--block-size", "64", "--text")
    assert code == 0
    # 4 x 4 blocks: 6 full below the diagonal, 4 partial on it, 6 skipped above.
    assert "10 of 16 blocks computed (62.50%: 6 full, 4 partial), block sparsity 37.50%" in out
    bm = masks.causal().to_block_mask(256, 256, block_size=64)
    assert bm.sparsity() == pytest.approx(37.5)


def test_show_rectangular_and_non_square_blocks(capsys):
    code, out, _ = run_cli(
        capsys, "show", "compressed_causal(block_size=32, stride=16)", "--q-len", "256", "--kv-len", "15",
        "--block-size", "16,8",
    )
    assert code == 0 and "kv_len=15" in out and "block_size=16x8" in out


def test_show_out_writes_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "mask.png"
    code, out, _ = run_cli(capsys, "show", "causal() & sliding_window(16)", "--q-len", "64", "--block-size", "16",
                           "--out", str(path))
    assert code == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {path}" in out and "density" in out
    assert "┌" not in out  # --out alone prints the numbers, not the drawing


def test_show_out_unwritable_exits_2(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    code, _, err = run_cli(capsys, "show", "causal()", "--q-len", "16", "--out", str(tmp_path / "no" / "x.png"))
    assert code == 2 and err.startswith("nsa-flex: error: cannot write")


# --- check ----------------------------------------------------------------------------------------------
def test_check_passes_on_a_good_expression(capsys):
    code, out, _ = run_cli(
        capsys, "check", "causal() & (sliding_window(24) | global_tokens(2))", "--q-len", "96", "--examples", "4"
    )
    assert code == 0
    lines = out.splitlines()
    assert sum(line.startswith("  ok ") for line in lines) == 4
    assert lines[-1].startswith("4 cases: 4 passed, 0 failed, 0 skipped")


def test_check_rectangular_lengths(capsys):
    code, out, _ = run_cli(capsys, "check", "compressed_causal(block_size=8, stride=4)", "--q-len", "64",
                           "--kv-len", "15", "--examples", "3", "--block-size", "16")
    assert code == 0 and "3 passed" in out


def test_check_reports_a_mismatch_with_exit_1(capsys, monkeypatch):
    import nsa_flex.testing as testing

    def broken(*args, **kwargs):
        raise AssertionError("flex_attention with X differs from dense attention: max |error| 1 > atol 1e-05")

    monkeypatch.setattr(testing, "assert_matches_dense", broken)
    code, out, _ = run_cli(capsys, "check", "causal()", "--q-len", "32", "--examples", "2")
    assert code == 1
    assert out.count("  FAIL ") == 2 and "2 failed" in out


def test_check_mask_not_defined_exits_2(capsys):
    code, _, err = run_cli(capsys, "check", "fixed(32)", "--q-len", "64")
    assert code == 2 and err.count("\n") == 1


# --- demo, as a real process ----------------------------------------------------------------------------
def test_python_m_nsa_flex_demo_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "nsa_flex", "demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo passed" in proc.stdout
    assert "passed, 0 failed" in proc.stdout


def test_require_device_takes_cpu_and_cuda_forms_the_examples_share():
    require_device(None)  # the script picks
    require_device("cpu")
    for bad in ("gpu", "cudax", ""):
        with pytest.raises(CLIError, match=rf"^--device must be cpu or cuda, got {bad!r}$"):
            require_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(CLIError, match=r"^--device cuda:1: CUDA is not available$"):
            require_device("cuda:1")
