//! The checked-in manifests are the default rendering, and every rendering validates offline
//! against the Kubernetes OpenAPI schemas (PyPI `kubernetes-validate --strict`, which carries
//! them) of the oldest API the typed objects use and of the newest release it knows.

use std::path::{Path, PathBuf};
use std::process::Command;

use ironsan_deploy::{render, Bundle, Object, Options};

/// Kubernetes releases validated against: `k8s-openapi`'s `v1_33` feature, and the newest.
const VERSIONS: [&str; 2] = ["1.33.0", "1.37.0"];

fn checked_in() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kubernetes")
}

#[test]
fn checked_in_manifests_are_the_default_rendering() {
    let tmp = tempfile::tempdir().unwrap();
    render(&Options::default())
        .unwrap()
        .write_dir(tmp.path())
        .unwrap();
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let regen =
        "regenerate with `cargo run -p ironsan -- deploy manifests --output-dir deploy/kubernetes`";
    assert_eq!(names(&checked_in()), names(tmp.path()), "{regen}");
    for n in names(tmp.path()) {
        let want = std::fs::read_to_string(tmp.path().join(&n)).unwrap();
        let have = std::fs::read_to_string(checked_in().join(&n)).unwrap();
        assert!(
            have == want,
            "deploy/kubernetes/{n} differs from the rendering: {regen}"
        );
    }
}

/// The validator: $KUBERNETES_VALIDATE, the test venv, or PATH. Missing, the test fails with
/// the line that installs it.
fn validator() -> PathBuf {
    let candidates = [
        std::env::var_os("KUBERNETES_VALIDATE").map(PathBuf::from),
        Some(PathBuf::from("/opt/ironsan-venv/bin/kubernetes-validate")),
    ];
    for c in candidates.into_iter().flatten() {
        if c.is_file() {
            return c;
        }
    }
    if Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok()
    {
        return PathBuf::from("kubernetes-validate");
    }
    panic!(
        "kubernetes-validate is missing: scripts/install-test-deps.sh installs it \
         (python3 -m venv /opt/ironsan-venv && /opt/ironsan-venv/bin/pip install kubernetes-validate)"
    );
}

/// Runs the validator in strict mode on `files` for `version`: Ok, or every complaint.
fn validate(files: &[PathBuf], version: &str) -> Result<(), String> {
    let out = Command::new(validator())
        .args(["--strict", "--quiet", "--kubernetes-version", version])
        .args(files)
        .output()
        .expect("kubernetes-validate runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The validator has no schema for CRDs; VolumeSnapshotClass is checked in Rust below.
    let complaints: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !(l.starts_with("WARN") && l.contains("kind VolumeSnapshotClass")))
        .collect();
    if out.status.success() && complaints.is_empty() {
        Ok(())
    } else {
        Err(format!("{} ({})", complaints.join("\n"), out.status))
    }
}

/// Writes the bundle's files (not the kustomization, which is no API object) and validates
/// them against every version.
fn validate_bundle(what: &str, b: &Bundle) {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for f in &b.files {
        let p = tmp.path().join(f.name);
        std::fs::write(&p, b.file_yaml(f).unwrap()).unwrap();
        files.push(p);
    }
    for v in VERSIONS {
        if let Err(e) = validate(&files, v) {
            panic!("{what} does not validate against Kubernetes {v}:\n{e}");
        }
    }
}

#[test]
fn checked_in_manifests_validate() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(checked_in())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    for v in VERSIONS {
        if let Err(e) = validate(&files, v) {
            panic!("deploy/kubernetes does not validate against Kubernetes {v}:\n{e}");
        }
    }
}

#[test]
fn non_default_renderings_validate() {
    let zoned = Options {
        managers: 5,
        storage: 6,
        zones: vec!["a".into(), "b".into(), "c".into()],
        namespace: "storage".into(),
        storage_class: "ironsan-fast".into(),
        default_storage_class: true,
        storage_disks: 2,
        replicas: 2,
        fs_type: "xfs".into(),
        ..Options::default()
    };
    let b = render(&zoned).unwrap();
    let sets = b
        .objects()
        .filter(|o| matches!(o, Object::StatefulSet(_)))
        .count();
    assert_eq!(sets, 1 + 3, "managers and one storage set per zone");
    validate_bundle("5 managers, 6 storage pods in 3 zones", &b);

    let host = Options {
        storage_host_path: Some("/srv/ironsan".into()),
        snapshots: false,
        iscsi_port: 13260,
        managers: 1,
        ..Options::default()
    };
    validate_bundle("storage on host paths", &render(&host).unwrap());
}

/// The control: strict mode really rejects a misspelled field and a wrong type, so the runs
/// above prove something.
#[test]
fn strict_validation_catches_a_misspelling() {
    let b = render(&Options::default()).unwrap();
    let f = b
        .files
        .iter()
        .find(|f| f.name == "csi-driver.yaml")
        .unwrap();
    let good = b.file_yaml(f).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (from, to) in [
        ("attachRequired: true", "attachRequird: true"),
        ("attachRequired: true", "attachRequired: yes please"),
    ] {
        assert!(good.contains(from));
        let p = tmp.path().join("bad.yaml");
        std::fs::write(&p, good.replace(from, to)).unwrap();
        let e = validate(&[p], VERSIONS[1]).expect_err(to);
        assert!(e.contains("ERROR"), "{e}");
    }
}

/// VolumeSnapshotClass (a CRD the validator has no schema for) against the fields of
/// snapshot.storage.k8s.io/v1: driver, deletionPolicy Delete|Retain, parameters.
#[test]
fn volume_snapshot_class_has_only_known_fields() {
    let b = render(&Options::default()).unwrap();
    let class = b
        .objects()
        .find(|o| matches!(o, Object::VolumeSnapshotClass(_)))
        .expect("a VolumeSnapshotClass");
    let v: serde_json::Value =
        serde_json::from_str(&serde_json::to_string(class).unwrap()).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    for k in &keys {
        assert!(
            [
                "apiVersion",
                "kind",
                "metadata",
                "driver",
                "deletionPolicy",
                "parameters"
            ]
            .contains(&k.as_str()),
            "unknown field {k}"
        );
    }
    assert_eq!(v["apiVersion"], "snapshot.storage.k8s.io/v1");
    assert_eq!(v["driver"], ironsan_deploy::DRIVER_NAME);
    assert!(["Delete", "Retain"].contains(&v["deletionPolicy"].as_str().unwrap()));
    let none = render(&Options {
        snapshots: false,
        ..Options::default()
    })
    .unwrap();
    assert!(!none
        .objects()
        .any(|o| matches!(o, Object::VolumeSnapshotClass(_))));
}
