//! Driver plugin for the stateless array (2nd embodiment, EP 1 148 416 [0050]-[0062]).
//!
//! Built as a `cdylib` + `rlib` by the plugin issue; for now only the crate exists.
