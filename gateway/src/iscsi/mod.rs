//! RFC 7143 target side.
//!
//! - [`pdu`]: header layout, framing and digests; [`wire`]: reading and writing them.
//! - [`text`]: `key=value` segments; [`params`]: operational negotiation; [`chap`]: CHAP.
//! - [`login`]: the login phase; [`session`]: sessions and reinstatement.
//! - [`connection`]: Full Feature Phase of one connection.

pub mod chap;
pub mod connection;
pub mod login;
pub mod params;
pub mod pdu;
pub mod session;
pub mod text;
pub mod wire;
