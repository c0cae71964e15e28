//! Gateway metrics.
