"""nsa_flex.data: the stdlib byte corpus (deterministic, disjoint split) and the seeded window sampler."""

from __future__ import annotations

import hashlib

import pytest
import torch

from nsa_flex.data import SEPARATOR, WindowSampler, is_validation, list_files, load_corpus, stdlib_path


def make_corpus(root, n=40, prefix="mod"):
    """``n`` small *.py files (plus files that must be ignored) in a two-level tree; returns their contents."""
    contents = {}
    for i in range(n):
        rel = f"pkg{i % 3}/{prefix}{i}.py" if i % 2 else f"{prefix}{i}.py"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        text = f"# file {i}\nx = {i}\n" * (i + 1)
        path.write_text(text)
        contents[rel] = text.encode()
    (root / "notes.txt").write_text("not python")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "installed.py").write_text("import this\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "stale.py").write_text("x = 1\n")
    return contents


def test_split_rule_is_sha1_of_the_relative_path():
    for rel in ("os.py", "json/decoder.py", "asyncio/base_events.py"):
        assert is_validation(rel, 5) == (int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100 < 5)
    assert all(is_validation(f"f{i}.py", 99.999) for i in range(20)) is True


def test_stdlib_split_is_deterministic_disjoint_and_about_five_percent():
    files = list_files(stdlib_path())
    assert len(files) > 200 and files == sorted(files) and files == list_files(stdlib_path())
    assert not any(part in ("site-packages", "dist-packages") for f in files for part in f.split("/"))
    val = {f for f in files if is_validation(f)}
    train = {f for f in files if not is_validation(f)}
    assert val and train and not (val & train) and val | train == set(files)
    assert 0.02 < len(val) / len(files) < 0.10
    assert "os.py" in files


def test_load_corpus_joins_sorted_files_and_splits_by_file(tmp_path):
    contents = make_corpus(tmp_path)
    corpus = load_corpus(tmp_path, val_percent=30)
    assert corpus.train.dtype == torch.uint8 and corpus.val.dtype == torch.uint8
    assert set(corpus.train_files) | set(corpus.val_files) == set(contents)  # ignored: txt, site-packages, cache
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert corpus.train_files == sorted(corpus.train_files) and corpus.val_files == sorted(corpus.val_files)
    for files, data in ((corpus.train_files, corpus.train), (corpus.val_files, corpus.val)):
        assert all(is_validation(f, 30) == (files is corpus.val_files) for f in files)
        assert bytes(data.tolist()) == SEPARATOR.join(contents[f] for f in files)
    again = load_corpus(tmp_path, val_percent=30)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)
    first = load_corpus(tmp_path, val_percent=30, max_files=10)
    assert len(first.train_files) + len(first.val_files) == 10


def test_split_does_not_depend_on_creation_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    names = [f"m{i}.py" for i in range(30)]
    for name in names:
        (a / name).write_text(name)
    for name in reversed(names):
        (b / name).write_text(name)
    ca, cb = load_corpus(a, val_percent=20), load_corpus(b, val_percent=20)
    assert ca.val_files == cb.val_files and torch.equal(ca.train, cb.train)


def test_single_file_corpus_keeps_its_last_bytes_for_validation(tmp_path):
    path = tmp_path / "enwik.txt"
    path.write_bytes(bytes(range(256)) * 4)
    corpus = load_corpus(path, val_percent=25)
    assert len(corpus.val) == 256 and torch.equal(torch.cat([corpus.train, corpus.val]),
                                                  torch.arange(256, dtype=torch.uint8).repeat(4))


def test_bad_corpus_paths_raise_clear_value_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"contains no \*\.py files"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(tmp_path / "empty.txt")
    one = tmp_path / "one"
    one.mkdir()
    (one / "only.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="split is empty"):
        load_corpus(one, val_percent=1 if is_validation("only.py", 1) is False else 99)
    with pytest.raises(ValueError, match="val_percent"):
        load_corpus(one, val_percent=0)


def test_sampler_windows_are_reproducible_and_resumable():
    data = torch.arange(1000) % 251
    s1 = WindowSampler(data.to(torch.uint8), context=16, batch=3, seed=7)
    batches = [next(s1) for _ in range(5)]
    assert batches[0].shape == (3, 17) and batches[0].dtype == torch.long
    for b in batches:  # each row is a contiguous slice of the data
        starts = b[:, 0]
        assert torch.equal(b, data[starts[:, None] + torch.arange(17)])
    s2 = WindowSampler(data.to(torch.uint8), context=16, batch=3, seed=7)
    next(s2), next(s2)
    state = s2.state_dict()
    s3 = WindowSampler(data.to(torch.uint8), context=16, batch=3, seed=123)
    s3.load_state_dict(state)
    assert all(torch.equal(next(s3), b) for b in batches[2:])
    assert not torch.equal(next(WindowSampler(data.to(torch.uint8), 16, 3, seed=8)), batches[0])
    with pytest.raises(ValueError, match="batch=3"):
        WindowSampler(data.to(torch.uint8), 16, 4).load_state_dict(state)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fewer than context"):
        WindowSampler(torch.zeros(10, dtype=torch.uint8), context=10, batch=1)
    with pytest.raises(ValueError, match="context"):
        WindowSampler(torch.zeros(10, dtype=torch.uint8), context=0, batch=1)
    with pytest.raises(ValueError, match="1-D"):
        WindowSampler(torch.zeros(2, 10, dtype=torch.uint8), context=2, batch=1)
    # a wrong kind is a TypeError naming the argument (a seed had been torch's "manual_seed expected a long")
    with pytest.raises(TypeError, match="seed"):
        WindowSampler(torch.zeros(10, dtype=torch.uint8), context=2, batch=1, seed="a")
    with pytest.raises(TypeError, match="batch"):
        WindowSampler(torch.zeros(10, dtype=torch.uint8), context=2, batch="3")
    with pytest.raises(TypeError, match="val_percent"):
        load_corpus(val_percent="5")
    with pytest.raises(TypeError, match="max_files"):
        load_corpus(max_files="3")
