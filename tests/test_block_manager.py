"""The KV block allocator: allocate, free, share read-only, prefix hashing (alpha included), LRU reclaiming."""

from __future__ import annotations

import pytest

from qwenlm.engine.block_manager import BlockAllocator, NoFreeBlocks, block_hashes, chain_hash


def test_allocate_and_free_count_blocks_and_refuse_overdraft():
    allocator = BlockAllocator(4)
    a = allocator.allocate(3)
    assert len(set(a)) == 3 and allocator.num_free == 1 and allocator.num_used == 3
    with pytest.raises(NoFreeBlocks, match="asked for 2 KV blocks, 1 free"):
        allocator.allocate(2)
    assert allocator.num_free == 1  # a refused allocation takes nothing
    allocator.free(a)
    assert allocator.num_free == 4 and allocator.num_used == 0
    with pytest.raises(RuntimeError, match="freed more often"):
        allocator.free([a[0]])
    allocator.check()


def test_hashes_chain_over_the_prefix_and_include_the_ntk_alpha():
    tokens = list(range(40))
    hashes = block_hashes(tokens, 16, 1.0)
    assert len(hashes) == 2  # only full blocks
    assert hashes[1] == chain_hash(hashes[0], tokens[16:32], 1.0)
    other = block_hashes([99] + tokens[1:], 16, 1.0)
    assert other[0] != hashes[0] and other[1] != hashes[1]  # same block 1 tokens, different prefix
    assert block_hashes(tokens, 16, 7.0)[0] != hashes[0]  # keys rotated under another alpha are other keys
    assert block_hashes(tokens + [5] * 8, 16, 1.0, known=hashes[:1]) == block_hashes(tokens + [5] * 8, 16, 1.0)


def test_shared_blocks_are_counted_once_and_stay_cached_until_reclaimed():
    allocator = BlockAllocator(4)
    hashes = block_hashes(list(range(32)), 16, 1.0)
    first = allocator.allocate(3)
    for block, h in zip(first, hashes, strict=False):
        allocator.register(block, h)
    assert allocator.lookup(hashes) == first[:2]
    allocator.share(first[:2])  # a second request with the same prefix
    assert allocator.num_used == 3 and allocator.refs[first[0]] == 2
    allocator.free(first)  # the first request ends: its prefix blocks are still held by the second
    assert allocator.num_used == 2 and allocator.num_free == 2
    allocator.free(first[:2])  # the second ends too: cached, unheld, reclaimable
    assert allocator.num_used == 0 and allocator.num_free == 4 and allocator.lookup(hashes) == first[:2]
    allocator.check()


def test_reclaiming_takes_free_blocks_first_then_the_least_recently_used_cached_ones():
    allocator = BlockAllocator(3)
    old, new = block_hashes(list(range(16)), 16, 1.0)[0], block_hashes(list(range(1, 17)), 16, 1.0)[0]
    a, b = allocator.allocate(2)
    allocator.register(a, old)
    allocator.register(b, new)
    allocator.free([a])
    allocator.free([b])  # a became unheld first: it is the least recently used
    (c,) = allocator.allocate(1)
    assert c not in (a, b) and allocator.lookup([old]) == [a]  # the never-registered block went first
    (d,) = allocator.allocate(1)
    assert d == a and allocator.lookup([old]) == [] and allocator.lookup([new]) == [b]
    allocator.check()


def test_the_same_content_registered_twice_keeps_the_first_block():
    allocator = BlockAllocator(2)
    h = chain_hash(None, [1] * 16, 1.0)
    a, b = allocator.allocate(2)
    allocator.register(a, h)
    allocator.register(b, h)  # computed concurrently by another request: stays private
    allocator.free([a, b])
    assert allocator.lookup([h]) == [a] and list(allocator.free_ids) == [b]
    allocator.reset_prefix_cache()
    assert allocator.lookup([h]) == [] and allocator.num_free == 2
    allocator.check()


def test_prefix_caching_off_finds_and_keeps_nothing():
    allocator = BlockAllocator(2, enable_prefix_caching=False)
    h = chain_hash(None, [1] * 16, 1.0)
    (a,) = allocator.allocate(1)
    allocator.register(a, h)
    allocator.free([a])
    assert allocator.lookup([h]) == [] and len(allocator.free_ids) == 2
