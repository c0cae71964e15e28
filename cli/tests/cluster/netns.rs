//! Network namespaces for partition tests: `n` namespaces on one bridge in the root namespace,
//! slot `i` at `10.232.X.i`, the test itself (root namespace) at `10.232.X.254`.
//!
//! A partition of slot `i` is a pair of blackhole routes between `i` and every other slot,
//! installed inside the namespaces: the slots lose each other while the test still reaches
//! every one of them (so it can read from a partitioned storage node, or talk iSCSI to a
//! partitioned gateway). Names carry the test's pid; namespaces and bridges of dead runs are
//! swept at setup, and everything is removed on drop, panics included. Needs root and
//! iproute2 (`apt-get install -y iproute2`).

use std::collections::BTreeSet;
use std::process::Command;

pub struct Netns {
    pid: u32,
    subnet: String,
    n: u32,
    /// Slots currently cut off.
    cut: BTreeSet<u32>,
}

pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        format!("cannot run `ip` ({e}): install iproute2 (apt-get install -y iproute2)")
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip_out(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Namespaces and bridges left by runs that died without cleaning up (named with their pid).
fn sweep_stale() {
    let dead = |pid: &str| !std::path::Path::new(&format!("/proc/{pid}")).exists();
    for line in ip_out(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if let Some((pid, _)) = name.strip_prefix("icl").and_then(|r| r.split_once('s')) {
            if dead(pid) {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
    for line in ip_out(&["-o", "link", "show", "type", "bridge"]).lines() {
        let Some(name) = line.split(':').nth(1).map(str::trim) else {
            continue;
        };
        if let Some(pid) = name.strip_prefix("iclbr") {
            if dead(pid) {
                let _ = ip(&["link", "del", name]);
            }
        }
    }
}

impl Netns {
    /// Creates `n` namespaces (slots 1..=n). Panics with the install line if `ip` is missing.
    pub fn setup(n: u32) -> Netns {
        assert!((1..=200).contains(&n), "1 to 200 slots");
        if let Err(e) = ip(&["netns", "list"]) {
            panic!(
                "`ip netns` is unavailable ({e}): apt-get install -y iproute2 (and run as root)"
            );
        }
        if let Err(e) = Command::new("nsenter").arg("--version").output() {
            panic!("`nsenter` is unavailable ({e}): apt-get install -y util-linux");
        }
        sweep_stale();
        let pid = std::process::id();
        // A /24 no other run holds (each bridge has its subnet's .254).
        let subnet = (0..200)
            .map(|k| format!("10.232.{}", 20 + (pid + k) % 200))
            .find(|net| ip_out(&["-o", "addr", "show", "to", &format!("{net}.0/24")]).is_empty())
            .expect("a free 10.232.X.0/24");
        let net = Netns {
            pid,
            subnet,
            n,
            cut: BTreeSet::new(),
        };
        net.teardown();
        let br = net.bridge();
        let gw = format!("{}.254/24", net.subnet);
        let mut steps: Vec<Vec<String>> = [
            vec!["link", "add", &br, "type", "bridge"],
            vec!["addr", "add", &gw, "dev", &br],
            vec!["link", "set", &br, "up"],
        ]
        .into_iter()
        .map(|v| v.into_iter().map(String::from).collect())
        .collect();
        for i in 1..=n {
            let (ns, root, inner) = (net.ns(i), net.veth(i, 'r'), net.veth(i, 'n'));
            let addr = format!("{}/24", net.ip(i));
            let default_via = format!("{}.254", net.subnet);
            for v in [
                vec!["netns", "add", &ns],
                vec!["link", "add", &root, "type", "veth", "peer", "name", &inner],
                vec!["link", "set", &inner, "netns", &ns],
                vec!["link", "set", &root, "master", &br],
                vec!["link", "set", &root, "up"],
                vec![
                    "netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", &inner,
                ],
                vec!["netns", "exec", &ns, "ip", "link", "set", &inner, "up"],
                vec!["netns", "exec", &ns, "ip", "link", "set", "lo", "up"],
                vec![
                    "netns",
                    "exec",
                    &ns,
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &default_via,
                ],
            ] {
                steps.push(v.into_iter().map(String::from).collect());
            }
        }
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            if let Err(e) = ip(&args) {
                net.teardown();
                panic!("network namespace setup failed: {e}");
            }
        }
        net
    }

    pub fn ns(&self, i: u32) -> String {
        format!("icl{}s{i}", self.pid)
    }
    fn veth(&self, i: u32, side: char) -> String {
        format!("icv{}{side}{i}", self.pid)
    }
    fn bridge(&self) -> String {
        format!("iclbr{}", self.pid)
    }
    /// The address of slot `i`.
    pub fn ip(&self, i: u32) -> String {
        format!("{}.{i}", self.subnet)
    }
    /// The command prefix that runs a program in slot `i`.
    ///
    /// `nsenter --net` rather than `ip netns exec`: the latter also gives the program its own
    /// mount namespace, holding a copy of every mount — the other storage daemons' loop disks
    /// included — which keeps a disk busy (no unmount, no e2fsck) while any process lives.
    /// Both exec the program in place, so its pid is the daemon's.
    pub fn prefix(&self, i: u32) -> Vec<String> {
        vec![
            "nsenter".to_string(),
            format!("--net=/run/netns/{}", self.ns(i)),
            "--".to_string(),
        ]
    }

    pub fn is_cut(&self, i: u32) -> bool {
        self.cut.contains(&i)
    }

    /// Cuts slot `i` off from every other slot (both directions), or heals that. Cutting a cut
    /// slot or healing a connected one does nothing.
    pub fn partition(&mut self, i: u32, cut: bool) -> Result<(), String> {
        if self.cut.contains(&i) == cut {
            return Ok(());
        }
        let verb = if cut { "add" } else { "del" };
        for j in (1..=self.n).filter(|&j| j != i) {
            for (inside, to) in [(i, j), (j, i)] {
                let dst = format!("{}/32", self.ip(to));
                let ns = self.ns(inside);
                // Another cut slot may already blackhole this pair: one route serves both.
                let r = ip(&["netns", "exec", &ns, "ip", "route", verb, "blackhole", &dst]);
                let other_cut = self.cut.contains(&j);
                if let Err(e) = r {
                    if !other_cut {
                        return Err(format!("partition slot {i}: {e}"));
                    }
                }
            }
        }
        if cut {
            self.cut.insert(i);
        } else {
            self.cut.remove(&i);
            // Pairs shared with a slot that is still cut must stay blackholed.
            for &j in &self.cut {
                for (inside, to) in [(i, j), (j, i)] {
                    let dst = format!("{}/32", self.ip(to));
                    let _ = ip(&[
                        "netns",
                        "exec",
                        &self.ns(inside),
                        "ip",
                        "route",
                        "add",
                        "blackhole",
                        &dst,
                    ]);
                }
            }
        }
        Ok(())
    }

    fn teardown(&self) {
        for i in 1..=self.n {
            let _ = ip(&["netns", "del", &self.ns(i)]);
            let _ = ip(&["link", "del", &self.veth(i, 'r')]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.teardown();
    }
}
