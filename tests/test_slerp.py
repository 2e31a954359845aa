"""methods/slerp.py: the streamed result is the docstring's formula, bit for bit, with the norms
and the dot product summed block by block over fresh float64 copies (what slerp did before it
reused one float64 scratch buffer for every block), whole and in row blocks of uneven length."""

from __future__ import annotations

import math

import pytest
import torch

from streammerge.methods import slerp
from streammerge.methods.base import TensorTask
from tests.test_fused import Rowed


def reference(base: torch.Tensor, expert: torch.Tensor, t: float, blocks: list) -> torch.Tensor:
    aa = bb = ab = 0.0
    for rows in blocks:
        a = (base if rows is None else base[rows[0] : rows[1]]).double()
        b = (expert if rows is None else expert[rows[0] : rows[1]]).double()
        aa, bb, ab = aa + float((a * a).sum()), bb + float((b * b).sum()), ab + float((a * b).sum())
    na, nb = math.sqrt(aa) or 1.0, math.sqrt(bb) or 1.0
    ca, cb = slerp.coefficients(t, ab / (na * nb))
    return expert.clone().mul_(cb).add_(base, alpha=ca)


@pytest.mark.parametrize("block", [None, 5 * 77])
@pytest.mark.parametrize("t", [0.3, 0.5])
def test_streamed_slerp_is_the_formula_bit_for_bit(block, t, monkeypatch):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(263, 77, generator=g).bfloat16().float()  # 263 rows: the last block is short
    expert = (base + 0.05 * torch.randn(263, 77, generator=g)).bfloat16().float()
    task = TensorTask("model.layers.0.mlp.up_proj.weight", base.clone(), Rowed([expert]), (1.0,))
    if block is not None:
        monkeypatch.setattr(TensorTask, "row_blocks", lambda self, m=None, _r=TensorTask.row_blocks: _r(self, block))
    blocks = task.row_blocks()
    assert (len(blocks) > 1) == (block is not None)
    ours = slerp.merge(task, slerp.SlerpParams(t=t))
    assert torch.equal(ours.view(torch.int32), reference(base, expert, t, blocks).view(torch.int32))
