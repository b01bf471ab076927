"""CUDA graphs read the weights at their capture-time addresses: a rebound tensor the graph
reads, or a tensor attached to a module it runs, must make it capture again; a tensor below
the layer a graph starts at is not read, and rebinding it must cost no capture."""

import pytest
import torch

from zotune.evaluate import build
from zotune.optim.subsets import SubsetOptions, select_trainable

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rebind(param: torch.nn.Parameter, scale: float) -> None:
    param.data = param.data * scale  # a new tensor at a new address, as FlatParameters or .to() leave


def test_a_rebound_or_attached_tensor_the_graph_reads_captures_again(tiny_mlm_dir):
    prompted = build(str(tiny_mlm_dir), "sst2", device="cuda")
    runner, model = prompted.runner, prompted.runner.model
    graphs = runner.graphs
    batch = runner.pack([prompted.prompt.encode(("a gorgeous , witty film ",)),
                         prompted.prompt.encode(("boring ",))])
    start = model.config.num_layers - 1
    on_device = runner.on_device(batch)  # the graph takes the batch from the host, an eager forward from the GPU
    with torch.inference_mode():
        hidden = model.trunk(on_device, start)

    @torch.inference_mode()
    def graphed():
        return graphs(batch, hidden, start)[0].clone()

    @torch.inference_mode()
    def eager():
        return model(on_device, runner.label_word_ids, hidden=hidden, start_layer=start).float()

    graphed()
    graphed()
    assert graphs.captures == 1
    _rebind(model.layers[0].ffn_in.weight, 3.0)  # below the graph's first layer: never read
    graphed()
    assert graphs.captures == 1
    before = graphed()
    _rebind(model.layers[start].ffn_in.weight, 3.0)
    after = graphed()
    assert graphs.captures == 2 and not torch.equal(after, before)
    torch.testing.assert_close(after, eager(), rtol=2e-3, atol=2e-3)  # TF32 kernels may differ by shape
    _rebind(model.embeddings.word.weight, 2.0)  # the tied decoder: read by every graph
    torch.testing.assert_close(graphed(), eager(), rtol=2e-3, atol=2e-3)
    assert graphs.captures == 3
    select_trainable(model, "lora", SubsetOptions(layers=(start,), seed=1))  # attaches LoRA to the top layer
    model.cuda()
    with torch.no_grad():  # B starts at zero; make the LoRA change the logits
        for name, p in model.named_parameters():
            if "lora" in name and name.endswith("B"):
                p.fill_(0.5)
    torch.testing.assert_close(graphed(), eager(), rtol=2e-3, atol=2e-3)
    assert graphs.captures == 4
