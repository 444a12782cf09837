"""examples/train_lm.py: resume reproduces the uninterrupted run, checkpoints are written atomically, bad
arguments give a one-line error with exit status 2, and the outputs (log, plot, checkpoint) are usable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsa_flex.modules import TransformerLM

from helpers import REPO, load_example


train_lm = load_example("train_lm")


def tiny(corpus: Path, out: Path, *extra: str, attn: str = "dense") -> list[str]:
    return ["--attn", attn, "--corpus", str(corpus), "--val-percent", "30", "--out", str(out), "--context", "32",
            "--batch", "4", "--dim", "16", "--depth", "1", "--heads", "2", "--window", "8", "--compress-block", "8",
            "--compress-stride", "4", "--selection-block", "8", "--num-selected", "2", "--steps", "6",
            "--warmup", "2", "--eval-every", "2", "--eval-batches", "1", "--ckpt-every", "3", "--no-progress",
            "--no-plot", *extra]


def run(argv: list[str]) -> dict:
    return train_lm.train(train_lm.parse_args(argv))


def curve(log: dict) -> tuple[list[float], list[float]]:
    h = log["history"]
    return [r["loss"] for r in h["train"]], [r["loss"] for r in h["val"]]


def load(path: Path) -> dict:
    """A checkpoint as anyone can read it, without the script: plain tensors and containers."""
    return torch.load(path, map_location="cpu", weights_only=True)


def exit_status(main, argv: list[str]) -> int:
    """``main(argv)``'s status, also when argparse's own one-line errors exit (SystemExit(2))."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def params(out: Path) -> dict[str, torch.Tensor]:
    return load(out / "checkpoint.pt")["model"]


@pytest.mark.parametrize("attn", ["dense", "nsa"])
def test_resume_reproduces_the_uninterrupted_loss_curve(corpus, tmp_path, attn):
    full = run(tiny(corpus, tmp_path / "full", attn=attn))
    first = run(tiny(corpus, tmp_path / "split", "--stop-after", "4", attn=attn))  # "interrupted" after step 4
    assert first["summary"]["step"] == 4 and not first["summary"]["finished"]
    resumed = run(tiny(corpus, tmp_path / "split", "--resume", attn=attn))
    assert resumed["summary"]["step"] == 6 and resumed["summary"]["finished"]
    assert resumed["summary"]["steps_this_run"] == 2
    train_full, val_full = curve(full)
    train_res, val_res = curve(resumed)
    assert len(train_full) == 6 and len(val_full) == 3
    assert train_res == train_full  # exact on CPU: same batches, same state
    assert val_res == val_full
    assert [r["lr"] for r in resumed["history"]["train"]] == [r["lr"] for r in full["history"]["train"]]
    pa, pb = params(tmp_path / "full"), params(tmp_path / "split")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert train_full[-1] < train_full[0]  # it learns something


def test_gradient_accumulation_follows_the_same_curve(corpus, tmp_path):
    whole = run(tiny(corpus, tmp_path / "whole", "--steps", "3"))
    micro = run(tiny(corpus, tmp_path / "micro", "--steps", "3", "--grad-accum", "4"))
    for a, b in zip(curve(whole), curve(micro)):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
    pa, pb = params(tmp_path / "whole"), params(tmp_path / "micro")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6)


def test_time_limit_and_auto_resume_reach_the_same_end(corpus, tmp_path):
    full = run(tiny(corpus, tmp_path / "full", "--steps", "4"))
    argv = tiny(corpus, tmp_path / "slots", "--steps", "4", "--auto-resume", "--time-limit", "1e-9")
    logs = [run(argv) for _ in range(4)]  # a time limit this small stops after every step, with a checkpoint
    assert [log["summary"]["step"] for log in logs] == [1, 2, 3, 4] and logs[-1]["summary"]["finished"]
    assert curve(logs[-1]) == curve(full)
    again = run(argv)  # finished: nothing left to do, nothing changes
    assert again["summary"]["steps_this_run"] == 0 and curve(again) == curve(full)


def test_failed_checkpoint_write_leaves_the_last_good_one(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = tiny(corpus, out, "--ckpt-every", "2", "--steps", "4")
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 4): write half of it, then "crash"
            real_save(obj, f, *args, **kwargs)
            f.truncate(f.tell() // 2)
            raise KeyboardInterrupt("simulated kill during the checkpoint write")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(train_lm.torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        run(argv)
    monkeypatch.setattr(train_lm.torch, "save", real_save)
    ckpt = load(out / "checkpoint.pt")  # still loadable: the step-2 one
    assert ckpt["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "log.json"]  # no temporary left behind
    model = TransformerLM(**ckpt["config"])
    model.load_state_dict(ckpt["model"])  # a plain state dict, usable without the script
    resumed = run(argv + ["--resume"])
    uninterrupted = run(tiny(corpus, tmp_path / "clean", "--ckpt-every", "2", "--steps", "4"))
    assert curve(resumed) == curve(uninterrupted)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    train_lm.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def broken(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        train_lm.atomic_write(path, broken)
    assert load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_outputs_log_plot_and_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    argv = [a for a in tiny(corpus, out, "--steps", "3", "--eval-every", "0") if a != "--no-plot"]
    assert train_lm.main(argv) == 0
    log = json.loads((out / "log.json").read_text())
    assert log["summary"]["finished"] and log["summary"]["step"] == 3
    assert [r["step"] for r in log["history"]["train"]] == [1, 2, 3]
    assert [r["step"] for r in log["history"]["val"]] == [3]  # eval-every 0: only at the end
    assert log["model_config"]["attn"] == "dense" and log["num_parameters"] > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load(out / "checkpoint.pt")["step"] == 3


def test_compare_tabulates_and_plots_runs(corpus, tmp_path, capsys):
    for attn in ("dense", "window"):
        run(tiny(corpus, tmp_path / attn, "--steps", "2", attn=attn))
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert train_lm.main(["--compare", str(tmp_path / "dense"), str(tmp_path / "window"), "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and "dense" in table[1] and "window" in table[2]
    rows = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["attn"] for r in rows] == ["dense", "window"] and all(r["steps"] == 2 for r in rows)
    assert (out / "compare.png").exists()
    assert train_lm.main(["--compare", str(tmp_path / "missing")]) == 2
    assert "--compare: no log.json in" in capsys.readouterr().err


def test_lr_schedule_warms_up_then_decays():
    args = train_lm.parse_args(["--steps", "100", "--warmup", "10", "--lr", "1e-3", "--attn", "dense"])
    lrs = [train_lm.lr_at(s, args) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] >= 1e-4 - 1e-12


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--attn", "linear"], "unknown attention type 'linear'"),
        (["--attn", "nsa", "--context", "32", "--compress-block", "32"], "must be > --compress-block 32"),
        (["--context", "2048", "--max-seq-len", "1024"], "beyond the model's max_seq_len 1024"),
        (["--corpus", "/nonexistent/corpus"], "corpus path '/nonexistent/corpus' does not exist"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--context", "abc"], "invalid int value: 'abc'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--dist", "ddp", "--smoke"], "needs torchrun"),
        (["--dist", "mpi"], "--dist must be none, ddp or fsdp"),
        (["--batch", "6", "--grad-accum", "4"], "--batch 6 must be divisible by --grad-accum 4"),
        (["--smoke", "--attn", "nsa", "--selection-block", "6"], "model configuration: selection_block_size"),
        (["--smoke", "--device", "cpu", "--attn", "window", "--compile"], "--compile with --attn window needs CUDA"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(capsys, argv, fragment, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    code = exit_status(train_lm.main, argv)
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("train_lm.py: error: ") and fragment in lines[0], lines[0]


def test_resume_errors_are_one_line(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_lm.main(tiny(corpus, out, "--resume")) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert train_lm.main(tiny(corpus, out, "--steps", "1")) == 0
    capsys.readouterr()
    assert train_lm.main(tiny(corpus, out, "--resume", "--dim", "32")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dim 16 -> 32" in err
    # the schedule too: a new --lr or --steps had been taken silently, a jump in the learning rate
    assert train_lm.main(tiny(corpus, out, "--resume", "--steps", "3", "--lr", "0.05")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--steps 1 -> 3" in err and "-> 0.05" in err


def test_unreadable_checkpoint_is_a_one_line_error(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert train_lm.main(tiny(corpus, out, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"train_lm.py: error: --resume: {str(out / 'checkpoint.pt')!r} is not a checkpoint "
                   "torch.load(weights_only=True) can read (UnpicklingError)")


@pytest.mark.parametrize("where, fragment", [("file", "exists and is not a directory"),
                                             ("file/sub", "cannot create the directory")])
def test_out_that_cannot_be_a_directory_is_a_one_line_error(corpus, tmp_path, capsys, where, fragment):
    (tmp_path / "file").write_text("in the way")
    assert train_lm.main(tiny(corpus, tmp_path / where)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_lm.py: error: --out: ") and fragment in lines[0], lines


def test_empty_corpus_directory_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train_lm.main(["--corpus", str(tmp_path / "empty"), "--smoke", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "contains no *.py files" in err


def test_cli_train_forwards_and_keeps_the_exit_status(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "nsa_flex", "train", "--attn", "sparse"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "nsa-flex train: error: unknown attention type 'sparse' (choose nsa, dense or window)"


def test_cli_train_runs_the_script(tmp_path, corpus, capsys):
    from nsa_flex.cli import main

    out = tmp_path / "cli"
    assert main(["train", *tiny(corpus, out, "--steps", "2")]) == 0
    assert "finished at step 2/2" in capsys.readouterr().out
    assert (out / "checkpoint.pt").exists()


# --- examples/needle.py ------------------------------------------------------------------------------------
needle = load_example("needle")


def test_needle_sequences_hold_the_pair_at_the_depth_and_the_question_at_the_end():
    args = needle.parse_args(["--smoke", "--context", "40", "--key-len", "3", "--value-len", "4"])
    gen = torch.Generator().manual_seed(0)
    depths = torch.tensor([0.0, 0.5, 1.0])
    tokens, answer = needle.make_batch(depths, args, gen)
    assert tokens.shape == (3, 41) and answer.shape == (3, 40) and int(answer.sum()) == 3 * 4
    needle_len, tail_len = needle.needle_len(args), needle.tail_len(args)
    last_start = 41 - tail_len - needle_len
    for row, start in zip(tokens.tolist(), (0, round(0.5 * last_start), last_start)):
        text = bytes(row).decode()
        pair = text[start:start + needle_len]
        assert pair[0] == "#" and pair[4] == "=" and pair[-1] == ";", text
        key, value = pair[1:4], pair[5:9]
        assert key.isdigit() and value.isdigit()
        assert text.endswith(f"?{key}>{value}"), text
        filler = text[:start] + text[start + needle_len:len(text) - tail_len]
        assert set(filler) <= set("abcdefghijklmnopqrstuvwxyz "), filler
    # The masked targets are exactly the value digits after the question.
    assert bytes(tokens[:, 1:][answer].tolist()).decode() == "".join(bytes(r).decode()[-4:] for r in tokens.tolist())


def test_needle_smoke_trains_and_reports_every_attention_type(tmp_path):
    args = needle.parse_args(["--smoke", "--steps", "2", "--depths", "2", "--eval-samples", "2", "--depth", "1",
                              "--no-progress", "--out", str(tmp_path)])
    report = needle.run(args)
    assert set(report["results"]) == {"nsa", "dense", "window"}
    for r in report["results"].values():
        assert r["eval"]["depths"] == [0.0, 1.0] and len(r["train_loss"]) == 2
        assert all(0 <= a <= 1 for a in r["eval"]["accuracy"] + r["eval"]["digit_accuracy"])
    assert json.loads((tmp_path / "needle.json").read_text())["results"].keys() == report["results"].keys()
    assert (tmp_path / "needle.png").exists()


def test_needle_fine_tunes_a_train_lm_checkpoint(corpus, tmp_path):
    run(tiny(corpus, tmp_path / "lm", "--steps", "1", "--context", "48"))
    args = needle.parse_args(["--init", str(tmp_path / "lm" / "checkpoint.pt"), "--context", "48", "--steps", "1",
                              "--depths", "1", "--eval-samples", "1", "--batch", "1", "--no-progress", "--no-plot",
                              "--out", str(tmp_path / "ft")])
    report = needle.run(args)
    assert list(report["results"]) == ["dense (fine-tuned lm)"]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--attn", "nsa", "linear"], "unknown attention type 'linear'"),
        (["--smoke", "--context", "12"], "--context 12 is too short"),
        (["--init", "/nonexistent.pt"], "--init: no checkpoint file at '/nonexistent.pt'"),
        (["--smoke", "--steps", "-1"], "--steps must be >= 1"),
        (["--smoke", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_needle_bad_arguments_give_one_line_and_exit_2(capsys, argv, fragment):
    assert exit_status(needle.main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("needle.py: error: ") and fragment in lines[0], lines


def test_bad_checkpoints_and_logs_give_one_line(corpus, tmp_path, capsys):
    """needle --init and train_lm --compare had failed with tracebacks (RuntimeError / KeyError) on a file of the
    right kind with the wrong contents; generate.py's loader already said why in one line, and is now theirs."""
    bad = tmp_path / "bad.pt"
    torch.save({"config": {"vocab_size": 256, "attn": "dense", "max_seq_len": 64}, "model": {}}, bad)
    assert exit_status(needle.main, ["--init", str(bad), "--smoke"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "does not fit a TransformerLM" in lines[0], lines
    torch.save({"config": {}, "model": {}}, bad)  # no max_seq_len: had been a KeyError
    assert exit_status(needle.main, ["--init", str(bad), "--smoke"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.json").write_text("{}")
    assert train_lm.main(["--compare", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a train_lm.py log (no history, args, num_parameters)" in err
