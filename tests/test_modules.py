import pytest
import torch

from eigenpatch.errors import UsageError
from eigenpatch.format.lowrank import LowRankLinear, factor_pair_saves, max_saving_rank
from eigenpatch.patchers.lowrank.factorize import factorize
from eigenpatch.patchers.lowrank.ranks import factorized_params, uniform_ranks


def test_factor_pair_shapes_and_parameter_count():
    m = LowRankLinear(576, 1536, rank=100, bias=True)
    assert m.lowrank_down.shape == (100, 576)
    assert m.lowrank_up.shape == (1536, 100)
    assert sum(p.numel() for p in m.parameters()) == 100 * (576 + 1536) + 1536
    assert m(torch.randn(3, 7, 576)).shape == (3, 7, 1536)


@pytest.mark.parametrize(("m", "n", "last"), [(576, 576, 287), (576, 1536, 418), (192, 576, 143), (4096, 11008, 2985)])
def test_break_even_ranks_match_reference(m, n, last):
    # the break-even rank r* = mn / (m + n): the largest rank that still saves parameters.
    assert max_saving_rank(n, m) == last
    assert factor_pair_saves(last, n, m)
    assert not factor_pair_saves(last + 1, n, m)


def test_svd_factors_reproduce_a_low_rank_matrix_exactly():
    torch.manual_seed(0)
    w = torch.randn(96, 8) @ torch.randn(8, 64)  # rank 8
    up, down = factorize(w, 8)
    pair = LowRankLinear.from_factors(up, down)
    assert torch.allclose(pair.dense_weight(), w, atol=1e-4)
    x = torch.randn(5, 64)
    assert torch.allclose(pair(x), x @ w.T, atol=1e-4)


def test_svd_truncation_error_equals_discarded_singular_values():
    torch.manual_seed(0)
    w = torch.randn(64, 48)
    s = torch.linalg.svdvals(w.double())
    up, down = factorize(w, 10)
    err = torch.linalg.matrix_norm((up @ down - w).double())
    assert err == pytest.approx(s[10:].square().sum().sqrt().item(), rel=1e-4)


def test_uniform_ranks_meet_the_parameter_budget():
    shapes = {"q": (576, 576), "k": (192, 576), "gate": (1536, 576), "down": (576, 1536)}
    dense = sum(m * n for m, n in shapes.values())
    for ratio in (0.2, 0.5, 0.8):
        ranks = uniform_ranks(shapes, ratio)
        kept = factorized_params(shapes, ranks) / dense
        assert 1 - ratio - 0.01 <= kept <= 1 - ratio
    # SmolLM2's ranks at keep 0.5: floor(0.5 m n / (m + n))
    assert uniform_ranks(shapes, 0.5) == {"q": 144, "k": 72, "gate": 209, "down": 209}


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(UsageError, match="outside"):
        uniform_ranks({"q": (8, 8)}, ratio)
