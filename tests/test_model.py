"""The network: masking, set invariance, and that requested targets never leak into the inputs."""
import pytest
import torch

from densiformer.config import ModelConfig
from densiformer.model import DensityModel

C, TARGETS = 6, [4, 5]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return DensityModel(C, TARGETS, ModelConfig(d_model=32, heads=4, head_width=64)).eval()


def _values(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, C, generator=g)
    values[torch.rand(n, C, generator=g) < 0.3] = float("nan")
    return values


@torch.no_grad()
def test_masked_token_changes_nothing(model):
    """A NaN column gives the same context as leaving its token out altogether."""
    values = _values()
    values[:, 2] = float("nan")
    observed = ~torch.isnan(values)
    with_token = model.context(values, observed)
    keep = [j for j in range(C) if j != 2]
    tokens = model.embedding(values, observed)[:, keep]
    without_token = model.encoder(tokens, ~observed[:, keep])
    torch.testing.assert_close(with_token, without_token, rtol=0, atol=1e-5)


@torch.no_grad()
def test_masked_value_is_never_read(model):
    """Whatever a missing column's value would be, the context is the same."""
    values = _values()
    observed = ~torch.isnan(values)
    base = model.context(values, observed)
    garbage = torch.where(observed, values, torch.full_like(values, 1e6))
    torch.testing.assert_close(model.context(garbage, observed), base, rtol=0, atol=1e-5)


@torch.no_grad()
def test_token_order_does_not_matter(model):
    values = _values()
    observed = ~torch.isnan(values)
    tokens = model.embedding(values, observed)
    base = model.encoder(tokens, ~observed)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(model.encoder(tokens[:, perm], ~observed[:, perm]), base, rtol=0, atol=1e-5)


@torch.no_grad()
def test_requested_target_is_removed_from_inputs(model):
    values = _values()
    request = torch.zeros(len(values), len(TARGETS))
    request[:, 0] = 1
    hidden = values.clone()
    hidden[:, TARGETS[0]] = float("nan")
    torch.testing.assert_close(model.condition(values, request), model.condition(hidden, request),
                               rtol=0, atol=1e-6)
    # ...while a target that is not requested is an input and does change the condition.
    other = values.clone()
    other[:, TARGETS[1]] = 3.0
    assert (model.condition(other, request) - model.condition(values, request)).abs().max() > 1e-3


@torch.no_grad()
def test_nothing_observed_gives_finite_context(model):
    values = torch.full((4, C), float("nan"))
    context = model.context(values, ~torch.isnan(values))
    assert torch.isfinite(context).all()
    # every such row is the same unconditional context
    torch.testing.assert_close(context, context[:1].expand_as(context))


@torch.no_grad()
def test_head_predicts_zero_on_unrequested_targets(model):
    values = _values(8)
    request = torch.tensor([[1.0, 0.0]]).expand(8, 2)
    cond = model.condition(values, request)
    eps = model(torch.randn(8, 2), torch.zeros(8), cond, request)
    assert (eps[:, 1] == 0).all() and (eps[:, 0] != 0).all()


def test_paper_config_sizes():
    cfg = ModelConfig.paper()
    assert (cfg.d_model, cfg.encoder_layers, cfg.heads, cfg.head_width, cfg.head_layers) == (192, 2, 24, 512, 5)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, heads=4)
