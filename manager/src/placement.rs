//! Replica placement: which storage nodes hold each chunk.
//!
//! Pure and deterministic — no I/O, no clock, no entropy — because the Raft leader runs it and
//! replicates the result, and tests must replay it. The only pseudo-randomness is a SplitMix64
//! stream seeded from the sorted ids of the nodes being placed on; it is implemented here rather
//! than taken from `rand` so that an upgrade of a dependency can never change a placement.
//!
//! # Invariants
//! - A replica set never names a node twice and never uses a failure domain twice. A node whose
//!   zone is `""` is its own domain; nodes sharing a non-empty zone share one. When the nodes that
//!   can take data span fewer domains than there are replicas, placement fails with the numbers;
//!   it never co-locates.
//! - Only *usable* nodes receive replicas: `placeable`, non-zero `capacity`, and `free` of at
//!   least one chunk.
//! - Every replica set that [`Placer::place`] hands out is one of [`Placer::copysets`].
//!
//! # Balance
//! The aim is equal `allocated / capacity` on every node. A domain can hold at most one replica
//! of a chunk, so a domain holding more than `1/replicas` of the capacity cannot be filled as far
//! as the others: its share is capped at one replica per chunk and the rest is spread over the
//! other domains in proportion to capacity ("water-filling"). Each node's *weight* is the capacity
//! its share entitles it to — its capacity unless its domain is capped — and placement balances
//! `allocated / weight`, the *fill*. Each chunk greedily takes the copyset minimising, in order,
//! the largest resulting fill of its members, the sum of their resulting fills, and the copyset's
//! index. `allocated` is updated as chunks are placed, so one large volume spreads out and
//! successive calls on one `Placer` keep balancing.
//!
//! # Copysets
//! Copyset replication (Cidon et al., USENIX ATC 2013) bounds the number of distinct replica sets,
//! and with it the chance that losing any `replicas` nodes loses data. With `n` usable nodes and
//! scatter width `s` (capped at `n - 1`), each node is given `p = ceil(s / (replicas - 1))`
//! *tokens*, scaled by its weight against the median node's (at least 1, at most `8 p`), so big
//! nodes sit in more copysets and can take more. Round `r` shuffles the nodes holding more than
//! `r` tokens with the seeded stream and cuts the shuffle into groups of `replicas`. Each slot of
//! a group is filled by swapping in the ungrouped element whose domain is not yet in the group and
//! has the most ungrouped elements left, ties going to the earliest in the shuffle — for
//! unlabelled, equal nodes this is exactly the plain cut. Elements that cannot complete a group
//! (too few left, or too few domains left) are carried to the front of the next round; whatever
//! remains after the last round is dropped, except that a node in no copyset at all is then given
//! one with the partners of other domains that hold the fewest copysets for their tokens.
//! Duplicate groups are kept once.
//!
//! Rounded token counts, leftovers and capped domains can leave a family of copysets in which no
//! mix of copysets fills every node equally. So, unless all nodes have the same weight and the
//! same number of copysets (then using every copyset equally is exactly balanced), the greedy is
//! simulated on empty nodes; the nodes it leaves more than 3 % below the fullest are grouped with
//! each other, emptiest first and in distinct domains, topped up with the emptiest other nodes,
//! into extra copysets, and the simulation is run again, at most 8 times. This is what lets big
//! nodes take more.
//!
//! The copysets are rebuilt, deterministically, whenever the set of usable nodes changes (for
//! instance because a chunk size leaves some node without room). Building costs O(n²) for the
//! grouping plus the simulations: measured in a release build, about 1 ms for 30 nodes of mixed
//! sizes, 0.1 s for 500 and 0.3 s for 2000. Each chunk then costs O(log copysets) amortised.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

/// Most replicas a chunk can have.
pub const MAX_REPLICAS: usize = 16;

/// Tokens of the biggest node are capped at this multiple of the base count, so one huge node
/// cannot multiply the number of copysets.
const MAX_TOKEN_FACTOR: usize = 8;

/// Copyset augmentation simulates placement until the node with the smallest share holds about
/// this many replicas…
const SIM_REPLICAS: f64 = 200.0;
/// …but of at most this many chunks per pass (bounds the cost on large clusters)…
const SIM_MAX_CHUNKS: usize = 200_000;
/// …at most this many passes…
const SIM_PASSES: usize = 8;
/// …and adds copysets for nodes filled less than this fraction below the fullest.
const SIM_TOLERANCE: f64 = 0.03;

/// A storage node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Storage node id.
    pub id: String,
    /// Failure domain label; `""` means unlabelled: the node is its own domain.
    pub zone: String,
    /// Bytes of raw capacity.
    pub capacity: u64,
    /// Bytes of volume space already placed on it (thin provisioning: `chunk_size` per replica).
    pub allocated: u64,
    /// Bytes free on its disks right now (soft state from heartbeats).
    pub free: u64,
    /// Up, not draining, and has a healthy disk that is not full.
    pub placeable: bool,
}

/// Why a placement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("invalid replica count {0}: it must be between 1 and {MAX_REPLICAS}")]
    InvalidReplicas(usize),
    #[error("node {0} is listed more than once")]
    DuplicateNode(String),
    #[error("invalid chunk size 0")]
    InvalidChunkSize,
    #[error(
        "{wanted} replicas need {wanted} placeable nodes, but only {placeable} nodes are \
         placeable (up, not draining, with a healthy disk and non-zero capacity)"
    )]
    NotEnoughNodes { wanted: usize, placeable: usize },
    #[error(
        "{wanted} replicas need {wanted} distinct failure domains, but the placeable nodes span \
         only {zones}"
    )]
    NotEnoughZones { wanted: usize, zones: usize },
    #[error(
        "{wanted} replicas need {wanted} nodes in distinct failure domains with {chunk_size} \
         bytes free, but only {nodes} placeable nodes in {zones} domains have that much room"
    )]
    NoCapacity {
        wanted: usize,
        nodes: usize,
        zones: usize,
        chunk_size: u64,
    },
    #[error("node {lost} is not in the replica set {current:?}")]
    LostNotInSet { lost: String, current: Vec<String> },
    #[error(
        "no replacement for {lost}: {outside} placeable nodes with {chunk_size} bytes free are \
         outside the replica set, and none is in a failure domain that its {survivors} surviving \
         replicas leave free"
    )]
    NoReplacement {
        lost: String,
        outside: usize,
        survivors: usize,
        chunk_size: u64,
    },
}

/// Places chunk replicas on a fixed list of nodes; owns the copysets and its own view of
/// `allocated`. Build one from the manager's state, use it, drop it.
#[derive(Debug, Clone)]
pub struct Placer {
    /// Sorted by id; `allocated` is updated by [`Placer::place`] and [`Placer::replace`].
    nodes: Vec<Candidate>,
    /// Failure domain of each node (index into `nodes`).
    domain: Vec<usize>,
    replicas: usize,
    scatter_width: usize,
    layout: Layout,
}

/// Copysets and weights for one set of usable nodes.
#[derive(Debug, Clone, Default)]
struct Layout {
    /// Indices of the usable nodes the layout was built for, ascending.
    usable: Vec<usize>,
    /// Balance weight per node (0 for nodes outside `usable`).
    weight: Vec<f64>,
    /// Copysets as ascending node indices.
    sets: Vec<Vec<usize>>,
    /// The same, as node ids.
    names: Vec<Vec<String>>,
}

impl Placer {
    /// Builds a placer over `nodes` for `replicas` copies of each chunk. `scatter_width`: each
    /// node shares copysets with about this many other nodes (more for nodes bigger than the
    /// median). Only the replica count and duplicate ids are refused here; a cluster too small or
    /// too full is reported by [`Placer::place`], so that [`Placer::replace`] still works while
    /// the cluster is degraded.
    pub fn new(
        mut nodes: Vec<Candidate>,
        replicas: usize,
        scatter_width: usize,
    ) -> Result<Placer, PlacementError> {
        if !(1..=MAX_REPLICAS).contains(&replicas) {
            return Err(PlacementError::InvalidReplicas(replicas));
        }
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(w) = nodes.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(PlacementError::DuplicateNode(w[0].id.clone()));
        }
        let mut zones: HashMap<&str, usize> = HashMap::new();
        let mut domain = Vec::with_capacity(nodes.len());
        let mut next = 0;
        for node in &nodes {
            let d = if node.zone.is_empty() {
                next += 1;
                next - 1
            } else {
                *zones.entry(&node.zone).or_insert_with(|| {
                    next += 1;
                    next - 1
                })
            };
            domain.push(d);
        }
        let mut placer = Placer {
            nodes,
            domain,
            replicas,
            scatter_width,
            layout: Layout::default(),
        };
        // Before any chunk size is known, a node needs some free space to be usable.
        placer.ensure_layout(1);
        Ok(placer)
    }

    /// Places `chunks` chunks of `chunk_size` bytes: one replica set (node ids, in no meaningful
    /// order) per chunk. All or nothing: on error nothing is placed.
    pub fn place(
        &mut self,
        chunks: u64,
        chunk_size: u64,
    ) -> Result<Vec<Vec<String>>, PlacementError> {
        if chunk_size == 0 {
            return Err(PlacementError::InvalidChunkSize);
        }
        self.check_feasible(chunk_size)?;
        self.ensure_layout(chunk_size);
        let mut out = Vec::with_capacity(chunks.min(1 << 16) as usize);
        let Layout {
            sets,
            names,
            weight,
            ..
        } = &self.layout;
        let nodes = &mut self.nodes;
        // Rotates the tie-break between Placers: the number of chunks placed so far, roughly.
        let placed = nodes.iter().map(|n| n.allocated / chunk_size).sum::<u64>();
        let mut greedy = Greedy::new(sets, |i| nodes[i].allocated, weight, chunk_size, placed);
        for _ in 0..chunks {
            let best = greedy.take(sets, |i| nodes[i].allocated, weight, chunk_size);
            for &i in &sets[best] {
                nodes[i].allocated = nodes[i].allocated.saturating_add(chunk_size);
            }
            greedy.put(sets, |i| nodes[i].allocated, weight, chunk_size, best);
            out.push(names[best].clone());
        }
        Ok(out)
    }

    /// One replacement for `lost` in the replica set `current` (which still lists `lost`): a
    /// usable node outside `current`, in a failure domain none of the survivors uses — always
    /// required, since an unlabelled node is a domain of its own, so this never co-locates. Among
    /// those, the one with the lowest resulting fill, unless a candidate that keeps the new set
    /// inside one copyset is no fuller than the average usable node. Moves `chunk_size` of
    /// `allocated` from `lost` (if known) to the chosen node.
    pub fn replace(
        &mut self,
        current: &[String],
        lost: &str,
        chunk_size: u64,
    ) -> Result<String, PlacementError> {
        if chunk_size == 0 {
            return Err(PlacementError::InvalidChunkSize);
        }
        // An empty `lost` asks for one more replica (a chunk short of its count).
        if !lost.is_empty() && !current.iter().any(|id| id == lost) {
            return Err(PlacementError::LostNotInSet {
                lost: lost.to_owned(),
                current: current.to_vec(),
            });
        }
        self.ensure_layout(chunk_size);
        let survivors: Vec<&String> = current.iter().filter(|id| *id != lost).collect();
        let survivor_idx: Vec<Option<usize>> = survivors.iter().map(|id| self.index(id)).collect();
        let taken: HashSet<usize> = survivor_idx
            .iter()
            .flatten()
            .map(|&i| self.domain[i])
            .collect();
        let in_current = |i: usize| current.iter().any(|id| *id == self.nodes[i].id);
        let outside: Vec<usize> = self
            .layout
            .usable
            .iter()
            .copied()
            .filter(|&i| !in_current(i))
            .collect();
        let eligible: Vec<usize> = outside
            .iter()
            .copied()
            .filter(|&i| !taken.contains(&self.domain[i]))
            .collect();
        let fill_after = |i: usize| self.fill(i, chunk_size);
        let by_fill =
            |&a: &usize, &b: &usize| fill_after(a).total_cmp(&fill_after(b)).then(a.cmp(&b));
        let Some(least) = eligible.iter().copied().min_by(by_fill) else {
            return Err(PlacementError::NoReplacement {
                lost: lost.to_owned(),
                outside: outside.len(),
                survivors: survivors.len(),
                chunk_size,
            });
        };
        // Candidates that complete a copyset holding every survivor.
        let mut in_copyset: Vec<usize> = Vec::new();
        if survivor_idx.iter().all(Option::is_some) {
            let surv: Vec<usize> = survivor_idx.iter().flatten().copied().collect();
            for set in &self.layout.sets {
                if surv.iter().all(|s| set.contains(s)) {
                    in_copyset.extend(set.iter().filter(|&&i| eligible.contains(&i)));
                }
            }
        }
        let usable = &self.layout.usable;
        let mean = usable.iter().map(|&i| self.fill(i, 0)).sum::<f64>() / usable.len() as f64;
        let chosen = match in_copyset.iter().copied().min_by(by_fill) {
            Some(c) if self.fill(c, 0) <= mean => c,
            _ => least,
        };
        let node = &mut self.nodes[chosen];
        node.allocated = node.allocated.saturating_add(chunk_size);
        if let Some(l) = self.index(lost) {
            let node = &mut self.nodes[l];
            node.allocated = node.allocated.saturating_sub(chunk_size);
        }
        Ok(self.nodes[chosen].id.clone())
    }

    /// The copysets for the nodes usable at the last call (at first: placeable nodes with
    /// capacity and some free space). Members are sorted by id.
    pub fn copysets(&self) -> &[Vec<String>] {
        &self.layout.names
    }

    /// This placer's view of the nodes, sorted by id, `allocated` included.
    pub fn nodes(&self) -> &[Candidate] {
        &self.nodes
    }

    /// Replicas per chunk.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    fn index(&self, id: &str) -> Option<usize> {
        self.nodes.binary_search_by(|n| n.id.as_str().cmp(id)).ok()
    }

    /// Fill of node `i` after `extra` more bytes.
    fn fill(&self, i: usize, extra: u64) -> f64 {
        self.nodes[i].allocated.saturating_add(extra) as f64 / self.layout.weight[i]
    }

    fn placeable(&self, i: usize) -> bool {
        self.nodes[i].placeable && self.nodes[i].capacity > 0
    }

    fn usable(&self, chunk_size: u64) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.placeable(i) && self.nodes[i].free >= chunk_size)
            .collect()
    }

    fn domains(&self, nodes: impl Iterator<Item = usize>) -> usize {
        nodes.map(|i| self.domain[i]).collect::<HashSet<_>>().len()
    }

    fn check_feasible(&self, chunk_size: u64) -> Result<(), PlacementError> {
        let wanted = self.replicas;
        let placeable: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.placeable(i))
            .collect();
        if placeable.len() < wanted {
            return Err(PlacementError::NotEnoughNodes {
                wanted,
                placeable: placeable.len(),
            });
        }
        let zones = self.domains(placeable.iter().copied());
        if zones < wanted {
            return Err(PlacementError::NotEnoughZones { wanted, zones });
        }
        let usable = self.usable(chunk_size);
        let zones = self.domains(usable.iter().copied());
        if usable.len() < wanted || zones < wanted {
            return Err(PlacementError::NoCapacity {
                wanted,
                nodes: usable.len(),
                zones,
                chunk_size,
            });
        }
        Ok(())
    }

    /// Rebuilds weights and copysets if the usable nodes for `chunk_size` changed.
    fn ensure_layout(&mut self, chunk_size: u64) {
        let usable = self.usable(chunk_size);
        if usable == self.layout.usable && !self.layout.weight.is_empty() {
            return;
        }
        let weight = self.weights(&usable);
        let sets = if self.domains(usable.iter().copied()) < self.replicas {
            Vec::new()
        } else if self.replicas == 1 {
            usable.iter().map(|&i| vec![i]).collect()
        } else {
            self.build_copysets(&usable, &weight)
        };
        let names = sets
            .iter()
            .map(|s| s.iter().map(|&i| self.nodes[i].id.clone()).collect())
            .collect();
        self.layout = Layout {
            usable,
            weight,
            sets,
            names,
        };
    }

    /// Balance weight of each usable node: the capacity its share of replicas entitles it to,
    /// after capping each domain at one replica per chunk (water-filling).
    fn weights(&self, usable: &[usize]) -> Vec<f64> {
        let mut weight = vec![0.0; self.nodes.len()];
        let mut dom_cap: BTreeMap<usize, f64> = BTreeMap::new();
        for &i in usable {
            *dom_cap.entry(self.domain[i]).or_default() += self.nodes[i].capacity as f64;
        }
        let r = self.replicas.min(dom_cap.len());
        if r == 0 {
            return weight;
        }
        let total: f64 = dom_cap.values().sum();
        // share[d]: replicas per chunk that domain d holds.
        let mut share: BTreeMap<usize, f64> = BTreeMap::new();
        let mut left = r as f64;
        loop {
            let open: f64 = dom_cap
                .iter()
                .filter(|(d, _)| !share.contains_key(d))
                .map(|(_, c)| c)
                .sum();
            let lambda = left / open;
            let capped: Vec<usize> = dom_cap
                .iter()
                .filter(|(d, c)| !share.contains_key(d) && lambda * **c >= 1.0)
                .map(|(d, _)| *d)
                .collect();
            if capped.is_empty() {
                for (d, c) in &dom_cap {
                    share.entry(*d).or_insert(lambda * c);
                }
                break;
            }
            for d in capped {
                share.insert(d, 1.0);
                left -= 1.0;
            }
            if share.len() == dom_cap.len() {
                break;
            }
        }
        for &i in usable {
            let d = self.domain[i];
            let node_share = share[&d] * self.nodes[i].capacity as f64 / dom_cap[&d];
            // Never 0 for a usable node, so that fills stay comparable numbers.
            weight[i] = (node_share * total / r as f64).max(f64::MIN_POSITIVE);
        }
        weight
    }

    fn build_copysets(&self, usable: &[usize], weight: &[f64]) -> Vec<Vec<usize>> {
        let r = self.replicas;
        let scatter = self.scatter_width.min(usable.len() - 1).max(r - 1);
        let base = scatter.div_ceil(r - 1);
        let mut sorted: Vec<f64> = usable.iter().map(|&i| weight[i]).collect();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[(sorted.len() - 1) / 2];
        let tokens: Vec<usize> = (0..self.nodes.len())
            .map(|i| {
                if weight[i] <= 0.0 {
                    0
                } else {
                    let t = (base as f64 * weight[i] / median).round() as usize;
                    t.clamp(1, MAX_TOKEN_FACTOR * base)
                }
            })
            .collect();
        let rounds = usable.iter().map(|&i| tokens[i]).max().unwrap_or(0);

        let mut rng = SplitMix64::new(self.seed(usable));
        let mut seen: HashSet<Vec<usize>> = HashSet::new();
        let mut sets: Vec<Vec<usize>> = Vec::new();
        let mut carry: Vec<usize> = Vec::new();
        for round in 0..rounds {
            let mut shuffled: Vec<usize> = usable
                .iter()
                .copied()
                .filter(|&i| tokens[i] > round)
                .collect();
            rng.shuffle(&mut shuffled);
            let mut list = std::mem::take(&mut carry);
            list.extend(shuffled);
            let (groups, rest) = group(&list, &self.domain, r);
            for mut g in groups {
                g.sort_unstable();
                if seen.insert(g.clone()) {
                    sets.push(g);
                }
            }
            carry = rest;
        }

        // Cover nodes left in no copyset with the least-used partners of other domains.
        let mut member = vec![0usize; self.nodes.len()];
        for s in &sets {
            for &i in s {
                member[i] += 1;
            }
        }
        for &u in usable {
            if member[u] > 0 {
                continue;
            }
            let mut g = vec![u];
            while g.len() < r {
                let next = usable
                    .iter()
                    .copied()
                    .filter(|&i| g.iter().all(|&j| self.domain[j] != self.domain[i]))
                    .min_by(|&a, &b| {
                        // member[a] / tokens[a] < member[b] / tokens[b], exactly.
                        (member[a] * tokens[b])
                            .cmp(&(member[b] * tokens[a]))
                            .then(a.cmp(&b))
                    })
                    .expect("usable nodes span at least `replicas` domains");
                g.push(next);
            }
            g.sort_unstable();
            for &i in &g {
                member[i] += 1;
            }
            seen.insert(g.clone());
            sets.push(g);
        }

        let uniform = usable
            .iter()
            .all(|&i| weight[i] == weight[usable[0]] && member[i] == member[usable[0]]);
        if !uniform {
            self.augment(usable, weight, &mut sets, &mut seen);
        }
        sets
    }

    /// Adds copysets until the greedy, simulated on empty nodes, fills every usable node to
    /// within [`SIM_TOLERANCE`] of the fullest. Each pass groups the under-filled nodes, emptiest
    /// first, with each other (distinct domains) and tops groups up with the emptiest other nodes.
    /// Uniform layouts (equal weights, equal copyset counts) are balanced by construction and skip
    /// this.
    fn augment(
        &self,
        usable: &[usize],
        weight: &[f64],
        sets: &mut Vec<Vec<usize>>,
        seen: &mut HashSet<Vec<usize>>,
    ) {
        let r = self.replicas;
        let total: f64 = usable.iter().map(|&i| weight[i]).sum();
        let min_share = usable
            .iter()
            .map(|&i| weight[i] * r as f64 / total)
            .fold(f64::MAX, f64::min);
        for _ in 0..SIM_PASSES {
            let wanted = (SIM_REPLICAS / min_share).ceil() as usize;
            let chunks = wanted.min(SIM_MAX_CHUNKS);
            let mut count = vec![0u64; self.nodes.len()];
            let mut greedy = Greedy::new(sets, |i| count[i], weight, 1, 0);
            for _ in 0..chunks {
                let best = greedy.take(sets, |i| count[i], weight, 1);
                for &i in &sets[best] {
                    count[i] += 1;
                }
                greedy.put(sets, |i| count[i], weight, 1, best);
            }
            let fill = |i: usize| count[i] as f64 / weight[i];
            let by_fill = |a: &usize, b: &usize| fill(*a).total_cmp(&fill(*b)).then(a.cmp(b));
            let max = usable.iter().map(|&i| fill(i)).fold(0.0, f64::max);
            let mut under: Vec<usize> = usable
                .iter()
                .copied()
                .filter(|&i| fill(i) < max * (1.0 - SIM_TOLERANCE))
                .collect();
            if under.is_empty() {
                return;
            }
            under.sort_by(by_fill);
            let mut emptiest = usable.to_vec();
            emptiest.sort_by(by_fill);
            let mut grouped = vec![false; self.nodes.len()];
            let mut added = false;
            for &u in &under {
                if grouped[u] {
                    continue;
                }
                let mut g = vec![u];
                let others = under.iter().filter(|&&i| !grouped[i]).chain(&emptiest);
                for &c in others {
                    if g.len() == r {
                        break;
                    }
                    if g.iter().all(|&j| self.domain[j] != self.domain[c]) {
                        g.push(c);
                    }
                }
                for &i in &g {
                    grouped[i] = true;
                }
                g.sort_unstable();
                if seen.insert(g.clone()) {
                    sets.push(g);
                    added = true;
                }
            }
            if !added {
                return;
            }
        }
    }

    /// FNV-1a over the sorted ids of the usable nodes.
    fn seed(&self, usable: &[usize]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &i in usable {
            for b in self.nodes[i].id.bytes().chain([0xff]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }
}

/// Cuts `list` (node indices, possibly with repeats) into groups of `r` with distinct domains.
/// Each slot takes, by swapping it into place, the ungrouped element whose domain is not yet in
/// the group and has the most ungrouped elements, ties to the earliest. Returns the groups and the
/// elements that could not complete one.
fn group(list: &[usize], domain: &[usize], r: usize) -> (Vec<Vec<usize>>, Vec<usize>) {
    let mut list = list.to_vec();
    let mut left: HashMap<usize, usize> = HashMap::new();
    for &i in &list {
        *left.entry(domain[i]).or_default() += 1;
    }
    let mut groups = Vec::new();
    let mut start = 0;
    'groups: while list.len() - start >= r {
        let mut used: Vec<usize> = Vec::with_capacity(r);
        for pos in start..start + r {
            let mut best: Option<(usize, usize)> = None;
            for (k, &i) in list.iter().enumerate().skip(pos) {
                let d = domain[i];
                if used.contains(&d) {
                    continue;
                }
                if best.is_none_or(|(n, _)| left[&d] > n) {
                    best = Some((left[&d], k));
                }
            }
            let Some((_, k)) = best else {
                // Everything left is in the group's domains: no further group is possible.
                break 'groups;
            };
            list.swap(pos, k);
            let d = domain[list[pos]];
            used.push(d);
            *left.get_mut(&d).expect("counted") -= 1;
        }
        groups.push(list[start..start + r].to_vec());
        start += r;
    }
    (groups, list.split_off(start))
}

/// Greedy choice of copysets: each pick is the copyset minimising, in order, the largest resulting
/// fill `(alloc + extra) / weight` of its members, the sum of their resulting fills, how often
/// this `Greedy` has picked it, and its index rotated by `offset` — exactly what a scan of every
/// copyset would pick. The last two spread equally good picks over all copysets (otherwise, with
/// equal nodes, the first permutation's groups alone would balance and take everything, halving
/// the scatter width); the caller derives `offset` from the state so that successive `Placer`s
/// start at different copysets.
///
/// Keys only grow while one `Greedy` is in use, so the heap holds a lower bound of each copyset's
/// key, and an entry whose key is still current when it reaches the top is the minimum (lazy
/// re-evaluation): a pick costs about `log(copysets)` per copyset whose members changed since it
/// was last looked at.
struct Greedy {
    heap: BinaryHeap<Entry>,
    uses: Vec<u64>,
    offset: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    max: f64,
    sum: f64,
    uses: u64,
    order: usize,
    set: usize,
}

impl Ord for Entry {
    /// Reversed, so that `BinaryHeap` pops the smallest key.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .max
            .total_cmp(&self.max)
            .then(other.sum.total_cmp(&self.sum))
            .then(other.uses.cmp(&self.uses))
            .then(other.order.cmp(&self.order))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Entry {}

impl Greedy {
    fn new(
        sets: &[Vec<usize>],
        alloc: impl Fn(usize) -> u64,
        weight: &[f64],
        extra: u64,
        offset: u64,
    ) -> Self {
        let mut greedy = Greedy {
            heap: BinaryHeap::with_capacity(sets.len()),
            uses: vec![0; sets.len()],
            offset: (offset % sets.len() as u64) as usize,
        };
        for k in 0..sets.len() {
            let entry = greedy.entry(sets, &alloc, weight, extra, k);
            greedy.heap.push(entry);
        }
        greedy
    }

    fn entry(
        &self,
        sets: &[Vec<usize>],
        alloc: impl Fn(usize) -> u64,
        weight: &[f64],
        extra: u64,
        set: usize,
    ) -> Entry {
        let mut max = f64::MIN;
        let mut sum = 0.0;
        for &i in &sets[set] {
            let f = alloc(i).saturating_add(extra) as f64 / weight[i];
            max = max.max(f);
            sum += f;
        }
        let n = sets.len();
        Entry {
            max,
            sum,
            uses: self.uses[set],
            order: (set + n - self.offset) % n,
            set,
        }
    }

    /// Takes the best copyset out; the caller updates `alloc` and hands it back with
    /// [`Greedy::put`].
    fn take(
        &mut self,
        sets: &[Vec<usize>],
        alloc: impl Fn(usize) -> u64,
        weight: &[f64],
        extra: u64,
    ) -> usize {
        loop {
            let top = self.heap.pop().expect("at least one copyset");
            let now = self.entry(sets, &alloc, weight, extra, top.set);
            if now == top {
                self.uses[top.set] += 1;
                return top.set;
            }
            self.heap.push(now);
        }
    }

    fn put(
        &mut self,
        sets: &[Vec<usize>],
        alloc: impl Fn(usize) -> u64,
        weight: &[f64],
        extra: u64,
        set: usize,
    ) {
        let entry = self.entry(sets, alloc, weight, extra, set);
        self.heap.push(entry);
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and fixed forever.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (multiply-shift; the bias is below 2^-32 for any realistic `n`).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }

    /// Fisher–Yates.
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, zone: &str, capacity: u64) -> Candidate {
        Candidate {
            id: id.into(),
            zone: zone.into(),
            capacity,
            allocated: 0,
            free: capacity,
            placeable: true,
        }
    }

    #[test]
    fn group_repairs_domain_conflicts() {
        // Domains: 0,0,0,1,1,1,2,2,2 in an order where a plain cut would conflict.
        let domain = [0, 0, 0, 1, 1, 1, 2, 2, 2];
        let (groups, rest) = group(&[0, 1, 2, 3, 4, 5, 6, 7, 8], &domain, 3);
        assert!(rest.is_empty());
        assert_eq!(groups.len(), 3);
        for g in &groups {
            let d: HashSet<usize> = g.iter().map(|&i| domain[i]).collect();
            assert_eq!(d.len(), 3, "{g:?}");
        }
    }

    #[test]
    fn group_leaves_what_cannot_be_grouped() {
        let domain = [0, 0, 0, 0, 1];
        let (groups, rest) = group(&[0, 1, 2, 3, 4], &domain, 2);
        assert_eq!(groups.len(), 1);
        assert_eq!(rest.len(), 3);
        assert!(rest.iter().all(|&i| domain[i] == 0));
    }

    #[test]
    fn water_filling_caps_a_big_domain() {
        // Zone a holds half the capacity; with 3 replicas it can take only one per chunk.
        let nodes = vec![
            node("a1", "a", 300),
            node("b1", "", 100),
            node("c1", "", 100),
            node("d1", "", 100),
        ];
        let p = Placer::new(nodes, 3, 2).unwrap();
        let w = &p.layout.weight;
        // Shares: a = 1, b, c, d = 2/3 each; weight = share * 600 / 3.
        assert!((w[0] - 200.0).abs() < 1e-9, "{w:?}");
        assert!((w[1] - 400.0 / 3.0).abs() < 1e-9, "{w:?}");
    }

    #[test]
    fn splitmix_is_stable() {
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next(), 0xe220_a839_7b1d_cdaf);
    }
}
