"""Issue 17: the GroupNorm / BatchNorm launch plans fill an H100 (132 SMs) at batch 1.

Pure launch-heuristic checks: the launchers' planning functions are called with the GPU rules
(``interpreter_enabled`` off, the pseudo-device sized as an H100) on the issue's shapes; nothing
is launched. Statistics (reduction) and apply grids, forward and backward, both layouts, must have
at least 132 programs: GroupNorm 1x320x64x64 with 32 groups, BatchNorm 1x64x56x56.
"""
import math

import pytest
import torch

import tilefuse.kernels as K

H100_SMS = 132


@pytest.fixture
def h100(monkeypatch):
    import tilefuse.kernels.norm_bn as kb
    import tilefuse.kernels.norm_group as kg

    monkeypatch.setattr(K, "INTERPRETER_SMS", H100_SMS)
    monkeypatch.setattr(K, "_SM_COUNTS", {})
    for mod in (kb, kg):
        monkeypatch.setattr(mod, "interpreter_enabled", lambda: False)
    return kb, kg


def _x3(shape, cl, dtype=torch.bfloat16):
    x = torch.empty(*shape, dtype=dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    return x.reshape(shape[0], shape[1], -1)


@pytest.mark.parametrize("cl", [False, True])
def test_group_norm_batch1_grids(h100, cl):
    _, kg = h100
    x = _x3((1, 320, 64, 64), cl)
    N, C, S = x.shape
    assert kg._cl_stats(x, 32) == cl
    if cl:
        for bwd in (False, True):
            plan = kg._cl_plan(x, 32, (6, 0.0), (True, True), bwd, (True, True))
            sgrid, agrid = plan[0], plan[6]
            assert math.prod(sgrid) >= H100_SMS, sgrid
            assert math.prod(agrid) >= H100_SMS, agrid
            assert plan[3]["BLOCK_C"] >= 8  # >= 16 contiguous bytes per row of a tile
        return
    for bwd in (False, True):
        (_, sbs), split, s_per, _, sblocks = kg._geometry(N, C, S, 32, x.device, bwd=bwd)
        assert N * 32 * split >= H100_SMS, split          # statistics / reduction
        assert N * 32 * sblocks >= H100_SMS, sblocks      # apply
        assert s_per % sbs == 0 and sbs >= 128


@pytest.mark.parametrize("cl", [False, True])
def test_batch_norm_batch1_grids(h100, cl):
    kb, _ = h100
    x = _x3((1, 64, 56, 56), cl)
    N, C, S = x.shape
    Ne, Se = kb._geometry(N, S, x)
    stats, (agrid, _, opts) = kb._fwd_launch(x, Ne == 1, Ne, Se, True, False, True, True, 1,
                                             0.0, True, True, False)
    assert math.prod(stats[0]) >= H100_SMS, stats[0]   # statistics
    assert math.prod(agrid) >= H100_SMS, agrid         # apply
    rgrid, _, _, _, bagrid, _, _ = kb._bwd_launch(x, Ne, Se, True, False, True, True, 1, 0.0,
                                                  False)
    assert math.prod(rgrid) >= H100_SMS and math.prod(bagrid) >= H100_SMS, (rgrid, bagrid)
    br, bc = kb._tiles(x, Se)
    assert br * bc >= kb.MIN_TILE  # >= 8 elements a thread at 4 warps: 128-bit accesses
    if not cl:  # one channel a tile: >= 32 elements a thread, the channel's scalars a minority
        assert br * bc // (32 * opts["num_warps"]) >= 32, opts


def test_batch_norm_large_batch_keeps_full_tiles(h100):
    """The halving only serves small grids: a large batch keeps TILE-sized programs."""
    kb, _ = h100
    x = _x3((32, 64, 56, 56), False)
    br, bc = kb._tiles(x, 3136)
    assert br * bc == 4096
