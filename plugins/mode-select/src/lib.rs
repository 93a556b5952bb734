//! Driver plugin for the Mode Select array (1st embodiment, [0016]-[0049]).
//!
//! Built as a `cdylib` + `rlib` by the plugin issue; for now only the crate exists.
