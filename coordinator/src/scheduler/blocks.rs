//! Paged-KV block allocator with a prefix cache.
//!
//! Every block is in exactly one of three states:
//! * **used**: `ref_count > 0`, held through that many [`BlockLease`]s;
//! * **cached**: `ref_count == 0` with a registered content hash: reusable by a prefix-cache hit,
//!   evictable (least recently released first) when a fresh block is needed;
//! * **free**: `ref_count == 0`, no hash.
//!
//! Lease discipline: a [`BlockLease`] is neither `Clone` nor `Copy`, only this module creates one
//! ([`BlockManager::allocate`], [`BlockManager::share`]) and only [`BlockManager::release`]
//! consumes one, so a block's `ref_count` always equals the number of leases outstanding for it.

use std::collections::{BTreeSet, HashMap};

use super::hash::BlockHash;

/// Index of one KV block in every rank's cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(u32);

impl BlockId {
    /// The id as it travels in a block table.
    pub fn get(self) -> u32 {
        self.0
    }

    fn index(self) -> usize {
        self.0 as usize
    }
}

/// One reference to one block, owned by one sequence. Give it back with
/// [`BlockManager::release`]; dropping it leaks the reference.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a block lease must be released to the BlockManager"]
pub(super) struct BlockLease(BlockId);

impl BlockLease {
    /// The leased block.
    pub(super) fn id(&self) -> BlockId {
        self.0
    }
}

/// The allocator and prefix cache.
#[derive(Debug)]
pub(super) struct BlockManager {
    ref_count: Vec<u32>,
    hash: Vec<Option<BlockHash>>,
    /// Release tick of each cached block (key into `evictable`).
    released_at: Vec<u64>,
    /// Free blocks without a hash; popped from the end (lowest ids first initially).
    free: Vec<BlockId>,
    /// Hash → block, for every block with a hash (used or cached).
    by_hash: HashMap<BlockHash, BlockId>,
    /// Cached blocks (hash, `ref_count == 0`) by release tick: the first is evicted first.
    evictable: BTreeSet<(u64, BlockId)>,
    tick: u64,
    /// Bumped whenever the set of hashed blocks changes (a registration or an eviction).
    version: u64,
}

impl BlockManager {
    /// `num_blocks` free blocks (`num_blocks` fits in `u32`, checked by the config).
    pub(super) fn new(num_blocks: usize) -> Self {
        let top = u32::try_from(num_blocks).unwrap_or(u32::MAX);
        Self {
            ref_count: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            released_at: vec![0; num_blocks],
            free: (0..top).rev().map(BlockId).collect(),
            by_hash: HashMap::new(),
            evictable: BTreeSet::new(),
            tick: 0,
            version: 0,
        }
    }

    /// All blocks.
    pub(super) fn total(&self) -> usize {
        self.ref_count.len()
    }

    /// Blocks neither held nor cached.
    pub(super) fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks held by nobody but cached (evictable).
    pub(super) fn num_cached(&self) -> usize {
        self.evictable.len()
    }

    /// Blocks held by at least one lease.
    pub(super) fn num_used(&self) -> usize {
        self.total() - self.num_free() - self.num_cached()
    }

    /// Blocks [`allocate`](Self::allocate) can still hand out (free + evictable).
    pub(super) fn num_available(&self) -> usize {
        self.num_free() + self.num_cached()
    }

    /// Whether `hash` names a cached or used block, and which.
    pub(super) fn lookup(&self, hash: &BlockHash) -> Option<BlockId> {
        self.by_hash.get(hash).copied()
    }

    /// Whether `id` is cached with nobody holding it (taking it shrinks `num_available`).
    pub(super) fn is_idle_cached(&self, id: BlockId) -> bool {
        self.ref_count[id.index()] == 0 && self.hash[id.index()].is_some()
    }

    /// Leases a fresh block: a free one, else the least recently released cached one (its hash is
    /// forgotten). `None` when every block is held.
    pub(super) fn allocate(&mut self) -> Option<BlockLease> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.evictable.pop_first()?;
                if let Some(h) = self.hash[id.index()].take() {
                    self.by_hash.remove(&h);
                    self.version += 1;
                }
                id
            }
        };
        debug_assert_eq!(self.ref_count[id.index()], 0);
        self.ref_count[id.index()] = 1;
        Some(BlockLease(id))
    }

    /// Leases the block whose content has hash `hash` (a prefix-cache hit), if any.
    pub(super) fn share(&mut self, hash: &BlockHash) -> Option<BlockLease> {
        let id = self.lookup(hash)?;
        let rc = &mut self.ref_count[id.index()];
        if *rc == 0 {
            self.evictable.remove(&(self.released_at[id.index()], id));
        }
        *rc += 1;
        Some(BlockLease(id))
    }

    /// Registers the content of a full, computed block. Returns false (and changes nothing) if the
    /// block already has a hash or another block already holds this content.
    pub(super) fn register(&mut self, lease: &BlockLease, hash: BlockHash) -> bool {
        let id = lease.id();
        if self.hash[id.index()].is_some() || self.by_hash.contains_key(&hash) {
            return false;
        }
        self.hash[id.index()] = Some(hash);
        self.by_hash.insert(hash, id);
        self.version += 1;
        true
    }

    /// Gives a lease back. The last lease of a block with a hash leaves it cached, otherwise free.
    pub(super) fn release(&mut self, lease: BlockLease) {
        let id = lease.id();
        let rc = &mut self.ref_count[id.index()];
        debug_assert!(*rc > 0, "{id:?} released more often than leased");
        *rc -= 1;
        if *rc > 0 {
            return;
        }
        if self.hash[id.index()].is_some() {
            self.tick += 1;
            self.released_at[id.index()] = self.tick;
            self.evictable.insert((self.tick, id));
        } else {
            self.free.push(id);
        }
    }

    /// Gives back a whole block table, last block first, so that the tail of a chain is evicted
    /// before its head (heads are the more widely shared prefixes).
    pub(super) fn release_all(&mut self, leases: &mut Vec<BlockLease>) {
        while let Some(lease) = leases.pop() {
            self.release(lease);
        }
    }

    /// Changes whenever a block gains or loses its hash.
    pub(super) fn version(&self) -> u64 {
        self.version
    }

    /// Hashes of at most `cap` hashed blocks: those held by a sequence first, then the cached ones
    /// from the most recently released. What a replica publishes for prefix-aware routing.
    pub(super) fn recent_hashes(&self, cap: usize) -> Vec<BlockHash> {
        let held = self
            .ref_count
            .iter()
            .zip(&self.hash)
            .filter_map(|(rc, h)| (*rc > 0).then_some(*h).flatten());
        let cached = self
            .evictable
            .iter()
            .rev()
            .filter_map(|(_, id)| self.hash[id.index()]);
        held.chain(cached).take(cap).collect()
    }

    /// `(ref_count, has_hash)` of every block, by id.
    pub(super) fn states(&self) -> impl Iterator<Item = (u32, bool)> + '_ {
        self.ref_count
            .iter()
            .zip(&self.hash)
            .map(|(rc, h)| (*rc, h.is_some()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> BlockHash {
        BlockHash([n; 32])
    }

    fn check_counts(m: &BlockManager) {
        let used = m.states().filter(|(rc, _)| *rc > 0).count();
        let cached = m.states().filter(|(rc, c)| *rc == 0 && *c).count();
        assert_eq!(m.num_used(), used);
        assert_eq!(m.num_cached(), cached);
        assert_eq!(used + cached + m.num_free(), m.total());
    }

    #[test]
    fn allocates_lowest_first_and_runs_dry() {
        let mut m = BlockManager::new(2);
        let a = m.allocate().unwrap();
        let b = m.allocate().unwrap();
        assert_eq!((a.id().get(), b.id().get()), (0, 1));
        assert!(m.allocate().is_none());
        check_counts(&m);
        m.release(a);
        m.release(b);
        assert_eq!(m.num_free(), 2);
        check_counts(&m);
    }

    #[test]
    fn hashed_blocks_stay_cached_and_are_shared() {
        let mut m = BlockManager::new(3);
        let a = m.allocate().unwrap();
        assert!(m.register(&a, h(1)));
        // The same content cannot be registered twice.
        let b = m.allocate().unwrap();
        assert!(!m.register(&b, h(1)));
        let s = m.share(&h(1)).unwrap();
        assert_eq!(s.id(), a.id());
        m.release(a);
        assert_eq!(m.num_cached(), 0, "still held by the sharer");
        m.release(s);
        m.release(b);
        assert_eq!((m.num_cached(), m.num_free()), (1, 2));
        check_counts(&m);
        // A hit on an idle cached block takes it out of the evictable set.
        let s = m.share(&h(1)).unwrap();
        assert_eq!((m.num_cached(), m.num_available()), (0, 2));
        m.release(s);
        check_counts(&m);
    }

    #[test]
    fn eviction_is_least_recently_released_first() {
        let mut m = BlockManager::new(2);
        let a = m.allocate().unwrap();
        let b = m.allocate().unwrap();
        m.register(&a, h(1));
        m.register(&b, h(2));
        let (ida, idb) = (a.id(), b.id());
        m.release(b);
        m.release(a);
        // b was released first: it goes first, and its hash with it.
        let c = m.allocate().unwrap();
        assert_eq!(c.id(), idb);
        assert!(m.lookup(&h(2)).is_none());
        assert_eq!(m.lookup(&h(1)), Some(ida));
        let d = m.allocate().unwrap();
        assert_eq!(d.id(), ida);
        assert!(m.lookup(&h(1)).is_none());
        assert!(m.allocate().is_none());
        m.release(c);
        m.release(d);
        assert_eq!(m.num_free(), 2);
        check_counts(&m);
    }

    #[test]
    fn recent_hashes_put_held_blocks_first_then_the_newest_cached() {
        let mut m = BlockManager::new(4);
        let v0 = m.version();
        let leases: Vec<_> = (0..4).map(|_| m.allocate().unwrap()).collect();
        for (i, l) in leases.iter().enumerate() {
            assert!(m.register(l, h(i as u8)));
        }
        assert_eq!(m.version(), v0 + 4);
        let mut it = leases.into_iter();
        let (a, b, c, d) = (
            it.next().unwrap(),
            it.next().unwrap(),
            it.next().unwrap(),
            it.next().unwrap(),
        );
        m.release(a); // oldest cached
        m.release(b); // newest cached
        assert_eq!(m.recent_hashes(10), [h(2), h(3), h(1), h(0)]);
        assert_eq!(m.recent_hashes(3), [h(2), h(3), h(1)]);
        // An eviction changes the version; a release does not.
        let v = m.version();
        m.release(c);
        assert_eq!(m.version(), v);
        let e = m.allocate().unwrap();
        assert_eq!(m.version(), v + 1);
        m.release(d);
        m.release(e);
        check_counts(&m);
    }

    #[test]
    fn release_all_frees_the_tail_first() {
        let mut m = BlockManager::new(3);
        let mut table: Vec<_> = (0..3).map(|_| m.allocate().unwrap()).collect();
        for (i, l) in table.iter().enumerate() {
            m.register(l, h(i as u8));
        }
        m.release_all(&mut table);
        assert!(table.is_empty());
        // The head block (id 0) must survive longest.
        assert_eq!(m.allocate().unwrap().id().get(), 2);
        assert_eq!(m.allocate().unwrap().id().get(), 1);
        assert_eq!(m.lookup(&h(0)), Some(BlockId(0)));
    }
}
