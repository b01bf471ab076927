"""CUDA graphs read the weights and the trunk cache's pool at their capture-time addresses: a
rebound tensor the graph reads, a tensor attached to a module it runs, or a pool that grew must
make it capture again; a tensor below the layer a graph starts at is not read, and rebinding it
must cost no capture."""

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


def test_a_graph_gathering_from_a_pool_that_grew_captures_again(tiny_mlm_dir):
    # The graph of batch A gathers from the cache's pool. Filling the cache makes the pool grow
    # (a new tensor); batch B, of A's shape, is then stored in the new pool only. A graph still
    # reading the old pool would give B stale rows.
    prompted = build(str(tiny_mlm_dir), "sst2", device="cuda")
    runner, encode = prompted.runner, lambda text: prompted.prompt.encode((text,))
    runner.enable_cache(["layers.1.ffn_in.weight"], 1 << 30)
    batch_a = runner.pack([encode("a gorgeous , witty film "), encode("boring ")])
    batch_b = runner.pack([encode("a tedious , witless film "), encode("lovely ")])
    filler = runner.pack([encode(f"sentence {i} ") for i in range(80)])  # 80 blocks: more than the first pool
    with torch.inference_mode():
        runner.logits(batch_a)
        pool = runner.cache.pool
        runner.logits(filler)
        assert runner.cache.pool.data_ptr() != pool.data_ptr()
        captures = runner.graphs.captures
        graphed = runner.logits(batch_b)
        assert runner.graphs.captures == captures + 1  # B's shape is A's, captured again
        rows = runner.cache.hidden_states(batch_b, None)
        eager = runner.model(runner.on_device(batch_b), runner.label_word_ids, hidden=rows.hidden, start_layer=1)
    torch.testing.assert_close(graphed, eager.float(), rtol=2e-3, atol=2e-3)  # TF32 kernels may differ by shape
