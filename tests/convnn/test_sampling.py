"""convnn.sampling.CandidateSampler: all / random / spatial candidates and their errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from convnn.sampling import CandidateSampler


def test_all_returns_none() -> None:
    assert CandidateSampler("all").candidates((4, 5), 1, K=9) is None


def test_random_training_draws_distinct_sorted_and_fresh() -> None:
    s = CandidateSampler("random", num_samples=10)
    torch.manual_seed(0)
    a = s.candidates((6, 7), 1, training=True)
    b = s.candidates((6, 7), 1, training=True)
    assert a.shape == (10,) and a.dtype == torch.long
    assert torch.equal(a, a.unique()) and 0 <= int(a.min()) and int(a.max()) < 8 * 9
    assert not torch.equal(a, b)
    torch.manual_seed(0)
    assert torch.equal(s.candidates((6, 7), 1, training=True), a)  # global RNG → reproducible


def test_random_eval_fixed_is_reproducible_and_leaves_global_rng_alone() -> None:
    s = CandidateSampler("random", num_samples=5)
    state = torch.get_rng_state()
    a = s.candidates((8, 8), 0, training=False)
    b = s.candidates((8, 8), 0, training=False)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)
    other = CandidateSampler("random", num_samples=5, eval_seed=1)
    assert not torch.equal(other.candidates((8, 8), 0, training=False), a)


def test_hashed_permutation_is_a_seeded_spread_out_permutation() -> None:
    from convnn.sampling import hashed_permutation

    for n in (1, 2, 37, 1156, 5000):
        perm = hashed_permutation(n, 0)
        assert torch.equal(perm.sort().values, torch.arange(n))
    a, b = hashed_permutation(1156, 0), hashed_permutation(1156, 1)
    assert torch.equal(a, hashed_permutation(1156, 0)) and not torch.equal(a, b)
    assert torch.equal(hashed_permutation(50, 2**40 + 3), hashed_permutation(50, 2**40 + 3))
    # the first 100 of 1156 cover the map: every quarter of the token range gets some
    first = a[:100]
    assert all(((first >= q * 289) & (first < (q + 1) * 289)).sum() >= 10 for q in range(4))
    assert (first[1:] - first[:-1]).abs().float().mean() > 100  # not a near-sequential run


def test_random_eval_random_draws_fresh() -> None:
    s = CandidateSampler("random", num_samples=5, eval_sampling="random")
    torch.manual_seed(0)
    a = s.candidates((8, 8), 0, training=False)
    assert not torch.equal(a, s.candidates((8, 8), 0, training=False))


def test_random_with_m_at_least_n_is_all() -> None:
    s = CandidateSampler("random", num_samples=16)
    assert s.candidates((4, 4), 0) is None
    assert s.candidates((4, 4), 1) is not None  # 36 padded tokens > 16


def test_spatial_grid_exact_indices_non_square_with_padding() -> None:
    # H=5, W=8, n=3, q=1: rows linspace(1, 3, 3) = 1, 2, 3; cols linspace(1, 6, 3) = 1, 3.5→3, 6
    # padded map (p=2) is 9 × 12: flat index = (r + 2) · 12 + (c + 2)
    s = CandidateSampler("spatial", num_samples=3, sample_padding=1)
    got = s.candidates((5, 8), 2)
    expected = [(r + 2) * 12 + (c + 2) for r in (1, 2, 3) for c in (1, 3, 6)]
    assert got.tolist() == expected


def test_spatial_grid_no_padding_and_1d() -> None:
    s = CandidateSampler("spatial", num_samples=2)
    assert s.candidates((4, 6), 0).tolist() == [0, 5, 18, 23]
    s1 = CandidateSampler("spatial", num_samples=3, sample_padding=1)
    assert s1.candidates((9,), 2).tolist() == [1 + 2, 4 + 2, 7 + 2]


def test_spatial_n_at_least_min_side_is_all() -> None:
    s = CandidateSampler("spatial", num_samples=4)
    assert s.candidates((4, 9), 0) is None
    assert s.candidates((5, 9), 0) is not None


class _HostTensorOps(TorchDispatchMode):
    """Names the ops that touch a CPU tensor (on a GPU: made on the host, then copied over)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = tree_flatten((args, kwargs, out))[0]
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in leaves):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize(
    ("sampler", "training"),
    [
        (CandidateSampler("random", num_samples=7), True),
        (CandidateSampler("random", num_samples=7), False),
        (CandidateSampler("random", num_samples=7, eval_sampling="random"), False),
        (CandidateSampler("spatial", num_samples=3, sample_padding=1), True),
    ],
)
def test_candidates_are_made_on_the_target_device(
    sampler: CandidateSampler, training: bool
) -> None:
    """A blocking host-to-device copy per forward would wait for the whole GPU stream."""
    sampler.candidates((6, 7), 1, training=training, device="meta")  # a grid's one-time copy
    with _HostTensorOps() as rec:
        cand = sampler.candidates((6, 7), 1, training=training, device="meta")
    assert cand.device.type == "meta" and rec.ops == []


def test_spatial_grid_is_built_once_per_shape_and_device() -> None:
    s = CandidateSampler("spatial", num_samples=3)
    a = s.candidates((6, 7), 1, device="cpu")
    assert s.candidates((6, 7), 1, device=torch.device("cpu")) is a  # reused, not copied again
    assert s.candidates((6, 7), 0, device="cpu").tolist() != a.tolist()
    assert CandidateSampler("spatial", num_samples=3).candidates((6, 7), 1).tolist() == a.tolist()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampling_type": "grid"}, r"sampling_type='grid'.*all.*random.*spatial"),
        ({"sampling_type": "random", "num_samples": 0}, r"num_samples=0 must be an integer >= 1"),
        ({"sampling_type": "random"}, r"num_samples=-1 .*sampling_type='random'"),
        ({"sampling_type": "spatial", "num_samples": -3}, r"num_samples=-3 .*grid points"),
        ({"sampling_type": "spatial", "num_samples": 2.5}, r"num_samples=2.5"),
        ({"sample_padding": -1}, r"sample_padding=-1 must be an integer >= 0"),
        ({"eval_sampling": "seeded"}, r"eval_sampling='seeded'.*fixed.*random"),
    ],
)
def test_constructor_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CandidateSampler(**kwargs)


def test_k_errors() -> None:
    with pytest.raises(ValueError, match=r"K=0 must be an integer >= 1"):
        CandidateSampler("all").check_k(0)
    with pytest.raises(ValueError, match=r"K=6 .*num_samples=4 .*1 <= K <= 5"):
        CandidateSampler("random", num_samples=4).check_k(6)
    with pytest.raises(ValueError, match=r"K=11 .*num_samples=3 \(9 candidates\)"):
        CandidateSampler("spatial", num_samples=3).check_k(11)
    CandidateSampler("random", num_samples=4).check_k(5)


def test_call_time_errors_name_shapes() -> None:
    with pytest.raises(ValueError, match=r"K=10 .*spatial shape \(3, 3\).*9 tokens"):
        CandidateSampler("all").candidates((3, 3), 0, K=10)
    with pytest.raises(ValueError, match=r"sample_padding=2 .*spatial shape \(4, 6\)"):
        CandidateSampler("spatial", num_samples=2, sample_padding=2).candidates((4, 6), 0)
    # n=3 with q=1 on a 4-wide side: duplicate grid points collapse, then K is too large
    with pytest.raises(ValueError, match=r"K=6 .*4 candidates"):
        CandidateSampler("spatial", num_samples=3, sample_padding=1).candidates((4, 4), 0, K=6)
