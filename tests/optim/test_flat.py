import pytest
import torch

from zotune.optim.flat import FlatParameters


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))


def _no_decay(name, p):
    return p.ndim == 1  # biases and LayerNorm


def test_layout_puts_decayed_tensors_first():
    model = _model()
    flat = FlatParameters(list(model.named_parameters()), _no_decay)
    assert flat.names == ["0.weight", "2.weight", "0.bias", "1.weight", "1.bias", "2.bias"]
    assert flat.n_decay == 4 * 3 + 3 * 2
    assert flat.numel == sum(p.numel() for p in model.parameters()) == flat.buffer.numel()
    assert flat.offsets == [0, 12, 18, 21, 24, 27]


def test_set_of_names_equals_predicate():
    model = _model()
    names = {"0.bias", "1.weight", "1.bias", "2.bias"}
    by_set = FlatParameters(list(_model().named_parameters()), names)
    by_fn = FlatParameters(list(model.named_parameters()), _no_decay)
    assert by_set.names == by_fn.names and torch.equal(by_set.buffer, by_fn.buffer)


def test_parameters_alias_the_buffer_and_keep_values():
    model = _model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = list(model.parameters())
    flat = FlatParameters(list(model.named_parameters()), _no_decay)
    assert list(model.parameters()) == params  # same Parameter objects
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad
        offset = flat.offsets[flat.names.index(name)]
        assert p.data_ptr() == flat.buffer[offset:].data_ptr()
    flat.buffer.add_(1.0)
    assert torch.equal(model[0].weight, before["0.weight"] + 1)
    with torch.no_grad():
        model[2].bias.zero_()
    assert torch.equal(flat.buffer[27:29], torch.zeros(2))


def test_autograd_still_works():
    model = _model()
    FlatParameters(list(model.named_parameters()), _no_decay)
    model(torch.randn(5, 4)).square().sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_state_dict_copies_and_load_roundtrip():
    flat = FlatParameters(list(_model().named_parameters()), _no_decay)
    saved = flat.state_dict()
    assert saved["0.weight"].shape == (3, 4)
    saved["0.weight"].zero_()  # a copy: the buffer is untouched
    assert flat.buffer[:12].abs().sum() > 0
    original = flat.state_dict()
    flat.buffer.normal_()
    flat.load_(original)
    assert all(torch.equal(t, original[n]) for n, t in flat.state_dict().items())


def test_load_rejects_mismatches():
    flat = FlatParameters(list(_model().named_parameters()), _no_decay)
    tensors = flat.state_dict()
    with pytest.raises(ValueError, match="missing"):
        flat.load_({k: v for k, v in tensors.items() if k != "1.bias"})
    with pytest.raises(ValueError, match="shape"):
        flat.load_({**tensors, "0.weight": torch.zeros(4, 3)})


def test_rejects_bad_parameter_lists():
    model = _model()
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match="not among"):
        FlatParameters(named, {"0.bais"})
    with pytest.raises(ValueError, match="twice"):
        FlatParameters(named + named[:1], set())
    with pytest.raises(ValueError, match="float32"):
        FlatParameters([("w", torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)))], set())


def test_reading_plus_rebinds_the_parameters_for_a_while():
    model = _model()
    flat = FlatParameters(list(model.named_parameters()), _no_decay)
    flat.add_plus()
    flat.plus.copy_(flat.buffer + 1)
    x = torch.randn(5, 4)
    before = model(x)
    with flat.reading_plus():
        assert all(p.data_ptr() == v[0].data_ptr() for p, v in zip(flat.parameters, flat.pair_views().values()))
        shifted = model(x)
    assert not torch.equal(shifted, before)
    assert torch.equal(model(x), before)  # back on the buffer
    model[0].weight.data.add_(1)  # and writing the Parameter writes the buffer again
    assert flat.buffer[0] == flat.plus[0]


def test_pair_views_are_each_tensor_at_plus_and_as_it_is_without_a_copy():
    model = _model()
    named = list(model.named_parameters())
    flat = FlatParameters(named, _no_decay)
    before = {name: p.detach().clone() for name, p in named}
    pairs = flat.pair_views()  # adds the second buffer: the tensors keep their values
    flat.plus.copy_(flat.buffer * 2)
    for name, p in named:
        assert pairs[name].shape == (2, *p.shape)
        assert torch.equal(pairs[name][1], before[name]) and torch.equal(pairs[name][0], 2 * before[name])
        assert pairs[name][1].data_ptr() == p.data_ptr()  # the Parameter itself
    with torch.no_grad():
        model[0].weight.add_(1)
    assert torch.equal(pairs["0.weight"][1], model[0].weight)
