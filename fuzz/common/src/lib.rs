//! The bodies of hvm's fuzz targets. Each takes arbitrary bytes and must neither panic
//! nor hang; cargo-fuzz (`fuzz/fuzz_targets/`) runs them under libFuzzer on nightly, and
//! `tests/tests/fuzz_corpus.rs` replays the committed corpora through the same functions
//! on stable.
//!
//! - [`nbd_handshake`]: a whole NBD connection (greeting, options, transmission) against
//!   host-agent's server over a socket pair.
//! - [`nbd_proto`]: the NBD option and request decoders one by one.
//! - [`scsi`]: CDB parsing and the SCSI data formats (sense, VPD, REPORT LUNS, pair page,
//!   Mode Sense/Select pages).
//! - [`array_frames`]: array-sim's wire frames, each command run by a simulated array.
//! - [`journal_replay`]: the journal replay, and a checkpoint of what it rebuilt.
//! - [`config_yaml`]: host-agent's and array-sim's YAML configs.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex, OnceLock};

use hvm_host_agent::nbd::export::{Export, ExportError, Exports};
use hvm_host_agent::nbd::server as nbd;

/// A 1 MiB export in memory.
struct Memory(Mutex<Vec<u8>>);

impl Memory {
    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, ExportError> {
        let start = usize::try_from(offset).map_err(|_| ExportError::new(22, "offset"))?;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= self.0.lock().map_or(0, |d| d.len()))
            .ok_or_else(|| ExportError::new(22, "past the end"))?;
        Ok(start..end)
    }
}

impl Export for Memory {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        false
    }
    fn multi_conn(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let r = self.range(offset, buf.len())?;
        let d = self.0.lock().map_err(|_| ExportError::new(5, "poisoned"))?;
        buf.copy_from_slice(&d[r]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), ExportError> {
        let r = self.range(offset, data.len())?;
        let mut d = self.0.lock().map_err(|_| ExportError::new(5, "poisoned"))?;
        d[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime for the NBD target")
    })
}

/// `data` is what a client sends on a fresh connection; the server answers as it would
/// any client, and the connection must end once the client has sent everything and
/// read every reply.
pub fn nbd_handshake(data: &[u8]) {
    // The client may still be sending when the server hangs up (it may, on a bad
    // request): that is EPIPE for the sender, not a signal that ends the fuzzer (a
    // libFuzzer binary has no Rust main to ignore SIGPIPE, as host-agent has).
    static IGNORE_SIGPIPE: OnceLock<()> = OnceLock::new();
    IGNORE_SIGPIPE.get_or_init(|| {
        // SAFETY: setting a signal's disposition to SIG_IGN has no handler to be unsafe.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    });
    let Ok((client, server)) = std::os::unix::net::UnixStream::pair() else {
        return;
    };
    let exports: BTreeMap<String, Arc<dyn Export>> = BTreeMap::from([(
        "disk".to_string(),
        Arc::new(Memory(Mutex::new(vec![0u8; 1 << 20]))) as Arc<dyn Export>,
    )]);
    let exports: Arc<dyn Exports> = Arc::new(exports);
    let served = runtime().spawn(async move {
        let _ = server.set_nonblocking(true);
        let Ok(server) = tokio::net::UnixStream::from_std(server) else {
            return;
        };
        let registry = nbd::Connections::default();
        nbd::serve(
            server,
            None,
            exports,
            nbd::Limits::default(),
            &registry,
            None,
        )
        .await;
    });
    let mut writer = match client.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let input = data.to_vec();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&input);
        let _ = writer.shutdown(std::net::Shutdown::Write);
    });
    let mut client = client;
    let mut sink = [0u8; 65536];
    while matches!(client.read(&mut sink), Ok(n) if n > 0) {}
    let _ = sender.join();
    drop(client);
    let _ = runtime().block_on(served);
}

/// Every NBD decoder on slices of `data`.
pub fn nbd_proto(data: &[u8]) {
    use hvm_host_agent::nbd::proto as p;
    if let Some(flags) = data.get(..4) {
        let _ = p::client_flags([flags[0], flags[1], flags[2], flags[3]]);
    }
    if let Some(h) = data.get(..p::OPTION_HEADER_LEN) {
        let mut b = [0u8; p::OPTION_HEADER_LEN];
        b.copy_from_slice(h);
        let _ = p::OptionHeader::parse(&b);
    }
    if let Some(r) = data.get(..p::REQUEST_LEN) {
        let mut b = [0u8; p::REQUEST_LEN];
        b.copy_from_slice(r);
        if let Ok(req) = p::Request::parse(&b) {
            assert_eq!(p::Request::parse(&req.encode()).ok(), Some(req));
        }
    }
    let _ = p::InfoRequest::parse(data);
    let _ = p::MetaContextRequest::parse(data);
}

/// CDB parsing and every SCSI data-format decoder on `data`.
pub fn scsi(data: &[u8]) {
    use array_sim::scsi as s;
    if let Ok(cmd) = s::Command::parse(data) {
        let _ = (cmd.data_in_len(512), cmd.data_out_len(512));
        // What parses encodes to a CDB that parses to the same command.
        assert_eq!(s::Command::parse(&cmd.encode()).ok(), Some(cmd));
    }
    let _ = s::Sense::parse(data);
    let _ = s::decode_read_capacity_16(data);
    let _ = s::decode_report_luns(data);
    let _ = s::mode_page_6(data);
    let _ = s::decode_areas(data);
    let lun = data.first().copied().unwrap_or(0);
    let _ = s::decode_pair_page(lun, data);
    let _ = s::decode_standard_inquiry(data);
    let _ = s::vpd_body(data, lun);
    let _ = s::decode_serial(data);
    let _ = s::decode_identity(data);
    let _ = hvm_core::mode::decode_mode_select(data);
    let _ = hvm_core::mode::decode_mode_sense(data);
    let _ = hvm_core::mode::decode_mirror_page(data);
}

/// The simulated arrays the frames target runs commands on, made once per process.
fn arrays() -> &'static Vec<array_sim::engine::Engine> {
    static ARRAYS: OnceLock<(tempfile::TempDir, Vec<array_sim::engine::Engine>)> = OnceLock::new();
    &ARRAYS
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a directory for the fuzzed arrays");
            let configs = [
                "kind: stateless\ndisks: [{name: d0}, {name: d1}]\nlus:\n  - {lun: 1, blocks: 256, disk: d0}\n  - {lun: 2, blocks: 256, disk: d1}\nmirroring:\n  - {mirror: 0, origin: 1, mate: 2}\n",
                "kind: mode-select\ndisks: [{name: d0}, {name: d1}]\nlus:\n  - {lun: 1, blocks: 256, disk: d0}\n  - {lun: 4, blocks: 256, disk: d1}\n  - {lun: 10, blocks: 256, disk: d0}\n  - {lun: 11, blocks: 256, disk: d1}\nmirroring:\n  - {lu: 1, mates: [4]}\nbackup:\n  devices: [{name: t0, file: t0.rec}]\n",
                "kind: pre-update\ndisks: [{name: d0}, {name: d1}]\nlus:\n  - {lun: 0, blocks: 256, disk: d0}\n  - {lun: 1, blocks: 256, disk: d1}\n  - {lun: 9, blocks: 256, disk: d1}\nmirroring:\n  - {mirror: 0, mate: 1}\n",
            ];
            let engines = configs
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let cfg = array_sim::config::ArrayConfig::parse(c, "fuzz.yaml")
                        .expect("the fuzz arrays' configs parse");
                    let at = dir.path().join(i.to_string());
                    array_sim::engine::Engine::open(&cfg, Some(&at)).expect("open a fuzz array")
                })
                .collect();
            (dir, engines)
        })
        .1
}

/// `data` as the byte stream of a connection to an array-sim daemon: each whole frame
/// the server would accept is parsed and its command run by a simulated array (the
/// first byte picks which), as the daemon does. SET FAULT is left out: an injected
/// delay is the array doing what it was told, and would only stall the fuzzer.
pub fn array_frames(data: &[u8]) {
    use array_sim::proto;
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    let engines = arrays();
    let engine = &engines[usize::from(pick) % engines.len()];
    while let Ok(len) = proto::check(rest) {
        let body = &rest[4..4 + len];
        rest = &rest[4 + len..];
        let Ok(req) = proto::Request::parse(body) else {
            return; // the daemon closes the connection here
        };
        if req.cdb.first() == Some(&array_sim::scsi::VENDOR_SET_FAULT) {
            continue;
        }
        let _ = engine.execute(req.lun, req.cdb, req.data);
    }
}

/// Replay `data` as a journal file; what it rebuilds, written as a checkpoint and
/// replayed again, must rebuild the same state.
pub fn journal_replay(data: &[u8]) {
    use hvm_core::journal;
    let Ok(r) = journal::replay(data) else {
        return;
    };
    assert!(r.valid_len as usize <= data.len());
    let checkpoint = r.state.checkpoint();
    let mut bytes = journal::header().to_vec();
    for rec in &checkpoint {
        journal::encode_record(rec, &mut bytes);
    }
    let again = journal::replay(&bytes).expect("a checkpoint replays");
    assert_eq!(again.state.checkpoint(), checkpoint);
}

/// `data` as the text of a host-agent config and of an array-sim config.
pub fn config_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = hvm_host_agent::config::Config::parse(text, "fuzz.yaml") {
        let _ = e.to_string();
    }
    if let Err(e) = array_sim::config::ArrayConfig::parse(text, "fuzz.yaml") {
        let _ = e.to_string();
    }
    let path = text.lines().next().unwrap_or("");
    let _ = hvm_host_agent::config::line_of(text, path);
}
