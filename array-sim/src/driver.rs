//! The embedded transport of the array drivers: array-sim in the host's process, built
//! from the `array.embedded` part of a driver's parameters (an array-sim config, parsed
//! as an [`ArrayConfig`] with the rest of them). The rest of the drivers' parameters, and
//! the drivers, are in hvm-scsi and the plugins.

use std::path::Path;
use std::sync::Arc;

use hvm_scsi::driver::Embed;
use hvm_scsi::Transport;

use crate::config::ArrayConfig;
use crate::engine::Engine;

/// The engine an array-sim config describes, as a transport. A relative `dir` is taken
/// relative to `state_dir`, which host-agent adds to every plugin's parameters. The
/// config is checked as [`ArrayConfig::parse`] checks a file's.
impl Embed for ArrayConfig {
    fn open(&self, state_dir: Option<&Path>) -> Result<Box<dyn Transport>, String> {
        self.check()
            .map_err(|e| format!("driver parameters: array.embedded: {e}"))?;
        let mut cfg = self.clone();
        if let (Some(dir), Some(base)) = (&cfg.dir, state_dir) {
            if dir.is_relative() {
                cfg.dir = Some(base.join(dir));
            }
        }
        let engine = Engine::open(&cfg, None).map_err(|e| e.to_string())?;
        Ok(Box::new(Arc::new(engine)))
    }
}
