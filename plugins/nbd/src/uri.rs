//! NBD URIs as the NBD project's `doc/uri.md` writes them (and nbdinfo, qemu and fio take
//! them): `nbd+unix:///NAME?socket=PATH` and `nbd://HOST[:PORT]/NAME`. TLS (`nbds`) and
//! vsock are refused: hvm's client speaks neither.

use std::fmt;
use std::path::PathBuf;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// An export on a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub address: Address,
    pub export: String,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("NBD URI {uri:?}: {why}")]
pub struct UriError {
    uri: String,
    why: String,
}

impl Target {
    /// Parse an NBD URI.
    pub fn parse(uri: &str) -> Result<Target, UriError> {
        let fail = |why: &str| UriError {
            uri: uri.to_string(),
            why: why.to_string(),
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
            fail("expected nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH")
        })?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = decode(path).ok_or_else(|| fail("bad %-escape in the export name"))?;
        let address = match scheme {
            "nbd" | "nbd+tcp" => {
                if query.is_some_and(|q| !q.is_empty()) {
                    return Err(fail("nbd:// takes no query parameters"));
                }
                tcp(authority).map_err(|w| fail(&w))?
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(fail(
                        "nbd+unix:// takes no host (write nbd+unix:///NAME?socket=PATH)",
                    ));
                }
                Address::Unix(socket(query).map_err(|w| fail(&w))?)
            }
            "nbds" | "nbds+unix" | "nbds+tcp" => {
                return Err(fail(
                    "TLS is not supported by hvm's NBD client; use nbd:// or nbd+unix://",
                ))
            }
            other => return Err(fail(&format!("unknown scheme {other:?} (nbd, nbd+unix)"))),
        };
        Ok(Target { address, export })
    }
}

/// `HOST[:PORT]`, `[V6]` or `[V6]:PORT`.
fn tcp(authority: &str) -> Result<Address, String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or("an IPv6 host must be closed with ']'")?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err("unexpected text after the IPv6 host".into()),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
        None => DEFAULT_PORT,
    };
    Ok(Address::Tcp {
        host: host.to_string(),
        port,
    })
}

/// The `socket=PATH` query parameter.
fn socket(query: Option<&str>) -> Result<PathBuf, String> {
    let mut path = None;
    for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=') {
            Some(("socket", v)) => {
                path = Some(decode(v).ok_or("bad %-escape in the socket path")?);
            }
            _ => return Err(format!("unknown query parameter {kv:?} (socket=PATH)")),
        }
    }
    match path {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err("nbd+unix:// needs ?socket=PATH".into()),
    }
}

/// Percent-decoding; `None` for a bad escape or bytes that are not UTF-8.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(uri: &str) -> Target {
        Target::parse(uri).unwrap()
    }

    #[test]
    fn unix_and_tcp_uris() {
        assert_eq!(
            t("nbd+unix:///db-a?socket=/run/nbd/a.sock"),
            Target {
                address: Address::Unix("/run/nbd/a.sock".into()),
                export: "db-a".into()
            }
        );
        assert_eq!(t("nbd+unix://?socket=/s").export, "");
        assert_eq!(t("nbd+unix:///a%20b?socket=/x%2Fy").export, "a b");
        assert_eq!(
            t("nbd://10.0.0.2/db").address,
            Address::Tcp {
                host: "10.0.0.2".into(),
                port: DEFAULT_PORT
            }
        );
        let v6 = t("nbd://[::1]:10900/x");
        assert_eq!(v6.address.to_string(), "[::1]:10900");
        assert_eq!(t("nbd://host:1234").export, "");
        assert_eq!(t("nbd://host:1234").address.to_string(), "host:1234");
        assert_eq!(t("nbd+unix:///e?socket=/s").address.to_string(), "unix:/s");
    }

    #[test]
    fn bad_uris_say_why() {
        let e = |u: &str| Target::parse(u).unwrap_err().to_string();
        assert!(e("/dev/sda").contains("expected nbd://"));
        assert!(e("nbd+unix:///x").contains("needs ?socket=PATH"));
        assert!(e("nbds://h/x").contains("TLS is not supported"));
        assert!(e("nbd://h:port/x").contains("bad port"));
        assert!(e("nbd:///x").contains("no host"));
        assert!(e("nbd+unix:///x?socket=/s&tls=on").contains("unknown query parameter"));
        assert!(e("http://h/x").contains("unknown scheme"));
        assert!(e("nbd://h/%zz").contains("%-escape"));
    }
}
