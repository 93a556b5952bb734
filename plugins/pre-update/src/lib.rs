//! Driver plugin for the pre-update-data array with read distribution (4th embodiment, [0072]-[0078]).
//!
//! Built as a `cdylib` + `rlib` by the plugin issue; for now only the crate exists.
