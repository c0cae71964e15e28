//! Wire types generated from `common/proto/*.proto` by prost (and tonic for the services).

/// The data path between gateway and storage daemons (`proto/datapath.proto`).
#[allow(clippy::all, missing_docs)]
pub mod datapath {
    include!(concat!(env!("OUT_DIR"), "/ironsan.datapath.rs"));
}

/// The manager's gRPC API and its member-to-member service (`proto/manager.proto`).
#[allow(clippy::all, missing_docs)]
pub mod manager {
    include!(concat!(env!("OUT_DIR"), "/ironsan.manager.rs"));
}
