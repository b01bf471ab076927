"""The few-rows matmul (layers/linear.py) on a GPU against cuBLAS (F.linear, TF32), for the
shapes of RoBERTa-large's last layer and head above a cached trunk: R <mask> rows times a
float32 weight. Such a matmul is bound by reading the weight, so the table also gives the
weight's bytes over the time (GB/s). Calls are timed as a MeZO step makes them, inside a CUDA
graph: 20 calls captured in one graph, each on its own copy of the weight so that it comes from
memory and not from the L2 cache (as in a step, where the layer's other weights pass between
two reads of one), the median of blocks of back-to-back replays (CUDA events), over 20. The split-K kernel is timed at its default tiles and at a few others.

    python benchmarks/linear_kernels.py
"""

import torch

from common import back_to_back_ms

from zotune.layers import linear as few_rows

# (name, K, N): query/output projections and the head's dense layer, key+value, the feed-forward pair.
SHAPES = [("q / out / head", 1024, 1024), ("k+v", 1024, 2048), ("ffn_in", 1024, 4096), ("ffn_out", 4096, 1024)]
ROWS = (32, 64, 128)
# (BLOCK_N, BLOCK_K, PROGRAMS_PER_SM); the first is the module's default.
TILES = [(few_rows.BLOCK_N, few_rows.BLOCK_K, few_rows.PROGRAMS_PER_SM), (32, 64, 2), (64, 64, 1), (32, 64, 1)]
CALLS = 20


def graphed_ms(fn, weights) -> float:
    """ms per call of fn(weight) replayed from a CUDA graph of CALLS calls, one per weight copy."""
    fn(weights[0])  # compiles and initialises outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for weight in weights:
            fn(weight)
    return back_to_back_ms(graph.replay, 20) / CALLS


def main():
    torch.backends.cuda.matmul.allow_tf32 = True  # as the runner sets it
    default = TILES[0]
    print(f"\nFew-rows matmul, float32 weights, TF32, on {torch.cuda.get_device_name()}")
    print("| shape | rows | cuBLAS ms | GB/s | split-K ms (tiles N, K, programs/SM up to 64 rows) | GB/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, k, n in SHAPES:
            weights = [torch.randn(n, k, device="cuda") * 0.02 for _ in range(CALLS)]
            weight, bias = weights[0], torch.randn(n, device="cuda")
            gigabytes = weight.numel() * 4 / 1e9
            for rows in ROWS:
                x = torch.randn(rows, k, device="cuda")
                cublas = graphed_ms(lambda w: torch.nn.functional.linear(x, w, bias), weights)
                for tiles in TILES:
                    few_rows.BLOCK_N, few_rows.BLOCK_K, few_rows.PROGRAMS_PER_SM = tiles
                    ours = few_rows.linear(x, weight, bias)  # compiles outside the timing
                    torch.testing.assert_close(ours, torch.nn.functional.linear(x, weight, bias), rtol=1e-2,
                                               atol=1e-2)
                    ms = graphed_ms(lambda w: few_rows.linear(x, w, bias), weights)
                    print(f"| {name} ({k}->{n}) | {rows} | {cublas:.4f} | {gigabytes / cublas * 1e3:.0f} "
                          f"| {ms:.4f} ({', '.join(map(str, tiles))}{', default' if tiles == default else ''}) "
                          f"| {gigabytes / ms * 1e3:.0f} | {cublas / ms:.2f}x |")
                few_rows.BLOCK_N, few_rows.BLOCK_K, few_rows.PROGRAMS_PER_SM = default
            del weights


if __name__ == "__main__":
    main()
