"""The paged cache's pure helpers, against hand-computed values."""

from areal_async.model.paged_cache import blocks_for, decode_split


def test_blocks_for_rounds_up():
    assert [blocks_for(tokens, 64) for tokens in (1, 64, 65, 1152)] == [1, 1, 2, 18]


def test_decode_split_by_batch_and_table_width():
    # (split_blocks, spread): 1,024 positions are 16 blocks of 64; 256 programs over rows x 2 KV heads
    assert decode_split(256, 2, 18, 64, 1024) == (16, 1)  # 512 row-heads fill the GPU
    assert decode_split(64, 2, 18, 64, 1024) == (16, 2)
    assert decode_split(16, 2, 18, 64, 1024) == (16, 8)
    assert decode_split(1, 2, 18, 64, 1024) == (16, 128)
    # a table of 379 blocks: at most 16 runs per row, so runs of ceil(379 / 16) = 24 blocks
    assert decode_split(256, 2, 379, 64, 1024) == (24, 1)
    assert decode_split(16, 2, 379, 64, 1024) == (24, 8)
