//! `ironsan deploy manifests` as an operator runs it, and the agreement between what the
//! manifests and the image ask of the binary and what the binary offers: every flag the
//! manifests pass appears in `ironsan <daemon> --help`, every shared library the binary links
//! and every tool the CSI node plugin runs comes from a package the image installs, and the
//! image's runtime stage (the same Debian packages, built with mmdebstrap) serves a volume to
//! qemu as the image's non-root user.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ironsan_deploy::{render, Object, Options};

mod support;
use support::{qemu_io, require_qemu_iscsi, Server, ServerConfig};

fn ironsan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ironsan"))
        .args(args)
        .output()
        .expect("ironsan runs")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

#[test]
fn default_output_is_the_checked_in_set() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("k8s");
    let out = ironsan(&["deploy", "manifests", "--output-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let checked_in = repo().join("deploy/kubernetes");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        let have = std::fs::read_to_string(checked_in.join(e.file_name())).unwrap_or_default();
        assert_eq!(
            have,
            std::fs::read_to_string(e.path()).unwrap(),
            "deploy/kubernetes/{:?} is stale: ironsan deploy manifests --output-dir deploy/kubernetes",
            e.file_name()
        );
        n += 1;
    }
    assert_eq!(n, std::fs::read_dir(&checked_in).unwrap().count());
    // Printed, it is the same objects as one stream.
    let out = ironsan(&["deploy", "manifests"]);
    assert!(out.status.success());
    let stream = String::from_utf8(out.stdout).unwrap();
    let docs = stream.matches("\n---\n").count() + usize::from(stream.contains("\n---\n"));
    let objects = render(&Options::default()).unwrap().objects().count();
    assert!(
        docs >= objects - 1,
        "{docs} documents for {objects} objects"
    );
    assert!(stream.contains("kind: StatefulSet") && stream.contains("kind: CSIDriver"));
}

#[test]
fn values_file_and_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let values = tmp.path().join("values.yaml");
    std::fs::write(
        &values,
        "namespace: san\nmanagers: 5\nzones: [east, west]\nstorage: 4\n",
    )
    .unwrap();
    let v = values.to_str().unwrap();
    // The file alone, then a flag over it.
    let out = ironsan(&["deploy", "manifests", "--values", v]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("namespace: san\n"));
    assert!(text.contains("5=ironsan-manager-4.ironsan-manager.san.svc:7400"));
    assert!(
        text.contains("name: ironsan-storage-east\n")
            && text.contains("name: ironsan-storage-west\n")
    );
    let out = ironsan(&[
        "deploy",
        "manifests",
        "--values",
        v,
        "--managers",
        "3",
        "--zones",
        "a,b,c",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("ironsan-manager-4") && text.contains("ironsan-manager-2."));
    assert!(text.contains("name: ironsan-storage-c\n") && !text.contains("storage-east"));

    // Bad input: one readable line, exit 1, nothing on stdout, nothing written.
    std::fs::write(&values, "manegers: 5\n").unwrap();
    let bad = [
        vec!["deploy", "manifests", "--values", v],
        vec!["deploy", "manifests", "--managers", "4"],
        vec!["deploy", "manifests", "--namespace", "Not_A_Name"],
        vec!["deploy", "manifests", "--zones", "a,a"],
        vec![
            "deploy",
            "manifests",
            "--values",
            "/nonexistent/values.yaml",
        ],
        vec!["deploy", "manifests", "--replicas", "3", "--storage", "2"],
    ];
    let why = [
        "manegers",
        "managers",
        "namespace",
        "zones",
        "nonexistent",
        "replicas",
    ];
    let out_dir = tmp.path().join("never");
    for (args, why) in bad.iter().zip(why) {
        let mut args = args.clone();
        args.extend(["--output-dir", out_dir.to_str().unwrap()]);
        let out = ironsan(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(why),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty());
        assert!(!out_dir.exists(), "{args:?} wrote output");
    }
}

/// Every `--flag` the manifests give an `ironsan` container is one that `ironsan <command>
/// --help` lists, and every IRONSAN_* variable they set is one it reads.
#[test]
fn manifest_flags_are_in_the_help() {
    let zoned = Options {
        managers: 5,
        storage: 6,
        zones: vec!["a".into(), "b".into(), "c".into()],
        ..Options::default()
    };
    let host = Options {
        storage_host_path: Some("/srv/ironsan".into()),
        ..Options::default()
    };
    let mut checked = BTreeSet::new();
    for o in [Options::default(), zoned, host] {
        for obj in render(&o).unwrap().objects() {
            let spec = match obj {
                Object::StatefulSet(s) => s.spec.as_ref().map(|s| &s.template),
                Object::DaemonSet(d) => d.spec.as_ref().map(|s| &s.template),
                Object::Deployment(d) => d.spec.as_ref().map(|s| &s.template),
                _ => None,
            }
            .and_then(|t| t.spec.as_ref());
            for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
                if c.image.as_deref() != Some(o.image.as_str()) {
                    continue;
                }
                let args = c.args.clone().unwrap_or_default();
                let sub = args.first().expect("a subcommand").clone();
                let help = ironsan(&[&sub, "--help"]);
                assert!(help.status.success(), "ironsan {sub} --help");
                let help = String::from_utf8_lossy(&help.stdout).into_owned();
                for a in args.iter().filter(|a| a.starts_with("--")) {
                    let flag = a.split('=').next().unwrap();
                    assert!(
                        help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                        "{} passes {flag}, which `ironsan {sub} --help` does not list",
                        c.name
                    );
                    checked.insert(format!("{sub} {flag}"));
                }
                for e in c.env.iter().flatten() {
                    if e.name.starts_with("IRONSAN_") || e.name.starts_with("CSI_") {
                        assert!(
                            help.contains(&format!("env: {}=", e.name)),
                            "{} sets {}",
                            c.name,
                            e.name
                        );
                    }
                }
            }
        }
    }
    for must in [
        "manager --peer",
        "storage --data-dir",
        "gateway --advertise",
        "csi --endpoint",
        "storage --zone",
    ] {
        assert!(checked.contains(must), "{must} not among {checked:?}");
    }
}

/// The Dockerfile's runtime stage: the packages it installs, its user and entrypoint.
struct Image {
    packages: BTreeSet<String>,
    text: String,
}

fn image() -> Image {
    let text = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let runtime = text.rsplit_once("\nFROM ").expect("a runtime stage").1;
    let install = runtime
        .split_once("apt-get install")
        .expect("the runtime stage installs packages")
        .1;
    let install = install.split("&&").next().unwrap();
    let packages = install
        .split_whitespace()
        .filter(|w| !w.starts_with('-') && *w != "\\")
        .map(String::from)
        .collect();
    Image {
        packages,
        text: runtime.to_string(),
    }
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Debian package that owns `path` (`dpkg -S`), following /lib → /usr/lib.
fn owner(path: &str) -> Option<String> {
    let real = std::fs::canonicalize(path).ok()?;
    let candidates = [
        real.to_string_lossy().into_owned(),
        path.to_string(),
        path.replacen("/usr/lib/", "/lib/", 1),
        real.to_string_lossy().replacen("/usr/lib/", "/lib/", 1),
        path.replacen("/usr/sbin/", "/sbin/", 1),
        path.replacen("/usr/bin/", "/bin/", 1),
    ];
    for c in candidates {
        let out = sh(&format!("dpkg -S '{c}' 2>/dev/null"));
        let owned = out.lines().find(|l| !l.starts_with("diversion "));
        if let Some((pkg, _)) = owned.and_then(|l| l.split_once(':')) {
            return Some(pkg.to_string());
        }
    }
    None
}

/// Packages the image has: those it installs, what they depend on, and Debian's required set
/// (in every Debian base image).
fn provided(img: &Image) -> BTreeSet<String> {
    let mut all: BTreeSet<String> = img.packages.clone();
    let list = img.packages.iter().cloned().collect::<Vec<_>>().join(" ");
    let deps = sh(&format!(
        "apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
         --no-replaces --no-enhances {list} 2>/dev/null | grep -v '^ ' "
    ));
    all.extend(
        deps.lines()
            .map(|l| l.trim().trim_matches(['<', '>']).to_string()),
    );
    let required = sh("dpkg-query -W -f='${Package} ${Priority} ${Essential}\\n'");
    for l in required.lines() {
        let mut w = l.split_whitespace();
        if let (Some(p), Some(prio)) = (w.next(), w.next()) {
            if prio == "required" || l.ends_with(" yes") {
                all.insert(p.to_string());
            }
        }
    }
    all
}

#[test]
fn image_carries_what_the_binary_and_the_node_plugin_need() {
    let img = image();
    let have = provided(&img);
    // Shared libraries of the binary.
    let ldd = Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_ironsan"))
        .output()
        .expect("ldd (libc-bin) runs");
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    let mut libs = 0;
    for l in ldd.lines() {
        let Some(path) = l
            .split("=>")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
        else {
            continue;
        };
        let pkg = owner(path).unwrap_or_else(|| panic!("no package owns {path}"));
        let pkg = pkg.split(':').next().unwrap().to_string();
        assert!(
            have.contains(&pkg),
            "the binary links {path} from {pkg}, which the image lacks"
        );
        libs += 1;
    }
    assert!(libs >= 3, "{ldd}");
    assert!(
        img.packages.contains("librocksdb7.8"),
        "RocksDB links dynamically"
    );

    // Tools the node plugin runs (every `Cmd::new("tool"` in csi/src).
    let mut tools = BTreeSet::new();
    for e in walk(&repo().join("csi/src")) {
        let src = std::fs::read_to_string(&e).unwrap();
        for part in src.split("Cmd::new(\"").skip(1) {
            let tool = part.split('"').next().unwrap();
            // Paths are the unit tests' fakes.
            if !tool.contains('/') {
                tools.insert(tool.to_string());
            }
        }
    }
    for must in [
        "iscsiadm",
        "mkfs.ext4",
        "mkfs.xfs",
        "blkid",
        "mount",
        "umount",
    ] {
        assert!(tools.contains(must), "{must} not found among {tools:?}");
    }
    for t in &tools {
        let path = sh(&format!("command -v {t}")).trim().to_string();
        assert!(
            !path.is_empty(),
            "{t} is not installed here: scripts/install-test-deps.sh"
        );
        let pkg = owner(&path).unwrap_or_else(|| panic!("no package owns {path}"));
        assert!(
            have.contains(&pkg),
            "the node plugin runs {t} from {pkg}, which the image lacks"
        );
    }

    // The user the manifests run as, and the entrypoint they pass subcommands to.
    let uid = "--uid 65532";
    assert!(img.text.contains(uid) && img.text.contains("USER 65532:65532"));
    assert!(img
        .text
        .contains("ENTRYPOINT [\"/usr/bin/tini\", \"--\", \"/usr/bin/ironsan\"]"));
    assert!(img.packages.contains("tini"));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// The runtime stage of deploy/Dockerfile without a container engine: Debian bookworm with the
/// packages the Dockerfile installs (mmdebstrap, cached by package list), the Dockerfile's user,
/// and this build's binary. Unmounts what it mounted.
struct Rootfs {
    dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
}

impl Rootfs {
    fn build(img: &Image) -> Rootfs {
        let have = Command::new("mmdebstrap").arg("--version").output();
        assert!(
            have.is_ok_and(|o| o.status.success()),
            "mmdebstrap is missing: apt-get install mmdebstrap (scripts/install-test-deps.sh)"
        );
        let list: Vec<&str> = img.packages.iter().map(String::as_str).collect();
        let key = list.join(",");
        // FNV-1a: a cache key, nothing more.
        let hash = key.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        });
        let cache = PathBuf::from("/var/cache/ironsan-test");
        std::fs::create_dir_all(&cache).unwrap();
        let tar = cache.join(format!("rootfs-bookworm-{hash:016x}.tar"));
        if !tar.exists() {
            let tmp = tar.with_extension("partial.tar");
            let out = Command::new("mmdebstrap")
                .args([
                    "--variant=apt",
                    "--quiet",
                    &format!("--include={key}"),
                    "bookworm",
                ])
                .arg(&tmp)
                .output()
                .expect("mmdebstrap runs");
            assert!(
                out.status.success(),
                "mmdebstrap {key} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::rename(&tmp, &tar).unwrap();
        }
        let dir = tempfile::Builder::new()
            .prefix("ironsan-rootfs-")
            .tempdir()
            .unwrap();
        let root = dir.path();
        let ok = |c: &mut Command, what: &str| {
            let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                out.status.success(),
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ok(
            Command::new("tar").arg("-C").arg(root).arg("-xf").arg(&tar),
            "untar the rootfs",
        );
        // The Dockerfile's user and data directory.
        ok(
            Command::new("chroot")
                .arg(root)
                .args(["groupadd", "--gid", "65532", "ironsan"]),
            "groupadd",
        );
        ok(
            Command::new("chroot").arg(root).args([
                "useradd",
                "--uid",
                "65532",
                "--gid",
                "65532",
                "--no-create-home",
                "--home-dir",
                "/var/lib/ironsan",
                "--shell",
                "/usr/sbin/nologin",
                "ironsan",
            ]),
            "useradd",
        );
        ok(
            Command::new("install")
                .args(["-d", "-o", "65532", "-g", "65532"])
                .arg(root.join("var/lib/ironsan")),
            "data dir",
        );
        std::fs::copy(env!("CARGO_BIN_EXE_ironsan"), root.join("usr/bin/ironsan")).unwrap();
        let mut fs = Rootfs {
            dir,
            mounts: Vec::new(),
        };
        for (what, args) in [
            ("proc", vec!["-t", "proc", "proc"]),
            ("dev", vec!["--bind", "/dev"]),
        ] {
            let at = fs.dir.path().join(what);
            ok(Command::new("mount").args(&args).arg(&at), "mount");
            fs.mounts.push(at);
        }
        fs
    }

    /// A command that runs `ironsan ARGS` inside, as the image's user, under tini, with paths
    /// below the root taken as the root's own.
    fn wrapper(&self) -> PathBuf {
        let root = self.dir.path().display().to_string();
        let script = self.dir.path().join("ironsan-in-image.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/bash\nR='{root}'\nexec chroot --userspec=65532:65532 \"$R\" /usr/bin/tini -s -- /usr/bin/ironsan \"${{@/#\"$R\"/}}\"\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        script
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        // Never let the temp dir's removal walk into a /dev still bound below it.
        let root = self.dir.path().display().to_string();
        let mounted =
            std::fs::read_to_string("/proc/self/mountinfo").map_or(true, |m| m.contains(&root));
        if mounted {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            eprintln!("leaving {} behind: still mounted", dir.keep().display());
        }
    }
}

#[test]
fn image_runtime_serves_a_volume() {
    require_qemu_iscsi();
    let fs = Rootfs::build(&image());
    let root = fs.dir.path();
    // The node plugin's tools run in there too.
    for tool in [
        ["iscsiadm", "--version"],
        ["mkfs.xfs", "-V"],
        ["mkfs.ext4", "-V"],
        ["blkid", "-V"],
    ] {
        let out = Command::new("chroot")
            .arg(root)
            .args(tool)
            .output()
            .unwrap();
        assert!(out.status.success(), "{tool:?} in the image: {out:?}");
    }
    // A whole cluster as the image's non-root user on an unprivileged portal; qemu writes and
    // reads through it.
    // nextest runs each test in its own process: setting the variable races with nothing.
    std::env::set_var("IRONSAN_TEST_BIN", fs.wrapper());
    let data = root.join("var/lib/ironsan/dev");
    let server = Server::start(&data, ServerConfig::default().volume("img", "64MiB"));
    let url = server.url("img");
    qemu_io(&url, &["write -P 0x3c 0 1M".into(), "flush".into()])
        .expect_ok("write through the image");
    qemu_io(&url, &["read -P 0x3c 0 1M".into()]).expect_ok("read back");
    let owner = std::fs::metadata(&data)
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    assert_eq!(
        owner, 65532,
        "the cluster's data belongs to the image's user"
    );
    drop(server);
}
