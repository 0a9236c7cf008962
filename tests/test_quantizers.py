import math

import pytest
import torch

from quant.context import TokenGroups, TokenPositions
from quant.quantizers import (OFFICIAL_PERCENTILES, Granularity, LogSqrt2Quantizer, Reservoir, UniformQuantizer,
                              fake_quantize, params_from_range, search_uniform_params)


def observe(q, *batches):
    q.start_observing()
    for batch in batches:
        q(batch)
    q.finish_observing()
    return q


def test_fake_quantize_formula_and_clamp():
    x = torch.tensor([-1.0, 0.0, 0.26, 0.74, 5.0])
    out = fake_quantize(x, torch.tensor(0.5), torch.tensor(2.0), 0, 7)
    # q = clamp(round(x/0.5) + 2, 0, 7) = [0, 2, 3, 3, 7] → (q − 2)·0.5
    assert out.tolist() == [-1.0, 0.0, 0.5, 0.5, 2.5]


def test_params_from_range_asymmetric_and_symmetric():
    step, zero = params_from_range(torch.tensor([-1.0]), torch.tensor([3.0]), 4, symmetric=False)
    assert step.item() == pytest.approx(4 / 15) and zero.item() == round(15 / 4)
    step, zero = params_from_range(torch.tensor([-1.0]), torch.tensor([3.0]), 4, symmetric=True)
    assert step.item() == pytest.approx(3 / 7) and zero.item() == 0
    # zero_in_range widens an all-positive range to include 0 (official RAR/MAR clamp)
    step, zero = params_from_range(torch.tensor([2.0]), torch.tensor([5.0]), 8, False, zero_in_range=True)
    assert zero.item() == 0 and step.item() == pytest.approx(5 / 255)


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_unsupported_bits_rejected(bits):
    with pytest.raises(ValueError, match="unsupported bit width"):
        UniformQuantizer(bits)


def test_search_prefers_minmax_for_uniform_and_clipping_for_outliers():
    uniform = torch.linspace(-1, 1, 10001)[None]
    step, _ = search_uniform_params(uniform, uniform.amin(-1), uniform.amax(-1), 8, False, (0.95, 1.0))
    assert step.item() == pytest.approx(2 / 255, rel=1e-6)  # clipping 5% of a uniform costs more: min/max wins
    g = torch.Generator().manual_seed(0)
    heavy = torch.randn(1, 100000, generator=g)
    heavy[0, 0] = 100.0  # one outlier: clipping it (100²/N) is far cheaper than a 100-wide grid
    step, _ = search_uniform_params(heavy, heavy.amin(-1), heavy.amax(-1), 4, False, (0.999, 0.9999, 1.0))
    assert step.item() < 1.0


def test_official_candidates_exclude_minmax():
    q = UniformQuantizer(8, percentiles=OFFICIAL_PERCENTILES)
    assert 1.0 not in q.percentiles
    x = torch.linspace(0, 1, 100001)[None, :, None].expand(1, -1, 2).contiguous()
    observe(q, x)
    # the widest official candidate is the 0.99999 quantile, slightly inside [0, 1]
    assert q.step.item() < 1 / 255


def test_out_channel_search_matches_per_row_loop():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g) * torch.logspace(-1, 1, 16)[:, None]
    q = UniformQuantizer(6, granularity="out_channel", size=16)
    q.calibrate_weight(w)
    for row in range(16):
        r = w[row:row + 1]
        step, zero = search_uniform_params(r, r.amin(-1), r.amax(-1), 6, False, q.percentiles)
        assert q.step[row].item() == pytest.approx(step.item())
        assert q.zero_point[row].item() == zero.item()


def test_full_statistics_do_not_depend_on_batching():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 10, 32, generator=g) * 3 + 1
    one = observe(UniformQuantizer(6), x)
    two = observe(UniformQuantizer(6), x[:3], x[3:])
    assert torch.equal(one.step, two.step) and torch.equal(one.zero_point, two.zero_point)
    assert one.zero_point.item() == round(one.zero_point.item())  # integer zero point


def test_ema_statistics_reproduce_official_blend():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 5, 8, generator=g), 4 * torch.randn(4, 5, 8, generator=g)
    first = observe(UniformQuantizer(8, statistics="ema"), a)
    second = observe(UniformQuantizer(8, statistics="ema"), b)
    both = observe(UniformQuantizer(8, statistics="ema"), a, b)
    assert both.step.item() == pytest.approx(0.1 * second.step.item() + 0.9 * first.step.item(), rel=1e-6)
    assert both.zero_point.item() == pytest.approx(0.1 * second.zero_point.item() + 0.9 * first.zero_point.item())


def test_reservoir_is_bounded_and_range_is_exact():
    q = UniformQuantizer(8, max_samples=1000, percentiles=(1.0,))
    q.start_observing()
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(10, 50, 4, generator=g) for _ in range(5)]
    batches[3][0, 0, 0] = 77.0
    for batch in batches:
        q(batch)
    assert q._reservoirs[0].rows.numel() <= 1000
    lo = min(b.min() for b in batches)
    q.finish_observing()
    step, zero = params_from_range(lo.reshape(1), torch.tensor([77.0]), 8, False)
    assert q.step.item() == pytest.approx(step.item())


def test_reservoir_is_uniform():
    res = Reservoir(capacity=2000, seed=0)
    for start in range(0, 20000, 1000):
        res.add(torch.arange(start, start + 1000, dtype=torch.float32)[:, None])
    # a uniform sample of 0..19999 has mean ≈ 10000 (std of the mean ≈ 130)
    assert abs(res.rows.mean().item() - 9999.5) < 600


def test_token_groups_and_incremental_positions_match_full_sequence():
    groups = TokenGroups.from_sizes([1, 4, 9])
    assert groups.group_of(torch.arange(16)).tolist() == [0] + [1] * 4 + [2] * 11
    positions = TokenPositions()
    q = UniformQuantizer(4, granularity="token_groups", token_groups=groups, positions=positions)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 14, 8, generator=g) * torch.tensor([50.0] + [1.0] * 4 + [5.0] * 9)[None, :, None]
    with positions.at(range(14)):
        observe(q, x)
        full = q(x)
    assert q.step[0] > q.step[2] > q.step[1]  # each group has its own range
    # KV-cache decoding: the same tokens arriving scale by scale use the same group parameters
    pieces = []
    for start, end in [(0, 1), (1, 5), (5, 14)]:
        with positions.at(range(start, end)):
            pieces.append(q(x[:, start:end]))
    assert torch.equal(torch.cat(pieces, 1), full)


def test_token_quantizer_without_positions_fails_clearly():
    q = UniformQuantizer(4, granularity="token_groups", token_groups=TokenGroups((0, 1)), positions=TokenPositions())
    with pytest.raises(RuntimeError, match="without token positions"):
        q(torch.zeros(1, 3, 4))


def test_sink_tokens_are_skipped_and_not_observed():
    positions = TokenPositions()
    q = UniformQuantizer(4, positions=positions, skip_tokens_below=1, percentiles=(1.0,))
    x = torch.randn(2, 6, 8)
    x[:, 0] = 1000.0
    with positions.at(range(6)):
        observe(q, x)
        out = q(x)
    assert q.step.item() < 1.0  # the sink did not set the range
    assert torch.equal(out[:, 0], x[:, 0])  # and passes through unquantized
    assert not torch.equal(out[:, 1:], x[:, 1:])


def test_dynamic_per_token_uses_each_tokens_range():
    q = UniformQuantizer(8, granularity=Granularity.DYNAMIC_TOKEN)
    x = torch.stack([torch.linspace(0, 1, 256), torch.linspace(-100, 100, 256)])
    out = q(x)
    assert (out[0] - x[0]).abs().max() <= 0.5 / 255 + 1e-6
    assert (out[1] - x[1]).abs().max() <= 0.5 * 200 / 255 + 1e-4


def test_log_sqrt2_levels():
    q = LogSqrt2Quantizer(4, percentiles=(1.0,))
    observe(q, torch.tensor([[1.0, 0.25, 0.0]]))
    assert q.delta.item() == 1.0
    x = torch.tensor([1.0, 1 / math.sqrt(2), 0.5, 0.3, 0.0, 1e-9])
    out = q(x)
    assert out[:3].tolist() == pytest.approx([1.0, 1 / math.sqrt(2), 0.5])
    assert out[3].item() == pytest.approx(0.25 * math.sqrt(2))  # −2·log2(0.3) = 3.47 → q = 3
    assert out[4].item() == 0.0 and out[5].item() == 0.0  # beyond 2^b levels → 0


def test_half_precision_inputs_quantize_in_float32():
    """A degenerate (all-zero) group gets the minimum step 1e-8, which is 0 in float16: no NaN may appear."""
    q = UniformQuantizer(8, percentiles=(1.0,))
    observe(q, torch.zeros(2, 3, 4))
    out = q(torch.tensor([[0.0, 1e-3, -2.0]], dtype=torch.float16))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    x = torch.randn(4, 8, 16)
    q = observe(UniformQuantizer(6), x)
    assert torch.equal(q(x.bfloat16()), q(x.bfloat16().float()).bfloat16())
