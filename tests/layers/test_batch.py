import pytest
import torch

from zotune.layers.batch import pack


def test_pack_offsets_positions_and_masks():
    batch = pack([[0, 9, 5, 2], [0, 5, 2], [0, 7, 8, 9, 5, 2]], mask_token_id=5, position_offset=2)
    assert batch.input_ids.tolist() == [0, 9, 5, 2, 0, 5, 2, 0, 7, 8, 9, 5, 2]
    assert batch.cu_seqlens.tolist() == [0, 4, 7, 13]
    assert batch.positions.tolist() == [2, 3, 4, 5, 2, 3, 4, 2, 3, 4, 5, 6, 7]   # padding_idx + 1 + i
    assert batch.mask_index.tolist() == [2, 5, 11]
    assert batch.seq_lens == (4, 3, 6) and batch.max_seqlen == 6 and batch.num_tokens == 13


@pytest.mark.parametrize("sequences", [[[0, 5, 5, 2]], [[0, 2], [0, 5, 2]]])
def test_pack_needs_exactly_one_mask_per_sequence(sequences):
    with pytest.raises(ValueError, match="exactly one <mask>"):
        pack(sequences, mask_token_id=5, position_offset=2)


def test_pack_without_masks():
    batch = pack([[3, 4], [6]], mask_token_id=None, position_offset=0)
    assert batch.mask_index.numel() == 0 and batch.positions.tolist() == [0, 1, 0]


def test_paired_batch_is_the_batch_twice_with_its_split():
    batch = pack([[0, 9, 5, 2], [0, 5, 2]], mask_token_id=5, position_offset=2)
    pair = batch.paired
    assert pair.input_ids.tolist() == batch.input_ids.tolist() * 2
    assert pair.positions.tolist() == batch.positions.tolist() * 2
    assert pair.cu_seqlens.tolist() == [0, 4, 7, 11, 14]
    assert pair.mask_index.tolist() == [2, 5, 9, 12]
    assert pair.seq_lens == (4, 3, 4, 3) and pair.sequences == batch.sequences * 2
    assert (pair.pair_seqs, batch.pair_seqs) == (2, 0)
    assert batch.paired is pair  # built once per batch: a CUDA graph finds it already loaded
    assert batch.to("cpu").paired is not pair  # a moved batch pairs its own tensors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mask_token_id", [5, None])
def test_a_batch_moved_to_the_gpu_keeps_every_field(mask_token_id):
    batch = pack([[0, 9, 5, 2], [0, 5, 2], [0, 7, 8, 9, 5, 2]], mask_token_id=mask_token_id, position_offset=2)
    moved = batch.to("cuda")
    for name in ("input_ids", "positions", "cu_seqlens", "mask_index"):
        here, there = getattr(batch, name), getattr(moved, name)
        assert there.is_cuda and there.dtype == here.dtype and torch.equal(there.cpu(), here), name
