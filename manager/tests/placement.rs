//! Replica placement: domain rules, balance, copyset bounds, refusals, replacement, determinism.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ironsan_manager::placement::{Candidate, PlacementError, Placer};

const GIB: u64 = 1 << 30;
const CHUNK: u64 = 64 << 20;

/// SplitMix64, so the tests need no dependency and replay exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

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

/// `n` unlabelled nodes of `capacity`, ids n00, n01, …
fn flat(n: usize, capacity: u64) -> Vec<Candidate> {
    (0..n)
        .map(|i| node(&format!("n{i:02}"), "", capacity))
        .collect()
}

/// Nodes named `<zone><i>` for each (zone, count).
fn zoned(zones: &[(&str, usize)], capacity: u64) -> Vec<Candidate> {
    let mut nodes = Vec::new();
    for (zone, count) in zones {
        for i in 0..*count {
            nodes.push(node(&format!("{zone}{i}"), zone, capacity));
        }
    }
    nodes
}

fn zone_of(nodes: &[Candidate]) -> HashMap<String, String> {
    nodes
        .iter()
        .map(|n| (n.id.clone(), n.zone.clone()))
        .collect()
}

/// Asserts distinct nodes and, for labelled nodes, distinct zones.
fn assert_set_ok(set: &[String], zones: &HashMap<String, String>, replicas: usize) {
    assert_eq!(set.len(), replicas, "{set:?}");
    let ids: BTreeSet<&String> = set.iter().collect();
    assert_eq!(ids.len(), replicas, "repeated node in {set:?}");
    let labelled: Vec<&String> = set
        .iter()
        .map(|id| &zones[id])
        .filter(|z| !z.is_empty())
        .collect();
    let distinct: BTreeSet<&&String> = labelled.iter().collect();
    assert_eq!(distinct.len(), labelled.len(), "repeated zone in {set:?}");
}

/// Places `volumes` volumes of 1..=64 chunks each (seeded); returns every replica set.
fn place_volumes(placer: &mut Placer, volumes: usize, seed: u64) -> Vec<Vec<String>> {
    let mut rng = Rng(seed);
    let mut all = Vec::new();
    for _ in 0..volumes {
        let chunks = rng.range(1, 64);
        all.extend(placer.place(chunks, CHUNK).unwrap());
    }
    all
}

fn allocated(placer: &Placer) -> BTreeMap<String, u64> {
    placer
        .nodes()
        .iter()
        .map(|n| (n.id.clone(), n.allocated))
        .collect()
}

/// Largest relative deviation of `values` from `ideal`.
fn max_dev(values: impl IntoIterator<Item = f64>, ideal: f64) -> f64 {
    values
        .into_iter()
        .map(|v| (v - ideal).abs() / ideal)
        .fold(0.0, f64::max)
}

#[test]
fn replicas_on_distinct_nodes_and_zones() {
    let nodes = zoned(&[("a", 3), ("b", 3), ("c", 3)], 100 * GIB);
    let zones = zone_of(&nodes);
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    for set in placer.copysets() {
        assert_set_ok(set, &zones, 3);
    }
    let sets = place_volumes(&mut placer, 200, 1);
    for set in &sets {
        assert_set_ok(set, &zones, 3);
    }
    // Lose a1: every chunk on it gets a replacement; the sets stay zone-distinct.
    let mut repaired = 0;
    for set in sets.iter().filter(|s| s.contains(&"a1".to_string())) {
        let new = placer.replace(set, "a1", CHUNK).unwrap();
        let mut after: Vec<String> = set.iter().filter(|id| *id != "a1").cloned().collect();
        after.push(new);
        assert_set_ok(&after, &zones, 3);
        repaired += 1;
    }
    assert!(repaired > 0);
}

#[test]
fn mixed_labelled_and_unlabelled_nodes() {
    // Zone x has 4 nodes, 5 nodes are unlabelled (each its own domain).
    let mut nodes = zoned(&[("x", 4)], 100 * GIB);
    nodes.extend(flat(5, 100 * GIB));
    let zones = zone_of(&nodes);
    for replicas in 2..=4 {
        let mut placer = Placer::new(nodes.clone(), replicas, 6).unwrap();
        for set in place_volumes(&mut placer, 100, 2) {
            assert_set_ok(&set, &zones, replicas);
        }
    }
}

#[test]
fn balance_equal_capacities() {
    let mut placer = Placer::new(flat(12, 1 << 50), 3, 4).unwrap();
    place_volumes(&mut placer, 500, 3);
    let alloc = allocated(&placer);
    let ideal = alloc.values().sum::<u64>() as f64 / 12.0;
    let dev = max_dev(alloc.values().map(|&a| a as f64), ideal);
    println!(
        "equal capacities: max deviation from ideal {:.3} %",
        dev * 100.0
    );
    assert!(dev <= 0.10, "{alloc:?}");
}

#[test]
fn balance_survives_rebuilding_the_placer() {
    // The manager builds a Placer per operation from its state; balance must still hold.
    let mut nodes = flat(12, 1 << 50);
    let mut rng = Rng(4);
    for _ in 0..500 {
        let mut placer = Placer::new(nodes.clone(), 3, 4).unwrap();
        placer.place(rng.range(1, 64), CHUNK).unwrap();
        nodes = placer.nodes().to_vec();
    }
    let ideal = nodes.iter().map(|n| n.allocated).sum::<u64>() as f64 / 12.0;
    let dev = max_dev(nodes.iter().map(|n| n.allocated as f64), ideal);
    println!(
        "rebuilt per volume: max deviation from ideal {:.3} %",
        dev * 100.0
    );
    assert!(dev <= 0.10);
}

#[test]
fn balance_heterogeneous_capacities() {
    // Four of twelve nodes are twice as big.
    let mut nodes = flat(12, 1 << 40);
    for n in nodes.iter_mut().take(4) {
        n.capacity *= 2;
        n.free *= 2;
    }
    let capacity: BTreeMap<String, u64> =
        nodes.iter().map(|n| (n.id.clone(), n.capacity)).collect();
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    place_volumes(&mut placer, 500, 5);
    let fill: Vec<f64> = allocated(&placer)
        .iter()
        .map(|(id, &a)| a as f64 / capacity[id] as f64)
        .collect();
    let mean = fill.iter().sum::<f64>() / fill.len() as f64;
    let (lo, hi) = (
        fill.iter().cloned().fold(f64::MAX, f64::min),
        fill.iter().cloned().fold(0.0, f64::max),
    );
    println!(
        "2x nodes: fill spread {:.3} % of mean, max deviation from mean {:.3} %",
        (hi - lo) / mean * 100.0,
        max_dev(fill.iter().copied(), mean) * 100.0
    );
    assert!((hi - lo) / mean <= 0.10, "{fill:?}");
}

#[test]
fn balance_heterogeneous_zones_and_capacities() {
    // Four zones of equal total capacity made of 1x, 2x and 3x nodes; three replicas, so no zone
    // is capped and every node can be filled equally.
    let sizes: [(&str, &[u64]); 4] = [
        ("a", &[1, 2, 3]),
        ("b", &[3, 2, 1]),
        ("c", &[2, 2, 2]),
        ("d", &[1, 1, 3, 1]),
    ];
    let mut nodes = Vec::new();
    for (zone, caps) in sizes {
        for (i, c) in caps.iter().enumerate() {
            nodes.push(node(&format!("{zone}{i}"), zone, c << 40));
        }
    }
    let zones = zone_of(&nodes);
    let capacity: BTreeMap<String, u64> =
        nodes.iter().map(|n| (n.id.clone(), n.capacity)).collect();
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    for set in place_volumes(&mut placer, 500, 6) {
        assert_set_ok(&set, &zones, 3);
    }
    let fill: Vec<f64> = allocated(&placer)
        .iter()
        .map(|(id, &a)| a as f64 / capacity[id] as f64)
        .collect();
    let mean = fill.iter().sum::<f64>() / fill.len() as f64;
    let dev = max_dev(fill.iter().copied(), mean);
    println!(
        "zones of 1-3x nodes: max fill deviation from mean {:.3} %",
        dev * 100.0
    );
    assert!(dev <= 0.10, "{fill:?}");
}

#[test]
fn unequal_zone_capacities_are_capped_when_replicas_equal_zones() {
    // Three zones of total capacity 7, 8 and 9 with three replicas: each zone must hold exactly
    // one replica per chunk, so fills differ between zones but are equal within each zone.
    let mut nodes = zoned(&[("a", 4), ("b", 4), ("c", 4)], 1 << 40);
    for (i, n) in nodes.iter_mut().enumerate() {
        n.capacity *= 1 + (i as u64 % 3);
        n.free = n.capacity;
    }
    let zones = zone_of(&nodes);
    let capacity: BTreeMap<String, u64> =
        nodes.iter().map(|n| (n.id.clone(), n.capacity)).collect();
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    place_volumes(&mut placer, 500, 16);
    let alloc = allocated(&placer);
    let total = alloc.values().sum::<u64>();
    let mut worst: f64 = 0.0;
    for zone in ["a", "b", "c"] {
        let members: Vec<&String> = alloc.keys().filter(|id| zones[*id] == zone).collect();
        let sum: u64 = members.iter().map(|id| alloc[*id]).sum();
        assert_eq!(sum * 3, total, "zone {zone}");
        let zone_cap: u64 = members.iter().map(|id| capacity[*id]).sum();
        let ideal = sum as f64 / zone_cap as f64;
        let dev = max_dev(
            members
                .iter()
                .map(|id| alloc[*id] as f64 / capacity[*id] as f64),
            ideal,
        );
        assert!(dev <= 0.10, "zone {zone}: {alloc:?}");
        worst = worst.max(dev);
    }
    println!(
        "capped zones of 1-3x nodes: max fill deviation within a zone {:.3} %",
        worst * 100.0
    );
}

#[test]
fn balance_unequal_zones() {
    // Every set spans a, b and c, so each zone takes a third whatever its size.
    let nodes = zoned(&[("a", 2), ("b", 4), ("c", 6)], 1 << 50);
    let zones = zone_of(&nodes);
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    for set in place_volumes(&mut placer, 500, 7) {
        assert_set_ok(&set, &zones, 3);
    }
    let alloc = allocated(&placer);
    let total = alloc.values().sum::<u64>();
    let mut per_zone: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (id, &a) in &alloc {
        per_zone.entry(zones[id].as_str()).or_default().push(a);
    }
    let mut worst: f64 = 0.0;
    for (zone, values) in &per_zone {
        let sum = values.iter().sum::<u64>();
        assert_eq!(sum * 3, total, "zone {zone} holds {sum} of {total}");
        let ideal = sum as f64 / values.len() as f64;
        let dev = max_dev(values.iter().map(|&v| v as f64), ideal);
        assert!(dev <= 0.10, "zone {zone}: {values:?}");
        worst = worst.max(dev);
    }
    println!(
        "unequal zones: max deviation within a zone {:.3} %",
        worst * 100.0
    );
}

#[test]
fn big_zone_is_capped_and_the_rest_balanced() {
    // Zone a has half the capacity but can hold only one replica of three.
    let mut nodes = zoned(&[("a", 6)], 1 << 50);
    nodes.extend(flat(6, 1 << 50));
    let zones = zone_of(&nodes);
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    let sets = place_volumes(&mut placer, 300, 8);
    for set in &sets {
        assert_set_ok(set, &zones, 3);
    }
    let alloc = allocated(&placer);
    let total = alloc.values().sum::<u64>();
    let a: Vec<f64> = alloc
        .iter()
        .filter(|(id, _)| zones[*id] == "a")
        .map(|(_, &v)| v as f64)
        .collect();
    let rest: Vec<f64> = alloc
        .iter()
        .filter(|(id, _)| zones[*id].is_empty())
        .map(|(_, &v)| v as f64)
        .collect();
    // One replica per chunk in zone a: a third of the total.
    assert_eq!(a.iter().sum::<f64>() as u64 * 3, total);
    let dev_a = max_dev(a.iter().copied(), total as f64 / 3.0 / 6.0);
    let dev_rest = max_dev(rest.iter().copied(), total as f64 * 2.0 / 3.0 / 6.0);
    println!(
        "capped zone: max deviation {:.3} % (zone) {:.3} % (others)",
        dev_a * 100.0,
        dev_rest * 100.0
    );
    assert!(dev_a <= 0.10 && dev_rest <= 0.10, "{alloc:?}");
}

#[test]
fn a_new_empty_node_catches_up() {
    let mut nodes = flat(11, 1 << 50);
    let mut placer = Placer::new(nodes.clone(), 3, 4).unwrap();
    place_volumes(&mut placer, 100, 9);
    nodes = placer.nodes().to_vec();
    let before = nodes.iter().map(|n| n.allocated).sum::<u64>() / 11;
    nodes.push(node("n99", "", 1 << 50));
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    place_volumes(&mut placer, 400, 10);
    let alloc = allocated(&placer);
    let ideal = alloc.values().sum::<u64>() as f64 / 12.0;
    let dev = max_dev(alloc.values().map(|&a| a as f64), ideal);
    assert!(alloc["n99"] as f64 >= ideal * 0.9, "{alloc:?}");
    println!(
        "node added after 100 volumes (mean {before} B): max deviation after 400 more {:.3} %",
        dev * 100.0
    );
    assert!(dev <= 0.10, "{alloc:?}");
}

#[test]
fn copysets_bound_distinct_replica_sets() {
    let mut placer = Placer::new(flat(30, 1 << 50), 3, 4).unwrap();
    let copysets: BTreeSet<Vec<String>> = placer.copysets().iter().cloned().collect();
    assert_eq!(
        copysets.len(),
        placer.copysets().len(),
        "duplicate copysets"
    );
    let used: BTreeSet<Vec<String>> = place_volumes(&mut placer, 500, 11)
        .into_iter()
        .map(|mut s| {
            s.sort();
            s
        })
        .collect();
    assert!(used.is_subset(&copysets));
    // C(30, 3) = 4060 possible sets; copysets with scatter width 4 allow about 30 * 2 / 3.
    println!(
        "N=30 R=3 S=4: {} copysets, {} used, of 4060",
        copysets.len(),
        used.len()
    );
    assert!(used.len() <= copysets.len());
    // Equally good copysets take turns, so the scatter width is really used.
    assert!(used.len() * 10 >= copysets.len() * 9, "{}", used.len());
    assert!(copysets.len() <= 25, "{}", copysets.len());
    // Scatter width: every node shares copysets with about 4 others.
    let mut partners: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for set in &copysets {
        for a in set {
            for b in set.iter().filter(|b| *b != a) {
                partners.entry(a).or_default().insert(b);
            }
        }
    }
    assert_eq!(partners.len(), 30, "every node is in a copyset");
    let mut used_partners: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for set in &used {
        for a in set {
            for b in set.iter().filter(|b| *b != a) {
                used_partners.entry(a).or_default().insert(b);
            }
        }
    }
    for (n, p) in &partners {
        assert!((2..=6).contains(&p.len()), "{n}: {p:?}");
        // Placement really spreads each node's chunks over all its partners.
        assert_eq!(used_partners[n], *p, "{n}");
    }
}

#[test]
fn every_usable_node_is_in_a_copyset_and_no_other() {
    let mut nodes = flat(10, 1 << 40);
    nodes[0].placeable = false;
    nodes[1].capacity = 0;
    nodes[2].free = 0;
    for replicas in 1..=5 {
        let placer = Placer::new(nodes.clone(), replicas, 5).unwrap();
        let members: BTreeSet<&String> = placer.copysets().iter().flatten().collect();
        let expected: BTreeSet<&String> = nodes[3..].iter().map(|n| &n.id).collect();
        assert_eq!(members, expected, "replicas {replicas}");
        for set in placer.copysets() {
            assert_eq!(set.len(), replicas);
        }
        if replicas == 1 {
            assert_eq!(placer.copysets().len(), 7);
        }
    }
}

#[test]
fn full_and_unplaceable_nodes_get_nothing() {
    let mut nodes = flat(8, 1 << 40);
    nodes[0].placeable = false;
    nodes[1].capacity = 0;
    nodes[2].free = CHUNK - 1;
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    let sets = place_volumes(&mut placer, 50, 12);
    for set in &sets {
        for bad in ["n00", "n01", "n02"] {
            assert!(!set.iter().any(|id| id == bad), "{set:?}");
        }
    }
    // The node with a little room still works for smaller chunks.
    let small = placer.place(200, CHUNK / 2).unwrap();
    assert!(small.iter().flatten().any(|id| id == "n02"));
}

#[test]
fn impossible_placements_are_refused() {
    // R=3 with 2 placeable nodes.
    let mut nodes = flat(4, 1 << 40);
    nodes[0].placeable = false;
    nodes[1].placeable = false;
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    assert_eq!(
        placer.place(1, CHUNK),
        Err(PlacementError::NotEnoughNodes {
            wanted: 3,
            placeable: 2
        })
    );

    // R=3 with 3 nodes in 2 zones.
    let nodes = zoned(&[("a", 2), ("b", 1)], 1 << 40);
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    let err = placer.place(1, CHUNK).unwrap_err();
    assert_eq!(
        err,
        PlacementError::NotEnoughZones {
            wanted: 3,
            zones: 2
        }
    );
    assert!(
        err.to_string().contains("3 distinct failure domains"),
        "{err}"
    );

    // All nodes full.
    let mut nodes = flat(5, 1 << 40);
    for n in &mut nodes {
        n.free = CHUNK - 1;
    }
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    assert_eq!(
        placer.place(1, CHUNK),
        Err(PlacementError::NoCapacity {
            wanted: 3,
            nodes: 0,
            zones: 0,
            chunk_size: CHUNK
        })
    );
    assert!(placer.nodes().iter().all(|n| n.allocated == 0));

    // Room on enough nodes but not in enough zones.
    let mut nodes = zoned(&[("a", 2), ("b", 2), ("c", 2)], 1 << 40);
    nodes[4].free = 0;
    nodes[5].free = 0;
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    assert_eq!(
        placer.place(1, CHUNK),
        Err(PlacementError::NoCapacity {
            wanted: 3,
            nodes: 4,
            zones: 2,
            chunk_size: CHUNK
        })
    );

    // Replica counts out of range; a chunk size of 0; duplicate ids.
    assert_eq!(
        Placer::new(flat(20, 1), 0, 4).unwrap_err(),
        PlacementError::InvalidReplicas(0)
    );
    assert_eq!(
        Placer::new(flat(20, 1), 17, 4).unwrap_err(),
        PlacementError::InvalidReplicas(17)
    );
    assert!(Placer::new(flat(20, 1 << 40), 16, 4).is_ok());
    let mut placer = Placer::new(flat(4, 1 << 40), 3, 4).unwrap();
    assert_eq!(placer.place(1, 0), Err(PlacementError::InvalidChunkSize));
    let mut nodes = flat(4, 1);
    nodes[3].id = "n00".into();
    assert_eq!(
        Placer::new(nodes, 3, 4).unwrap_err(),
        PlacementError::DuplicateNode("n00".into())
    );
}

#[test]
fn sixteen_replicas() {
    let nodes = flat(40, 1 << 50);
    let zones = zone_of(&nodes);
    let mut placer = Placer::new(nodes, 16, 30).unwrap();
    for set in place_volumes(&mut placer, 20, 13) {
        assert_set_ok(&set, &zones, 16);
    }
}

#[test]
fn replace_picks_outside_the_set_and_the_survivors_domains() {
    let nodes = zoned(&[("a", 3), ("b", 3), ("c", 3)], 1 << 40);
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    let current: Vec<String> = ["a0", "b0", "c0"].map(String::from).to_vec();
    // Only a1 and a2 are outside the survivors' zones b and c.
    let mut picked = BTreeSet::new();
    for _ in 0..10 {
        let new = placer.replace(&current, "a0", CHUNK).unwrap();
        assert!(new == "a1" || new == "a2", "{new}");
        picked.insert(new);
    }
    // Least loaded: successive replacements alternate.
    assert_eq!(picked.len(), 2);
    let alloc = allocated(&placer);
    assert_eq!(alloc["a1"], 5 * CHUNK);
    assert_eq!(alloc["a2"], 5 * CHUNK);

    // Unlabelled nodes: any node outside the set, the least loaded.
    let mut nodes = flat(5, 1 << 40);
    nodes[3].allocated = 10 * CHUNK;
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    let current: Vec<String> = ["n00", "n01", "n02"].map(String::from).to_vec();
    assert_eq!(placer.replace(&current, "n01", CHUNK).unwrap(), "n04");
}

#[test]
fn replace_refuses_when_no_node_fits() {
    // a0 is the only node of zone a; the rest are in the survivors' zones.
    let nodes = zoned(&[("a", 1), ("b", 2), ("c", 2)], 1 << 40);
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    let current: Vec<String> = ["a0", "b0", "c0"].map(String::from).to_vec();
    let err = placer.replace(&current, "a0", CHUNK).unwrap_err();
    assert_eq!(
        err,
        PlacementError::NoReplacement {
            lost: "a0".into(),
            outside: 2,
            survivors: 2,
            chunk_size: CHUNK
        }
    );
    // The only outside node is unplaceable, or full.
    for case in 0..2 {
        let mut nodes = flat(4, 1 << 40);
        if case == 0 {
            nodes[3].placeable = false;
        } else {
            nodes[3].free = 0;
        }
        let mut placer = Placer::new(nodes, 3, 4).unwrap();
        let current: Vec<String> = ["n00", "n01", "n02"].map(String::from).to_vec();
        assert!(matches!(
            placer.replace(&current, "n02", CHUNK),
            Err(PlacementError::NoReplacement { outside: 0, .. })
        ));
    }
    // `lost` must be in the set.
    let mut placer = Placer::new(flat(4, 1 << 40), 3, 4).unwrap();
    let current: Vec<String> = ["n00", "n01"].map(String::from).to_vec();
    assert!(matches!(
        placer.replace(&current, "n03", CHUNK),
        Err(PlacementError::LostNotInSet { .. })
    ));
}

#[test]
fn replace_works_in_a_degraded_cluster() {
    // The lost node is down and a survivor is draining: fewer placeable nodes than replicas
    // would need for new data, but one replacement is still possible.
    let mut nodes = flat(4, 1 << 40);
    nodes[0].placeable = false; // draining survivor
    nodes[2].placeable = false; // lost
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    assert!(placer.place(1, CHUNK).is_err());
    let current: Vec<String> = ["n00", "n01", "n02"].map(String::from).to_vec();
    assert_eq!(placer.replace(&current, "n02", CHUNK).unwrap(), "n03");
}

#[test]
fn replace_with_no_lost_node_adds_one_to_a_short_set() {
    // A chunk that lost a replica to a write failure has two; the third goes to a new domain.
    let nodes = zoned(&[("a", 2), ("b", 2), ("c", 2)], 1 << 40);
    let mut placer = Placer::new(nodes, 3, 4).unwrap();
    let current: Vec<String> = ["a0", "b0"].map(String::from).to_vec();
    let new = placer.replace(&current, "", CHUNK).unwrap();
    assert!(new.starts_with('c'), "{new}");
}

#[test]
fn recovery_of_a_lost_node_spreads_and_keeps_zones() {
    let nodes = zoned(&[("a", 4), ("b", 4), ("c", 4)], 1 << 50);
    let zones = zone_of(&nodes);
    let mut placer = Placer::new(nodes.clone(), 3, 4).unwrap();
    let sets = place_volumes(&mut placer, 200, 14);
    // b2 dies: the manager rebuilds its Placer with b2 unplaceable and replaces every replica.
    let mut state = placer.nodes().to_vec();
    state.iter_mut().find(|n| n.id == "b2").unwrap().placeable = false;
    let mut placer = Placer::new(state, 3, 4).unwrap();
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    for set in sets.iter().filter(|s| s.contains(&"b2".to_string())) {
        let new = placer.replace(set, "b2", CHUNK).unwrap();
        let mut after: Vec<String> = set.iter().filter(|id| *id != "b2").cloned().collect();
        after.push(new.clone());
        assert_set_ok(&after, &zones, 3);
        *got.entry(new).or_default() += 1;
    }
    // All three other b nodes share the work.
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), ["b0", "b1", "b3"]);
    let alloc = allocated(&placer);
    assert_eq!(alloc["b2"], 0);
    let b: Vec<f64> = ["b0", "b1", "b3"]
        .iter()
        .map(|id| alloc[*id] as f64)
        .collect();
    let mean = b.iter().sum::<f64>() / 3.0;
    assert!(max_dev(b, mean) <= 0.05, "{alloc:?}");
}

#[test]
fn deterministic() {
    let mut nodes = zoned(&[("a", 5), ("b", 4), ("c", 6)], 1 << 45);
    nodes.extend(flat(3, 1 << 46));
    let run = |nodes: Vec<Candidate>| {
        let mut placer = Placer::new(nodes, 3, 6).unwrap();
        let copysets = placer.copysets().to_vec();
        let sets = place_volumes(&mut placer, 50, 15);
        let current = sets[0].clone();
        let lost = current[1].clone();
        let new = placer.replace(&current, &lost, CHUNK).unwrap();
        (copysets, sets, new, placer.nodes().to_vec())
    };
    let first = run(nodes.clone());
    assert_eq!(first, run(nodes.clone()));
    // The order of the input list does not matter either.
    nodes.reverse();
    nodes.swap(2, 7);
    assert_eq!(first, run(nodes));
}
