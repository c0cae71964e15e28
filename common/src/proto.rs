//! Wire types generated from `common/proto/*.proto` by prost.

/// The data path between gateway and storage daemons (`proto/datapath.proto`).
#[allow(clippy::all, missing_docs)]
pub mod datapath {
    include!(concat!(env!("OUT_DIR"), "/ironsan.datapath.rs"));
}
