"""The graph-building verdicts the cuDNN branches share (nsa_flex.functional.cudnn_graph); no GPU needed."""

from unittest import mock

import pytest

from nsa_flex.functional import cudnn_graph, window_cudnn


def test_builds_tries_once_per_key_and_warns_once_where_refused():
    calls = []

    def refuse():
        calls.append(1)
        raise RuntimeError("no engine")

    verdicts = {}
    with pytest.warns(UserWarning, match=r"^refused here \(RuntimeError: no engine\)$"):
        assert not cudnn_graph.builds(verdicts, ("a",), refuse, lambda: "refused here")
    assert not cudnn_graph.builds(verdicts, ("a",), refuse, lambda: "refused here")  # remembered: no second try
    assert cudnn_graph.builds(verdicts, ("b",), lambda: None, lambda: "never said")
    assert len(calls) == 1 and verdicts == {("a",): False, ("b",): True}


def test_window_refusal_names_the_shapes():
    signature = ((1, 4, 300, 64), (1, 2, 300, 64), (1,) * 4, (1,) * 4, (1,) * 4, "torch.bfloat16", 37, 0.125, 0)
    refused = mock.patch.object(window_cudnn, "_build_graphs", side_effect=RuntimeError("no engine"))
    with refused, mock.patch.object(window_cudnn, "_SUPPORT", {}):
        with pytest.warns(UserWarning, match=r"q \[1, 4, 300, 64\], k \[1, 2, 300, 64\], torch.bfloat16, window 37"):
            assert not window_cudnn._graphs_build(signature)
