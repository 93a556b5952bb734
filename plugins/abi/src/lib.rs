//! hvm-plugin-abi: the stable ABI between host-agent and array driver plugins.
//!
//! Filled in by the plugin issue: the abi_stable root module, the `#[sabi_trait]` backend
//! object wrapping [`hvm_core::backend::Backend`], and the plugin error enum.
