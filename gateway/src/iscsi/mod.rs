//! RFC 7143 target side.
