//! The agent's record of where virtual LUs' data lives, `<state_dir>/placement.json`.
//!
//! The config names where each virtual LU was created: its backend and mirror LU (its
//! home, whose journal keeps its tables). A move routes the home LUs to another backend's
//! LUs; the routes live here, not in the config, so a move never needs a hand edit.
//! The file also records the identity of every LU each virtual LU uses, so that a restart
//! on other LUs (a config edited to point elsewhere) is refused instead of serving
//! someone else's or an empty LU. Written atomically: a temporary file, fsync, rename,
//! fsync of the directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::routed::Place;

/// A move under way when the file was written: the virtual LU and where it was going.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub vlu: String,
    pub to: Vec<Place>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Home backend -> home LU -> where its data is (only LUs that are not at home).
    #[serde(default)]
    pub routes: BTreeMap<String, BTreeMap<u32, Place>>,
    /// Virtual LU -> the identities of the LUs it uses, its mirroring definition's
    /// primary first.
    #[serde(default)]
    pub identities: BTreeMap<String, Vec<String>>,
    /// A move that had not switched yet.
    #[serde(default)]
    pub moving: Option<MoveRecord>,
}

/// The placement file of `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("placement.json")
}

impl Placement {
    /// Read `path`; a missing file is an empty placement (every LU at home).
    pub fn load(path: &Path) -> Result<Placement, String> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Placement::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Write `path` so that a crash leaves either the old file or this one.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::files::replace_file(path, &bytes)
    }

    /// Where home LU `lu` of backend `home` is.
    pub fn place(&self, home: &str, lu: u32) -> Place {
        self.routes
            .get(home)
            .and_then(|r| r.get(&lu))
            .cloned()
            .unwrap_or_else(|| Place {
                backend: home.to_string(),
                lu,
            })
    }

    /// Record that home LU `lu` of `home` is now at `to`.
    pub fn route(&mut self, home: &str, lu: u32, to: Place) {
        let routes = self.routes.entry(home.to_string()).or_default();
        if to.backend == home && to.lu == lu {
            routes.remove(&lu);
        } else {
            routes.insert(lu, to);
        }
        if routes.is_empty() {
            self.routes.remove(home);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_and_routes_home_as_no_route() {
        let dir = tempfile::tempdir().expect("dir");
        let p = path(dir.path());
        assert_eq!(Placement::load(&p).expect("missing"), Placement::default());
        let mut pl = Placement::default();
        let legs = |lu| Place {
            backend: "legs0".into(),
            lu,
        };
        pl.route("array0", 0, legs(3));
        pl.identities.insert("db".into(), vec!["a".into()]);
        pl.moving = Some(MoveRecord {
            vlu: "db".into(),
            to: vec![legs(3)],
        });
        pl.save(&p).expect("save");
        let back = Placement::load(&p).expect("load");
        assert_eq!(back, pl);
        assert_eq!(back.place("array0", 0), legs(3));
        assert_eq!(back.place("array0", 1).backend, "array0");
        let mut home = back;
        home.route(
            "array0",
            0,
            Place {
                backend: "array0".into(),
                lu: 0,
            },
        );
        assert!(home.routes.is_empty());
        std::fs::write(&p, b"{\"routes\": 7}").expect("write");
        assert!(Placement::load(&p).unwrap_err().contains("placement.json"));
    }
}
