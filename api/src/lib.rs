//! The control API's wire types: what host-agent's control socket answers and accepts,
//! typed once for the server (`host-agent/src/control.rs`, which serializes them) and
//! the client (`hvmctl`, which deserializes them), instead of string-keyed lookups in
//! JSON on one side.
//!
//! | method and path | request | reply |
//! |---|---|---|
//! | `GET /v1/status` | | [`Status`] |
//! | `GET /v1/lus` | | `Vec<`[`Lu`]`>` |
//! | `GET /v1/lus/{name}/extents` | | [`Extents`] |
//! | `POST`/`DELETE /v1/lus/{name}/snapshot` | | [`SnapshotChange`] |
//! | `POST /v1/lus/{name}/rollback` | | [`Rollback`] |
//! | `POST /v1/lus/{name}/verify` | [`VerifyRequest`] | [`Verify`] |
//! | `POST /v1/lus/{name}/move` | [`MoveRequest`] | [`Move`] |
//! | `GET`/`DELETE /v1/lus/{name}/move` | | [`Move`] |
//! | `GET /v1/resync` | | [`Resync`] |
//! | `POST /v1/resync/pause`, `/resume` | | [`Paused`] |
//! | `PUT /v1/resync/rate` | [`Rate`] | [`Rate`] |
//! | `GET /v1/backends` | | [`Backends`] |
//! | `POST /v1/reload` | | [`Reload`] |
//!
//! Every refusal is an [`ErrorReply`] with an HTTP status ([`ErrorStatus`]).
//!
//! The agent-to-agent coordination service's requests and replies are in [`coord`].
//!
//! Clients ignore fields they do not know, so the server may add fields; renaming or
//! removing one is a change of the API (`/v1`).

pub mod backends;
pub mod coord;
pub mod error;
pub mod lu;
pub mod resync;
pub mod status;

pub use backends::{BackendLu, BackendView, Backends, Journal, JournalStats};
pub use error::{ErrorReply, ErrorStatus};
pub use lu::{
    Extents, Lu, Move, MoveRequest, Pending, Phase, Place, Rollback, SnapshotChange, Tracking,
    Verify, VerifyRequest,
};
pub use resync::{Paused, Rate, Resync, ResyncPair};
pub use status::{Coordination, Reload, ResyncSettings, Role, Status};
