//! How CSI requests map onto IronSAN volumes: names, sizes and StorageClass parameters.
//!
//! - **Volume id.** The CSI name (`pvc-<uid>` from Kubernetes) becomes the IronSAN volume name
//!   when it is one already (a-z, 0-9, '-', '.', at most 128 bytes, starting with a letter or
//!   digit); any other name maps to `csi-` and the MD5 of the name in hex. The mapping is a
//!   pure function of the name, so CreateVolume is idempotent without any stored table, and
//!   the volume id is the IronSAN name (what `ironsan volume list` shows).
//! - **Snapshot id.** `<volume name>@<snapshot name>`, the snapshot name mapped from the CSI
//!   name like a volume name (Kubernetes' `snapshot-<uid>` is used as is): `@` is in neither,
//!   so the id splits back unambiguously, and both halves are what `ironsan volume snapshot
//!   list` shows.
//! - **Capacity.** The requested `required_bytes` is rounded up to a whole MiB (1 GiB when no
//!   range is given); the result must not exceed `limit_bytes` or [`MAX_VOLUME_SIZE`].
//! - **Parameters.** `replicas` (1-5), `chunkSize` (a size such as `64MiB`) and `fsType`
//!   (`ext4`/`xfs`, used when the capability names none); QoS limits `readIOPS`, `writeIOPS`,
//!   `readBandwidth`, `writeBandwidth` (sizes per second, e.g. `100MiB`) and `qosBurst` (whole
//!   milliseconds or seconds: `500ms`, `2s`), checked by the manager like
//!   `ironsan volume create`'s. A volume made from a snapshot or another volume is at least
//!   the source's size: the source's size when no size is required, and a range below it is
//!   OUT_OF_RANGE. Keys under `csi.storage.k8s.io/`
//!   are Kubernetes' own and ignored; any other key is an error, so a misspelled parameter in
//!   a StorageClass is reported instead of silently doing nothing.

use std::collections::HashMap;

use md5::{Digest, Md5};

use crate::capability::FS_TYPES;
use crate::csi::CapacityRange;

/// Sizes are rounded up to this.
pub const SIZE_UNIT: u64 = 1 << 20;
/// The size of a volume created without a capacity range.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// The largest volume the driver creates (the manager's limit: 256 Ki chunks of 64 MiB).
pub const MAX_VOLUME_SIZE: u64 = 16 << 40;
/// Replica counts a StorageClass may ask for.
pub const MAX_REPLICAS: u32 = 5;
/// The IQN prefix of every volume's target (DESIGN.md).
pub const IQN_PREFIX: &str = "iqn.2026-11.io.ironsan:";

/// Volume context key carrying the StorageClass's filesystem type to the node.
pub const CTX_FS_TYPE: &str = "fsType";

/// The IronSAN volume name (and CSI volume id) for a CSI volume name.
pub fn volume_id_for(name: &str) -> String {
    if valid_volume_id(name) {
        return name.to_string();
    }
    let digest = Md5::digest(name.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("csi-{hex}")
}

/// Whether `id` can name an IronSAN volume (the manager's rule).
pub fn valid_volume_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with(['-', '.'])
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The CSI snapshot id of a volume's snapshot.
pub fn snapshot_id(volume: &str, snapshot: &str) -> String {
    format!("{volume}@{snapshot}")
}

/// (volume, snapshot) of a snapshot id this driver could have made; None for any other.
pub fn split_snapshot_id(id: &str) -> Option<(&str, &str)> {
    id.split_once('@')
        .filter(|(v, s)| valid_volume_id(v) && valid_volume_id(s))
}

/// The target IQN the gateway exports a volume under.
pub fn iqn(volume: &str) -> String {
    format!("{IQN_PREFIX}{volume}")
}

/// Why a capacity range cannot be met (OUT_OF_RANGE) or makes no sense (INVALID_ARGUMENT).
#[derive(Debug, PartialEq, Eq)]
pub enum SizeError {
    Invalid(String),
    OutOfRange(String),
}

/// The size to create or grow to for `range` (see the module doc).
pub fn size_for(range: Option<&CapacityRange>) -> Result<u64, SizeError> {
    let Some(r) = range else {
        return Ok(DEFAULT_SIZE);
    };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(SizeError::Invalid(
            "capacity range bytes must not be negative".to_string(),
        ));
    }
    let (required, limit) = (r.required_bytes as u64, r.limit_bytes as u64);
    if limit != 0 && required > limit {
        return Err(SizeError::Invalid(format!(
            "required_bytes {required} is above limit_bytes {limit}"
        )));
    }
    let size = match required {
        0 if limit != 0 => limit / SIZE_UNIT * SIZE_UNIT,
        0 => DEFAULT_SIZE,
        r => r.div_ceil(SIZE_UNIT) * SIZE_UNIT,
    };
    if size == 0 {
        return Err(SizeError::OutOfRange(format!(
            "limit_bytes {limit} is below the smallest volume ({SIZE_UNIT} bytes)"
        )));
    }
    if limit != 0 && size > limit {
        return Err(SizeError::OutOfRange(format!(
            "{required} bytes rounded up to whole MiB is {size}, above limit_bytes {limit}"
        )));
    }
    if size > MAX_VOLUME_SIZE {
        return Err(SizeError::OutOfRange(format!(
            "{size} bytes is above the largest volume ({MAX_VOLUME_SIZE} bytes)"
        )));
    }
    Ok(size)
}

/// The size of a volume made from a source of `source` bytes (see the module doc).
pub fn clone_size(range: Option<&CapacityRange>, source: u64) -> Result<u64, SizeError> {
    let size = match range {
        Some(r) if r.required_bytes != 0 => size_for(range)?,
        _ => source,
    };
    let limit = range.map_or(0, |r| r.limit_bytes.max(0) as u64);
    if size < source || (limit != 0 && size > limit) {
        return Err(SizeError::OutOfRange(format!(
            "the source is {source} bytes: a volume made from it cannot be {}",
            if size < source {
                format!("{size} bytes")
            } else {
                format!("at most {limit} bytes")
            }
        )));
    }
    Ok(size)
}

/// Whether an existing volume of `size` bytes satisfies `range`.
pub fn size_fits(size: u64, range: Option<&CapacityRange>) -> bool {
    let Some(r) = range else { return true };
    size >= r.required_bytes.max(0) as u64 && (r.limit_bytes <= 0 || size <= r.limit_bytes as u64)
}

/// StorageClass parameters, checked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Params {
    /// 0: the cluster default.
    pub replicas: u32,
    /// 0: the manager's default.
    pub chunk_size: u64,
    /// Empty: the capability's, else ext4.
    pub fs_type: String,
    /// Per-volume I/O limits; None: unlimited.
    pub qos: Option<ironsan_common::proto::manager::VolumeQos>,
}

impl Params {
    pub fn parse(params: &HashMap<String, String>) -> Result<Params, String> {
        let mut p = Params::default();
        for (key, value) in params {
            match key.as_str() {
                "replicas" => {
                    p.replicas = value
                        .trim()
                        .parse()
                        .ok()
                        .filter(|r| (1..=MAX_REPLICAS).contains(r))
                        .ok_or_else(|| {
                            format!("parameter replicas={value:?} is not a number from 1 to {MAX_REPLICAS}")
                        })?;
                }
                "chunkSize" => {
                    p.chunk_size = ironsan_common::size::parse_size(value.trim())
                        .map_err(|e| format!("parameter chunkSize={value:?}: {e}"))?;
                }
                "fsType" => {
                    let fs = value.trim().to_ascii_lowercase();
                    if !FS_TYPES.contains(&fs.as_str()) {
                        return Err(format!(
                            "parameter fsType={value:?} is not one of {}",
                            FS_TYPES.join(", ")
                        ));
                    }
                    p.fs_type = fs;
                }
                "readIOPS" | "writeIOPS" => {
                    let n: u64 = value.trim().parse().map_err(|_| {
                        format!("parameter {key}={value:?} is not a whole number of operations per second")
                    })?;
                    let q = p.qos.get_or_insert_with(Default::default);
                    if key == "readIOPS" {
                        q.read_iops = n;
                    } else {
                        q.write_iops = n;
                    }
                }
                "readBandwidth" | "writeBandwidth" => {
                    let n = ironsan_common::size::parse_size(value.trim())
                        .map_err(|e| format!("parameter {key}={value:?}: {e}"))?;
                    let q = p.qos.get_or_insert_with(Default::default);
                    if key == "readBandwidth" {
                        q.read_bps = n;
                    } else {
                        q.write_bps = n;
                    }
                }
                "qosBurst" => {
                    let v = value.trim();
                    let ms = match v.strip_suffix("ms") {
                        Some(n) => n.parse::<u64>().ok(),
                        None => v
                            .strip_suffix('s')
                            .and_then(|n| n.parse::<u64>().ok())
                            .and_then(|n| n.checked_mul(1000)),
                    }
                    .ok_or_else(|| {
                        format!(
                            "parameter qosBurst={value:?} is not a duration such as 500ms or 2s"
                        )
                    })?;
                    p.qos.get_or_insert_with(Default::default).burst_ms = Some(ms);
                }
                k if k.starts_with("csi.storage.k8s.io/") => {}
                k => {
                    return Err(format!(
                        "unknown parameter {k:?} (known: replicas, chunkSize, fsType, readIOPS, \
                         writeIOPS, readBandwidth, writeBandwidth, qosBurst)"
                    ))
                }
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> Option<CapacityRange> {
        Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        })
    }

    #[test]
    fn names_map_to_valid_stable_ids() {
        assert_eq!(
            volume_id_for("pvc-0a1b2c3d-aaaa-bbbb-cccc-0123456789ab"),
            "pvc-0a1b2c3d-aaaa-bbbb-cccc-0123456789ab"
        );
        let odd = "sanity-Controller Service [Controller Server] CreateVolume";
        let id = volume_id_for(odd);
        assert!(valid_volume_id(&id), "{id}");
        assert_eq!(id, volume_id_for(odd));
        assert_ne!(id, volume_id_for("sanity-controller service"));
        assert_eq!(id.len(), 4 + 32);
        let long = "a".repeat(129);
        assert!(valid_volume_id(&volume_id_for(&long)));
        assert!(valid_volume_id(&volume_id_for("")));
        assert!(!valid_volume_id(".x") && !valid_volume_id("A") && !valid_volume_id(""));
        assert_eq!(iqn("v1"), "iqn.2026-11.io.ironsan:v1");
    }

    #[test]
    fn capacity_is_rounded_and_bounded() {
        assert_eq!(size_for(None), Ok(DEFAULT_SIZE));
        assert_eq!(size_for(range(0, 0).as_ref()), Ok(DEFAULT_SIZE));
        assert_eq!(size_for(range(1, 0).as_ref()), Ok(SIZE_UNIT));
        assert_eq!(size_for(range(10 << 30, 0).as_ref()), Ok(10 << 30));
        assert_eq!(size_for(range(0, 5 << 20).as_ref()), Ok(5 << 20));
        assert_eq!(size_for(range(0, (5 << 20) + 7).as_ref()), Ok(5 << 20));
        assert!(matches!(
            size_for(range(1, 1000).as_ref()),
            Err(SizeError::OutOfRange(_))
        ));
        assert!(matches!(
            size_for(range(0, 1000).as_ref()),
            Err(SizeError::OutOfRange(_))
        ));
        assert!(matches!(
            size_for(range((MAX_VOLUME_SIZE + 1) as i64, 0).as_ref()),
            Err(SizeError::OutOfRange(_))
        ));
        assert!(matches!(
            size_for(range(10, 5).as_ref()),
            Err(SizeError::Invalid(_))
        ));
        assert!(matches!(
            size_for(range(-1, 0).as_ref()),
            Err(SizeError::Invalid(_))
        ));
        assert!(size_fits(1 << 30, range(1 << 30, 0).as_ref()));
        assert!(!size_fits(1 << 30, range(2 << 30, 0).as_ref()));
        assert!(!size_fits(2 << 30, range(0, 1 << 30).as_ref()));
    }

    #[test]
    fn snapshot_ids_split_back() {
        let id = snapshot_id("pvc-1", &volume_id_for("snapshot-2"));
        assert_eq!(id, "pvc-1@snapshot-2");
        assert_eq!(split_snapshot_id(&id), Some(("pvc-1", "snapshot-2")));
        for bad in ["pvc-1", "@s", "v@", "v@s@t", "V@s", "v@S"] {
            assert_eq!(split_snapshot_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn clones_are_at_least_their_source() {
        assert_eq!(clone_size(None, 5 << 20), Ok(5 << 20));
        assert_eq!(clone_size(range(0, 0).as_ref(), 5 << 20), Ok(5 << 20));
        assert_eq!(clone_size(range(8 << 20, 0).as_ref(), 5 << 20), Ok(8 << 20));
        assert!(matches!(
            clone_size(range(4 << 20, 0).as_ref(), 5 << 20),
            Err(SizeError::OutOfRange(_))
        ));
        assert!(matches!(
            clone_size(range(0, 4 << 20).as_ref(), 5 << 20),
            Err(SizeError::OutOfRange(_))
        ));
    }

    #[test]
    fn parameters_are_checked() {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        let p = Params::parse(&map(&[
            ("replicas", "2"),
            ("chunkSize", "16MiB"),
            ("fsType", "XFS"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]))
        .unwrap();
        assert_eq!(
            p,
            Params {
                replicas: 2,
                chunk_size: 16 << 20,
                fs_type: "xfs".to_string(),
                qos: None,
            }
        );
        let p = Params::parse(&map(&[
            ("writeIOPS", "200"),
            ("readBandwidth", "100MiB"),
            ("qosBurst", "1500ms"),
        ]))
        .unwrap();
        assert_eq!(
            p.qos,
            Some(ironsan_common::proto::manager::VolumeQos {
                write_iops: 200,
                read_bps: 100 << 20,
                burst_ms: Some(1500),
                ..Default::default()
            })
        );
        let p = Params::parse(&map(&[("qosBurst", "2s")])).unwrap();
        assert_eq!(p.qos.and_then(|q| q.burst_ms), Some(2000));
        for bad in [
            ("readIOPS", "fast"),
            ("writeIOPS", "-1"),
            ("writeBandwidth", "lots"),
            ("qosBurst", "2"),
            ("qosBurst", "soon"),
            ("replicas", "0"),
            ("replicas", "6"),
            ("replicas", "three"),
            ("chunkSize", "lots"),
            ("fsType", "btrfs"),
            ("replica", "3"),
        ] {
            assert!(Params::parse(&map(&[bad])).is_err(), "{bad:?}");
        }
    }
}
