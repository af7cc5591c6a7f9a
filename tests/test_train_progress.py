"""tilefuse.train.fit progress: a tqdm bar on a terminal, plain lines in logs (no carriage-return
redraws: a non-terminal stderr used to collect one tqdm refresh per half second)."""
import pytest
import torch
import torch.nn as nn

from tilefuse import _progress, train


def _run(n=6, **kw):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(n)]
    return train.fit(model, data, opt, desc="t", **kw)


def test_plain_lines_outside_a_terminal(capsys):
    losses = _run(total=6)  # capsys: stderr is not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("t: step 1/6 loss ") and " gnorm " in lines[0]
    assert lines[-1].startswith("t: step 6/6 loss ") and len(lines) <= 3
    assert f"loss {losses[-1]:.4f}" in lines[-1]


def test_plain_lines_are_periodic_and_total_is_optional(capsys, monkeypatch):
    monkeypatch.setattr(_progress, "PLAIN_INTERVAL_S", 0.0)
    _run(n=3)
    assert [ln.split(" loss")[0] for ln in capsys.readouterr().err.splitlines()] == [
        "t: step 1", "t: step 2", "t: step 3"]
    _run(n=3, progress=False)
    assert capsys.readouterr().err == ""


def test_terminal_keeps_the_tqdm_bar(capsys, monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(_progress, "is_terminal", lambda stream=None: True)
    _run(total=6)
    err = capsys.readouterr().err
    assert "\r" in err and "t: step" not in err
