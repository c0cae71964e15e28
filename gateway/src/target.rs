//! Targets and the portal.
