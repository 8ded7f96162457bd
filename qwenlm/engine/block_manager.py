"""KV blocks: which sequence holds which block of the paged cache, and the prefix cache over full blocks.

Pure bookkeeping, no tensors (the pools live in `qwenlm.model.paged_kv_cache`). A block is free, used (held by
one or more sequences: shared prefix blocks are read-only), or cached (no holder, but its contents are still
valid for the token prefix it is registered under, and reclaimed least recently used first).

    allocator = BlockAllocator(num_blocks=1024)
    hashes = block_hashes(prompt_ids, block_size=16, alpha=1.0)   # one per full block, chained
    hits = allocator.lookup(hashes)                                # cached blocks of the longest matching prefix
    allocator.share(hits); table = hits + allocator.allocate(3)
    allocator.register(table[5], hashes[5])                        # once block 5's K/V are computed
    allocator.free(table)                                          # the request ended
"""

from __future__ import annotations

import collections
import hashlib
import struct
from array import array
from collections.abc import Iterable, Sequence


class NoFreeBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for (the scheduler checks first, so this is a bug if seen)."""


def chain_hash(parent: bytes | None, tokens: Sequence[int], alpha: float) -> bytes:
    """The identity of a full block: its tokens, everything before them (the parent block's hash) and the NTK
    alpha its keys were rotated with (a prompt's length fixes it, and keys are cached after RoPE, so the same
    tokens under another alpha are other keys). SHA-256, so that no request can forge another's prefix."""
    h = hashlib.sha256(parent or b"")
    h.update(struct.pack("<d", alpha))
    h.update(array("q", tokens).tobytes())
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int, alpha: float, known: Sequence[bytes] = ()) -> list[bytes]:
    """Hashes of every full block of `token_ids`, extending `known` (hashes of its first blocks, already made)."""
    hashes = list(known)
    for i in range(len(hashes), len(token_ids) // block_size):
        hashes.append(
            chain_hash(hashes[-1] if hashes else None, token_ids[i * block_size : (i + 1) * block_size], alpha)
        )
    return hashes


class BlockAllocator:
    """Reference-counted blocks with a prefix cache (hash -> block) and LRU reclaiming of unreferenced ones."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.refs = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.free_ids: collections.deque[int] = collections.deque(range(num_blocks))  # hold nothing reusable
        self.cached: dict[bytes, int] = {}  # registered blocks, held or not
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unheld: LRU first

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones plus cached ones nobody holds."""
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.num_free

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (reference count 1): free ones first, then the least recently used cached ones."""
        if n > self.num_free:
            raise NoFreeBlocks(f"asked for {n} KV blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self.free_ids:
                block = self.free_ids.popleft()
            else:
                block, _ = self.evictable.popitem(last=False)
                del self.cached[self.hash_of[block]]
                self.hash_of[block] = None
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block. Unheld registered blocks stay cached, the sequence's last blocks
        queued for reclaiming first (a later request is least likely to share a long tail)."""
        for block in reversed(list(blocks)):
            if self.refs[block] <= 0:
                raise RuntimeError(f"KV block {block} freed more often than it was allocated")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.hash_of[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free_ids.append(block)

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (no references taken)."""
        hits: list[int] = []
        if self.enable_prefix_caching:
            for h in hashes:
                block = self.cached.get(h)
                if block is None:
                    break
                hits.append(block)
        return hits

    def num_reclaimable(self, blocks: Iterable[int]) -> int:
        """How many of `blocks` are unheld cached ones (sharing them takes them out of the free count)."""
        return sum(1 for b in blocks if self.refs[b] == 0)

    def share(self, blocks: Iterable[int]) -> None:
        """Take a reference to cached blocks (found by `lookup`) for one more sequence."""
        for block in blocks:
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1

    def register(self, block: int, block_hash: bytes) -> None:
        """Block `block` (held) now holds the full, computed block `block_hash`: later prompts may share it.
        If another block already holds that content, this one stays private (and is freed normally)."""
        if self.enable_prefix_caching and self.hash_of[block] is None and block_hash not in self.cached:
            self.cached[block_hash] = block
            self.hash_of[block] = block_hash

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (held blocks keep their contents, unheld ones become free)."""
        for block in list(self.evictable):
            self.free_ids.append(block)
        self.evictable.clear()
        self.cached.clear()
        self.hash_of = [None] * self.num_blocks

    def check(self) -> None:
        """Assert the bookkeeping is consistent (tests, leak checks): every block is exactly one of free,
        cached-unheld or held, and the prefix map and the block hashes agree."""
        free, evictable = set(self.free_ids), set(self.evictable)
        assert len(free) == len(self.free_ids) and not free & evictable, "a block is listed twice"
        for block in range(self.num_blocks):
            held = self.refs[block] > 0
            assert held + (block in free) + (block in evictable) == 1, f"block {block} is not in exactly one state"
            assert (block in evictable) <= (self.hash_of[block] is not None), f"unregistered block {block} is cached"
            assert (block in free) <= (self.hash_of[block] is None), f"free block {block} is still registered"
        assert all(self.hash_of[b] == h for h, b in self.cached.items()), "prefix map and block hashes disagree"
