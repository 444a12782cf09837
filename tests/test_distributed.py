"""examples/train_lm.py under torchrun on CPU (2 processes, gloo): DDP and FSDP2 give the gradients of one
process on the same global batch, and a whole run -- interrupted and resumed from a sharded checkpoint -- follows
the single-process loss curve.

This file is also the torchrun worker: ``python -m torch.distributed.run --nproc-per-node 2 tests/test_distributed.py
MODE CORPUS OUT`` (the test below launches it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, load_example


def tiny(corpus: str, out: str, *extra: str) -> list[str]:
    # --device cpu: gloo even where CUDA exists (one GPU cannot host two ranks).
    return ["--attn", "dense", "--corpus", corpus, "--val-percent", "30", "--out", out, "--context", "32",
            "--batch", "4", "--dim", "16", "--depth", "2", "--heads", "2", "--steps", "3", "--warmup", "1",
            "--eval-every", "1", "--eval-batches", "1", "--ckpt-every", "0", "--no-progress", "--no-plot",
            "--device", "cpu", *extra]


def one_step_gradients(train_lm, args) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and full (unsharded) gradients of the first training batch, through the script's own pieces."""
    from nsa_flex.data import WindowSampler, load_corpus
    from nsa_flex.modules import TransformerLM

    dist = train_lm.Dist(args)
    try:
        torch.manual_seed(args.seed)
        model = TransformerLM(**train_lm.model_config(args)).to(dist.device)
        wrapped = train_lm.wrap_model(model, dist)
        data = load_corpus(args.corpus, val_percent=args.val_percent).train
        windows = next(WindowSampler(data, args.context, args.batch, seed=args.seed))
        loss = train_lm.lm_loss(wrapped, dist.local_rows(windows), args, dist.device)
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():  # fully_shard/DDP keep the names of the inner model
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = g.detach().cpu().clone()
        return float(dist.mean(loss.detach())), grads
    finally:
        dist.close()


def worker(mode: str, corpus: str, out: str) -> int:
    import torch.distributed as dist

    # One process group for the three phases (the script uses an existing group and leaves it alone).
    dist.init_process_group("gloo")
    train_lm = load_example("train_lm")
    try:
        return _worker(train_lm, mode, corpus, out)
    finally:
        train_lm.release_before_teardown()
        dist.destroy_process_group()


def _worker(train_lm, mode: str, corpus: str, out: str) -> int:
    loss, grads = one_step_gradients(train_lm, train_lm.parse_args(tiny(corpus, out, "--dist", mode)))
    if int(os.environ["RANK"]) == 0:
        torch.save({"loss": loss, "grads": grads}, Path(out) / "grads.pt")
    run = str(Path(out) / "run")
    # "Interrupted" after step 2, with 2 micro-batches per rank (gradients synchronized on the last one only).
    code = train_lm.main(tiny(corpus, run, "--dist", mode, "--stop-after", "2", "--grad-accum", "2"))
    return code or train_lm.main(tiny(corpus, run, "--dist", mode, "--resume", "--grad-accum", "2"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_on_the_same_global_batch(mode, corpus, tmp_path, monkeypatch):
    out = tmp_path / mode
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    # A session of its own, so that a hang kills torchrun *and* its workers (none is left behind).
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, mode,
         str(corpus), str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun ({mode}) hung for 240 s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-4000:] + stderr[-6000:]

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    train_lm = load_example("train_lm")
    # Gradients of one step: two ranks with half the batch each == one process with all of it.
    dist_result = torch.load(out / "grads.pt", weights_only=True)
    loss, grads = one_step_gradients(train_lm, train_lm.parse_args(tiny(str(corpus), str(out))))
    assert dist_result["loss"] == pytest.approx(loss, rel=1e-6, abs=1e-6)
    assert dist_result["grads"].keys() == grads.keys()
    for name, g in grads.items():
        assert g.abs().sum() > 0 or name.endswith("bias"), f"{name}: no gradient reached it"
        torch.testing.assert_close(dist_result["grads"][name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")

    # The whole run (3 AdamW steps, interrupted after 2, resumed from the gathered checkpoint; 2 micro-batches).
    single = train_lm.train(train_lm.parse_args(tiny(str(corpus), str(tmp_path / "single"))))
    ckpt = torch.load(out / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["args"]["dist"] == mode
    for key in ("train", "val"):
        got = [r["loss"] for r in ckpt["history"][key]]
        want = [r["loss"] for r in single["history"][key]]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), key
    ref = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)["model"]
    assert ckpt["model"].keys() == ref.keys()
    for name, p in ref.items():
        torch.testing.assert_close(ckpt["model"][name], p, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


if __name__ == "__main__":
    sys.exit(worker(*sys.argv[1:4]))
