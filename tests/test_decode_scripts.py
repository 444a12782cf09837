"""The decoding scripts run: bench/decode.py's CPU smoke mode, and examples/generate.py with a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench import decode
from nsa_flex.modules import TransformerLM

REPO = Path(__file__).resolve().parents[1]


def test_decode_benchmark_smoke(tmp_path):
    payload = decode.main(["--smoke", "--out", str(tmp_path)])
    rows = payload["rows"]
    assert json.loads((tmp_path / "decode_smoke.json").read_text())["rows"] == rows
    assert {r["method"] for r in rows} == {"sdpa_dense", "nsa_decode", "nsa_decode_gather"}
    assert all("error" not in r and r["ms_per_token"] > 0 for r in rows), rows
    assert {(r["context"], r["batch"]) for r in rows} == {(95, 1), (200, 1), (95, 2), (200, 2)}


def test_generate_example_loads_a_checkpoint(tmp_path):
    config = dict(vocab_size=256, dim=32, depth=1, heads=2, attn="nsa", max_seq_len=64, sliding_window_size=8,
                  compress_block_size=8, compress_block_sliding_stride=4, selection_block_size=8,
                  num_selected_blocks=2)
    model = TransformerLM(**config)
    path = tmp_path / "lm.pt"
    torch.save({"config": model.config, "model": model.state_dict()}, path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "generate.py"), "--checkpoint", str(path), "--prompt", "abc",
         "--max-new-tokens", "5", "--temperature", "0", "--threads", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "'abc' ->" in proc.stdout and "checkpoint" in proc.stdout
    # The script's greedy output is the model's own greedy continuation.
    expected = model.generate([torch.tensor(list(b"abc"))], 5, temperature=0)[0].tolist()
    assert repr(bytes(expected).decode("utf-8", errors="replace")) in proc.stdout
