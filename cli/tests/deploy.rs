//! `ironsan deploy manifests` as an operator runs it, and the agreement between what the
//! manifests and the image ask of the binary and what the binary offers: every flag the
//! manifests pass appears in `ironsan <daemon> --help`, every shared library the binary links
//! and every tool the CSI node plugin runs comes from a package the image installs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ironsan_deploy::{render, Object, Options};

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
