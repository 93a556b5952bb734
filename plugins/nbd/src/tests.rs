//! The client against a scripted server, where a real server would hide the case: error
//! chunks, replies out of order, holes, short replies, stray cookies, silence; and the
//! leg's FUA emulation, WRITE_ZEROES, reconnect and backoff.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvm_core::backend::BackendErrorKind;
use hvm_legs::Leg;

use crate::conn::ConnError;
use crate::fake::{pair, target, Fake, Offer};
use crate::proto::*;
use crate::NbdLeg;

const T: Duration = Duration::from_secs(10);

#[test]
fn handshake_negotiates_structured_replies_and_block_sizes() {
    let (c, _f) = pair(Offer::default(), T);
    let e = c.export();
    assert!(e.structured);
    assert_eq!(e.size, 1 << 20);
    assert_eq!(e.max_payload, 64 * 1024);
    assert!(e.can(FLAG_SEND_FUA) && e.can(FLAG_SEND_WRITE_ZEROES));
    let (c, _f) = pair(
        Offer {
            structured: false,
            block: None,
            ..Offer::default()
        },
        T,
    );
    assert!(!c.export().structured);
    assert_eq!(c.export().max_payload, DEFAULT_MAX_PAYLOAD);
}

#[test]
fn a_read_is_assembled_from_data_and_hole_chunks_in_any_order() {
    let (c, mut f) = pair(Offer::default(), T);
    let server = std::thread::spawn(move || {
        let r = f.request();
        assert_eq!((r.kind, r.offset, r.len), (CMD_READ, 4096, 3072));
        // The last 1024 bytes first, then a hole in the middle, then the first 1024.
        f.data_chunk(r.cookie, false, 4096 + 2048, &[3; 1024]);
        let mut hole = (4096u64 + 1024).to_be_bytes().to_vec();
        hole.extend_from_slice(&1024u32.to_be_bytes());
        f.chunk(r.cookie, 0, REPLY_TYPE_OFFSET_HOLE, &hole);
        f.data_chunk(r.cookie, false, 4096, &[1; 1024]);
        f.chunk(r.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]);
        f
    });
    let mut buf = vec![9u8; 3072];
    c.read(4096, &mut buf).unwrap();
    assert!(buf[..1024].iter().all(|&b| b == 1));
    assert!(buf[1024..2048].iter().all(|&b| b == 0));
    assert!(buf[2048..].iter().all(|&b| b == 3));
    server.join().unwrap();
}

#[test]
fn a_structured_error_chunk_fails_the_request_and_the_connection_goes_on() {
    let (c, mut f) = pair(Offer::default(), T);
    let server = std::thread::spawn(move || {
        let r = f.request();
        f.error_chunk(r.cookie, EIO, "bad sector 8");
        let r = f.request();
        f.data_chunk(r.cookie, true, r.offset, &vec![7; r.len as usize]);
        let w = f.request();
        assert_eq!(w.data, vec![5; 512]);
        f.error_chunk(w.cookie, ENOSPC, "");
    });
    let mut buf = vec![0u8; 512];
    let e = c.read(0, &mut buf).unwrap_err();
    assert_eq!(
        e,
        ConnError::Server {
            errno: EIO,
            message: "bad sector 8".into()
        }
    );
    assert!(e.to_string().contains("EIO (5): bad sector 8"), "{e}");
    assert!(!c.is_dead());
    c.read(512, &mut buf).unwrap();
    assert_eq!(buf, vec![7; 512]);
    let t = c.send(CMD_WRITE, 0, 0, 512, &[5; 512], None).unwrap();
    assert!(matches!(
        c.wait(t),
        Err(ConnError::Server { errno: ENOSPC, .. })
    ));
    server.join().unwrap();
}

#[test]
fn replies_in_reverse_order_reach_their_callers() {
    let (c, mut f) = pair(Offer::default(), T);
    let c = Arc::new(c);
    const N: u64 = 8;
    let server = std::thread::spawn(move || {
        let reqs: Vec<_> = (0..N).map(|_| f.request()).collect();
        for r in reqs.iter().rev() {
            if r.kind == CMD_READ {
                let fill = (r.offset / 512) as u8;
                f.data_chunk(r.cookie, true, r.offset, &vec![fill; r.len as usize]);
            } else {
                f.simple(r.cookie, 0, &[]);
            }
        }
    });
    std::thread::scope(|s| {
        for i in 0..N {
            let c = &c;
            s.spawn(move || {
                if i % 2 == 0 {
                    let mut b = vec![0u8; 512];
                    c.read(i * 512, &mut b).unwrap();
                    assert!(b.iter().all(|&x| x == i as u8), "reader {i}");
                } else {
                    let t = c.send(CMD_WRITE, 0, i * 512, 512, &[1; 512], None).unwrap();
                    c.wait(t).unwrap();
                }
            });
        }
    });
    server.join().unwrap();
}

#[test]
fn a_short_reply_drops_the_connection_with_eio() {
    let (c, mut f) = pair(
        Offer {
            structured: false,
            ..Offer::default()
        },
        T,
    );
    let server = std::thread::spawn(move || {
        let r = f.request();
        f.simple(r.cookie, 0, &[1; 100]); // 100 of 512 bytes, then the server is gone
    });
    let mut buf = vec![0u8; 512];
    let e = c.read(0, &mut buf).unwrap_err();
    assert_eq!(
        e,
        ConnError::Lost("the server closed the connection".into())
    );
    assert!(c.is_dead());
    server.join().unwrap();
    let e = c.send(CMD_FLUSH, 0, 0, 0, &[], None).err().unwrap();
    assert!(matches!(e, ConnError::Lost(_)), "{e}");
}

#[test]
fn a_reply_for_an_unknown_cookie_drops_the_connection() {
    let (c, mut f) = pair(Offer::default(), T);
    let t1 = c.send(CMD_FLUSH, 0, 0, 0, &[], None).unwrap();
    let t2 = c.send(CMD_WRITE, 0, 0, 512, &[0; 512], None).unwrap();
    f.request();
    f.request();
    f.simple(999, 0, &[]);
    let msg = "connection lost: reply for cookie 999, which is not in flight";
    assert_eq!(c.wait(t1).unwrap_err().to_string(), msg);
    assert_eq!(c.wait(t2).unwrap_err().to_string(), msg);
    assert!(c.is_dead());
}

#[test]
fn protocol_violations_drop_the_connection() {
    // A content chunk past the request, a READ answered with too few bytes, a data
    // chunk for a WRITE, an unknown non-error chunk type, a bad magic.
    type Script = fn(&mut Fake, u64, u64);
    let cases: [(Script, &str); 5] = [
        (
            |f, c, off| f.data_chunk(c, true, off + 256, &[0; 512]),
            "outside the READ",
        ),
        (
            |f, c, off| f.data_chunk(c, true, off, &[0; 256]),
            "256 of 512 bytes",
        ),
        (
            |f, _, _| {
                let w = f.request();
                f.data_chunk(w.cookie, true, 0, &[0; 8]);
            },
            "not a READ",
        ),
        (
            |f, c, _| f.chunk(c, REPLY_FLAG_DONE, 77, &[]),
            "unknown structured reply type 77",
        ),
        (
            |f, _, _| {
                use std::io::Write;
                f.s.write_all(&[0xde, 0xad, 0xbe, 0xef]).unwrap();
            },
            "bad reply magic",
        ),
    ];
    for (script, want) in cases {
        let (c, mut f) = pair(Offer::default(), T);
        let c = Arc::new(c);
        let c2 = Arc::clone(&c);
        let write = std::thread::spawn(move || {
            let t = c2.send(CMD_WRITE, 0, 0, 512, &[0; 512], None);
            t.and_then(|t| c2.wait(t))
        });
        let reader = std::thread::spawn({
            let c = Arc::clone(&c);
            move || c.read(1024, &mut [0u8; 512])
        });
        // Find the READ among the two requests; leave the WRITE for the script.
        let first = f.request();
        let (read, pending_write) = if first.kind == CMD_READ {
            (first, None)
        } else {
            (f.request(), Some(first))
        };
        if let Some(w) = pending_write {
            // Put the WRITE back in front for scripts that read it: answer it instead.
            if want == "not a READ" {
                f.data_chunk(w.cookie, true, 0, &[0; 8]);
            } else {
                f.simple(w.cookie, 0, &[]);
                script(&mut f, read.cookie, read.offset);
            }
        } else {
            script(&mut f, read.cookie, read.offset);
        }
        let e = reader.join().unwrap().unwrap_err();
        assert!(e.to_string().contains(want), "{want}: {e}");
        let _ = write.join().unwrap();
        assert!(c.is_dead(), "{want}");
    }
}

#[test]
fn a_silent_server_times_out_with_eio_and_the_connection_is_dropped() {
    let (c, mut f) = pair(Offer::default(), Duration::from_millis(200));
    let server = std::thread::spawn(move || {
        let _ = f.request();
        // Never answers; sees the client hang up.
        let mut b = [0u8; 1];
        use std::io::Read;
        assert_eq!(f.s.read(&mut b).unwrap(), 0);
    });
    let start = Instant::now();
    let e = c.read(0, &mut [0u8; 512]).unwrap_err();
    assert_eq!(e, ConnError::Timeout(200));
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert!(c.is_dead());
    server.join().unwrap();
}

fn leg(offer: Offer) -> (NbdLeg, Fake) {
    let (c, f) = pair(offer, T);
    (NbdLeg::with_conn("fake", target(), T, c), f)
}

#[test]
fn fua_is_passed_through_or_emulated_with_a_flush() {
    let (l, mut f) = leg(Offer::default());
    let s = std::thread::spawn(move || {
        let w = f.request();
        assert_eq!((w.kind, w.flags), (CMD_WRITE, CMD_FLAG_FUA));
        f.simple(w.cookie, 0, &[]);
    });
    l.write(0, &[1; 512], true).unwrap();
    s.join().unwrap();

    let offer = Offer {
        flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
        ..Offer::default()
    };
    let (l, mut f) = leg(offer);
    let s = std::thread::spawn(move || {
        let w = f.request();
        assert_eq!((w.kind, w.flags), (CMD_WRITE, 0));
        f.simple(w.cookie, 0, &[]);
        let fl = f.request();
        assert_eq!(fl.kind, CMD_FLUSH);
        f.simple(fl.cookie, 0, &[]);
        // write_zeroes without WRITE_ZEROES: zero buffers.
        let z = f.request();
        assert_eq!((z.kind, z.offset, z.data), (CMD_WRITE, 1024, vec![0; 2048]));
        f.simple(z.cookie, 0, &[]);
    });
    l.write(0, &[1; 512], true).unwrap();
    l.write_zeroes(1024, 2048, true, false).unwrap();
    s.join().unwrap();
}

#[test]
fn writes_are_split_at_the_maximum_payload_and_zeroes_use_write_zeroes() {
    let (l, mut f) = leg(Offer::default()); // max payload 64 KiB
    let s = std::thread::spawn(move || {
        let a = f.request();
        let b = f.request();
        assert_eq!((a.offset, a.len, b.offset, b.len), (0, 65536, 65536, 4096));
        f.simple(b.cookie, 0, &[]);
        f.simple(a.cookie, 0, &[]);
        let z = f.request();
        assert_eq!(
            (z.kind, z.flags, z.len),
            (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 8192)
        );
        f.simple(z.cookie, 0, &[]);
        let z = f.request();
        assert_eq!((z.kind, z.flags), (CMD_WRITE_ZEROES, CMD_FLAG_FUA));
        f.simple(z.cookie, 0, &[]);
    });
    l.write(0, &vec![2; 65536 + 4096], false).unwrap();
    l.write_zeroes(0, 8192, false, false).unwrap();
    l.write_zeroes(0, 8192, true, true).unwrap();
    s.join().unwrap();
    assert_eq!(l.identity(), "nbd unix:/fake.sock export e size 1048576");
    assert_eq!(l.size(), 1 << 20);
}

#[test]
fn write_both_has_both_legs_in_flight_before_waiting() {
    let (a, mut fa) = leg(Offer::default());
    let (b, mut fb) = leg(Offer::default());
    // Each server answers only once the other has seen its request: this completes
    // only if both writes were sent before either was waited for.
    let (tx_a, rx_a) = std::sync::mpsc::channel();
    let (tx_b, rx_b) = std::sync::mpsc::channel();
    let sa = std::thread::spawn(move || {
        let r = fa.request();
        tx_a.send(()).unwrap();
        rx_b.recv().unwrap();
        fa.simple(r.cookie, 0, &[]);
    });
    let sb = std::thread::spawn(move || {
        let r = fb.request();
        tx_b.send(()).unwrap();
        rx_a.recv().unwrap();
        fb.simple(r.cookie, 0, &[]);
    });
    a.write_both(&b, 0, &[3; 512], false).unwrap().unwrap();
    sa.join().unwrap();
    sb.join().unwrap();
}

/// A server on a Unix socket that serves `conns` connections, each for one request.
fn serve(listener: UnixListener, offers: Vec<Offer>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for offer in offers {
            let (s, _) = listener.accept().unwrap();
            let mut f = Fake { s };
            f.serve_handshake(offer);
            let r = f.request();
            f.simple(r.cookie, 0, &[]);
            // Then the server "crashes": the connection closes.
        }
    })
}

#[test]
fn a_lost_server_fails_fast_and_the_leg_reconnects_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let uri = format!("nbd+unix:///e?socket={}", sock.display());
    let server = serve(UnixListener::bind(&sock).unwrap(), vec![Offer::default()]);
    let l = NbdLeg::open(&uri, T).unwrap();
    l.write(0, &[1; 512], false).unwrap();
    server.join().unwrap(); // listener and connection closed: the server is down
    std::fs::remove_file(&sock).unwrap();

    // The connection is found dead (or dies under the request); then the reconnect
    // attempt fails, and the next request inside the backoff fails without trying.
    let deadline = Instant::now() + T;
    let e = loop {
        let e = l.write(0, &[1; 512], false).unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::Io, "{e}");
        if e.message.contains("reconnect") {
            break e;
        }
        assert!(Instant::now() < deadline, "{e}");
    };
    assert!(
        e.message.starts_with(&format!("NBD leg {uri}: reconnect")),
        "{e}"
    );
    let e = l.flush().unwrap_err();
    assert!(e.message.contains("next attempt in"), "{e}");

    // The server is back: after the backoff the leg connects again.
    let server = serve(UnixListener::bind(&sock).unwrap(), vec![Offer::default()]);
    let deadline = Instant::now() + T;
    while let Err(e) = l.write(0, &[2; 512], false) {
        assert!(Instant::now() < deadline, "never reconnected: {e}");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.join().unwrap();

    // A server that comes back with an export of another size is not the same storage.
    let other = Offer {
        size: 2 << 20,
        ..Offer::default()
    };
    std::fs::remove_file(&sock).unwrap();
    let listener = UnixListener::bind(&sock).unwrap();
    let s = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        Fake { s }.serve_handshake(other);
    });
    let deadline = Instant::now() + T;
    let e = loop {
        let e = l.write(0, &[1; 512], false).unwrap_err();
        if e.message.contains("not the same storage") {
            break e;
        }
        assert!(Instant::now() < deadline, "{e}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        e.message.contains("now 2097152 bytes, it was 1048576"),
        "{e}"
    );
    s.join().unwrap();
}

#[test]
fn exports_a_leg_cannot_use_are_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let uri = format!("nbd+unix:///e?socket={}", sock.display());
    let cases = [
        (
            Offer {
                flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY,
                ..Offer::default()
            },
            "read-only",
        ),
        (
            Offer {
                block: Some((4096, 4096, 65536)),
                ..Offer::default()
            },
            "minimum block size is 4096",
        ),
    ];
    for (offer, want) in cases {
        let listener = UnixListener::bind(&sock).unwrap();
        let s = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            Fake { s }.serve_handshake(offer);
        });
        let e = NbdLeg::open(&uri, T).err().unwrap();
        assert!(e.starts_with(&uri) && e.contains(want), "{e}");
        s.join().unwrap();
        std::fs::remove_file(&sock).unwrap();
    }
    let e = NbdLeg::open(&uri, T).err().unwrap();
    assert!(e.contains("connect to unix:"), "{e}");
}

#[test]
fn parameters_are_checked() {
    let e = crate::open_volumes("volumes: [{lu: 0, legs: ['nbd://h/x']}]")
        .err()
        .unwrap();
    assert!(e.contains("expected two"), "{e}");
    let e = crate::open_volumes("volumes: [{lu: 0, legs: ['/dev/sda', 'nbd://h/x']}]")
        .err()
        .unwrap();
    assert!(
        e.contains("\"/dev/sda\"") && e.contains("expected nbd://"),
        "{e}"
    );
    let e = crate::open_volumes("timeout: 5\nvolumes: []")
        .err()
        .unwrap();
    assert!(e.contains("unknown field `timeout`"), "{e}");
    let e = crate::open_volumes("timeout_ms: 0\nvolumes: []")
        .err()
        .unwrap();
    assert!(e.contains("at least 1"), "{e}");
    assert!(crate::open_volumes("state_dir: /x\nvolumes: []").is_ok());
}

#[test]
fn after_a_timeout_requests_fail_at_once_until_the_backoff_has_passed() {
    let t = Duration::from_millis(200);
    let (c, mut f) = pair(Offer::default(), t);
    let l = NbdLeg::with_conn("fake", target(), t, c);
    let server = std::thread::spawn(move || {
        let _ = f.request(); // never answered
        let mut b = [0u8; 1];
        use std::io::Read;
        let _ = f.s.read(&mut b);
    });
    let e = l.write(0, &[1; 512], false).unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Io);
    assert!(e.message.contains("no reply within 200 ms"), "{e}");
    // A stopped server would hang a handshake as long: no reconnect attempt yet.
    let e = l.flush().unwrap_err();
    assert!(
        e.message
            .contains("server unreachable (no reply within 200 ms")
            && e.message.contains("next attempt in"),
        "{e}"
    );
    server.join().unwrap();
}

#[test]
fn a_mirrored_write_waits_for_both_legs_and_reports_either_failure() {
    for failing in [0usize, 1] {
        let (a, fa) = leg(Offer::default());
        let (b, fb) = leg(Offer::default());
        // The failing leg answers only after the other has answered, so the caller must
        // not return on the first reply.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let mut rx = Some(rx);
        let mut tx = Some(tx);
        let servers: Vec<_> = [fa, fb]
            .into_iter()
            .enumerate()
            .map(|(i, mut f)| {
                let (tx, rx) = if i == failing {
                    (None, rx.take())
                } else {
                    (tx.take(), None)
                };
                std::thread::spawn(move || {
                    let r = f.request();
                    if let Some(rx) = rx {
                        rx.recv().unwrap();
                        f.simple(r.cookie, ENOSPC, &[]);
                    } else {
                        f.simple(r.cookie, 0, &[]);
                        tx.unwrap().send(()).unwrap();
                    }
                })
            })
            .collect();
        let e = a.write_both(&b, 0, &[4; 512], false).unwrap().unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::Io);
        assert!(e.message.contains("ENOSPC"), "{e}");
        for s in servers {
            s.join().unwrap();
        }
    }
}
