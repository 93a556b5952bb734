//! The composition root: what serves a [`Host`]. [`listen`] binds the listeners (NBD on
//! the Unix socket and on TCP, the control API, the coordination service); [`serve`]
//! runs them and the resync service until a stop, then drains the connections and
//! checkpoints the journals; [`run`] is the whole service as the binary runs it (with
//! `listen.tls`, `listen.metrics`, `control_group`, SIGHUP reloads, journal retries and
//! sd_notify). The handlers (control API, coordination) borrow the [`Host`]; nothing
//! they import imports this module.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agent::AgentError;
use crate::config::Config;
use crate::coord::server::Service;
use crate::host::Host;
use crate::nbd::export::Exports;
use crate::nbd::server::{self, Limits};
use crate::notify::notify;
use crate::resync;

/// The bound sockets of a host.
pub struct Listeners {
    pub unix: tokio::net::UnixListener,
    pub control: tokio::net::UnixListener,
    pub tcp: Option<tokio::net::TcpListener>,
    /// `listen.tls`: connections on `tcp` upgrade with STARTTLS first.
    pub nbd_tls: Option<Arc<rustls::ServerConfig>>,
    /// The coordination service's TLS listener.
    pub coordination: Option<(tokio::net::TcpListener, Arc<Service>)>,
}

/// Bind the configured sockets (a stale Unix socket file is replaced); load the
/// coordination service's TLS files and token.
pub async fn listen(host: &Arc<Host>) -> Result<Listeners, AgentError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AgentError::Io { path, source }
    };
    if let Some(parent) = host.socket.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    if std::fs::symlink_metadata(&host.socket).is_ok() {
        std::fs::remove_file(&host.socket).map_err(io(&host.socket))?;
    }
    let unix = tokio::net::UnixListener::bind(&host.socket).map_err(io(&host.socket))?;
    let control = crate::control::bind(&host.control).map_err(io(&host.control))?;
    let tcp = match &host.tcp {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io(Path::new(addr)))?,
        ),
        None => None,
    };
    if let Some(a) = tcp.as_ref().and_then(|t| t.local_addr().ok()) {
        let _ = host.tcp_bound.set(a.to_string());
    }
    let coordination = match &host.coordination {
        Some(c) => {
            let svc = Arc::new(Service::new(host.clone(), c.clone())?);
            let listener = svc.bind().await?;
            if let Ok(a) = listener.local_addr() {
                tracing::info!(address = %a, roles = ?c.roles, "coordination service listening (TLS)");
            }
            Some((listener, svc))
        }
        None => None,
    };
    Ok(Listeners {
        unix,
        tcp,
        nbd_tls: None,
        control,
        coordination,
    })
}

/// Serve the exports on `listeners`, and run the resync service, until `shutdown`
/// completes; then drain the connections (requests taken are answered), stop the resync
/// and write each journal as an exact checkpoint.
pub async fn serve(host: &Arc<Host>, listeners: Listeners, shutdown: impl Future<Output = ()>) {
    let exports: Arc<dyn Exports> = host.exports.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    let backends: Vec<resync::Backend> = host
        .managers
        .iter()
        .map(|(name, mgr)| resync::Backend {
            name: name.clone(),
            mgr: mgr.clone(),
            journal: host.journals.get(name).cloned(),
        })
        .collect();
    let ctl = host.resync.clone();
    let resync = std::thread::Builder::new()
        .name("resync".into())
        .spawn(move || resync::run(&backends, &ctl));
    let mut tasks = vec![tokio::spawn(server::run_unix(
        listeners.unix,
        exports.clone(),
        Limits::default(),
        stopped(stop_rx.clone()),
    ))];
    if let Some(tcp) = listeners.tcp {
        tasks.push(tokio::spawn(server::run_tcp_tls(
            tcp,
            exports,
            Limits::default(),
            listeners.nbd_tls,
            stopped(stop_rx.clone()),
        )));
    }
    if let Some((listener, svc)) = listeners.coordination {
        tasks.push(tokio::spawn(svc.run(listener, stopped(stop_rx.clone()))));
    }
    tasks.push(tokio::spawn(crate::control::serve(
        listeners.control,
        host.clone(),
        stopped(stop_rx),
    )));
    shutdown.await;
    tracing::info!("stopping: draining connections");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    host.resync.stop();
    if let Ok(t) = resync {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    host.close();
}

/// Completes when `rx` changes (the stop).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.changed().await;
}

/// The whole service, as the binary runs it: bind, print the serving line, tell the
/// service manager, serve until SIGTERM or Ctrl-C, reload on SIGHUP, retry failed
/// journals. `base` is the config file's directory.
pub async fn run(host: Arc<Host>, cfg: &Config, base: &Path) -> Result<(), AgentError> {
    // With listen.tls the NBD TCP listener's connections are upgraded with STARTTLS.
    let nbd_tls = nbd_tls_config(cfg, base).map_err(|reason| AgentError::Listen { reason })?;
    let mut listeners = listen(&host).await?;
    listeners.nbd_tls = nbd_tls;
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = admin_extras(cfg, &host, stop_rx).await?;
    // Scripts and tests wait for this line: the sockets are bound.
    println!(
        "{}",
        serving_line(&host, &listeners, metrics.as_ref().map(|m| m.0))
    );
    tracing::info!(socket = %host.socket.display(), tcp = ?host.tcp_bound.get(), control = %host.control.display(), "serving");
    let status = format!("serving {} virtual LUs", host.virtual_lus.len());
    notify(&format!("READY=1\nSTATUS={status}"));
    let reloads = tokio::spawn(reload_on_sighup(host.clone(), status));
    let retries = tokio::spawn(retry_failed_journals(host.clone()));
    serve(&host, listeners, async {
        shutdown_signal().await;
        notify("STOPPING=1\nSTATUS=draining connections");
        let _ = stop_tx.send(true);
    })
    .await;
    if let Some((_, m)) = metrics {
        let _ = m.await;
    }
    reloads.abort();
    retries.abort();
    Ok(())
}

/// On each SIGHUP: reload the config (see [`crate::reload`]), telling the service
/// manager around it.
async fn reload_on_sighup(host: Arc<Host>, status: String) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGHUP; reload through the control API");
            return;
        }
    };
    while hup.recv().await.is_some() {
        notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            crate::notify::monotonic_usec()
        ));
        let h = host.clone();
        let report = tokio::task::spawn_blocking(move || h.reload()).await;
        let line = match report {
            Ok(r) if r.error.is_some() => "reload failed; config unchanged".to_string(),
            Ok(r) if !r.needs_restart.is_empty() => {
                format!(
                    "reloaded; {} change(s) need a restart",
                    r.needs_restart.len()
                )
            }
            _ => "reloaded".to_string(),
        };
        notify(&format!("READY=1\nSTATUS={status}; {line}"));
    }
}

/// The line scripts and tests wait for: what is served where (listen() recorded the TCP
/// listener's bound address).
fn serving_line(host: &Host, listeners: &Listeners, metrics: Option<SocketAddr>) -> String {
    let coord = listeners
        .coordination
        .as_ref()
        .and_then(|(l, _)| l.local_addr().ok());
    format!(
        "host-agent: serving {} virtual LUs on unix:{}{}{}{}",
        host.virtual_lus.len(),
        host.socket.display(),
        host.tcp_bound
            .get()
            .map(|t| format!(" and tcp:{t}"))
            .unwrap_or_default(),
        coord
            .map(|c| format!(", coordination on tls:{c}"))
            .unwrap_or_default(),
        metrics
            .map(|a| format!(", metrics on http://{a}/metrics"))
            .unwrap_or_default()
    )
}

/// serve() ends with a checkpoint of every journal; one that failed is not a clean stop:
/// the next start replays the older file and copies more than needed, or finds the state
/// dir still full.
pub fn unsaved_journals(host: &Host) -> Option<String> {
    let unsaved: Vec<String> = host
        .journals
        .iter()
        .filter_map(|(name, j)| {
            j.failure()
                .map(|why| format!("backend {name}: journal {}: {why}", j.path().display()))
        })
        .collect();
    (!unsaved.is_empty()).then(|| unsaved.join("; "))
}

/// The metrics listener's bound address (the port chosen when it was 0) and its task.
type MetricsTask = (SocketAddr, JoinHandle<()>);

/// What an admin's config adds once the sockets are bound: `control_group` on the
/// control socket, and with `listen.metrics` a listener serving `GET /metrics` until
/// `stop` changes.
async fn admin_extras(
    cfg: &Config,
    host: &Arc<Host>,
    stop: watch::Receiver<bool>,
) -> Result<Option<MetricsTask>, AgentError> {
    if let Some(group) = &cfg.control_group {
        crate::control::share_with_group(&host.control, group).map_err(|source| {
            AgentError::Io {
                path: host.control.clone(),
                source,
            }
        })?;
    }
    serve_metrics(cfg, host, stop).await
}

/// With `listen.metrics`: bind it and serve `GET /metrics` there until `stop` changes.
async fn serve_metrics(
    cfg: &Config,
    host: &Arc<Host>,
    stop: watch::Receiver<bool>,
) -> Result<Option<MetricsTask>, AgentError> {
    let Some(addr) = &cfg.listen.metrics else {
        return Ok(None);
    };
    let io = |source| AgentError::Io {
        path: PathBuf::from(format!("listen.metrics {addr}")),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(io)?;
    let bound = listener.local_addr().map_err(io)?;
    tracing::info!(address = %bound, "metrics listening (GET /metrics, plain HTTP)");
    let task = tokio::spawn(crate::control::serve_metrics(
        listener,
        host.clone(),
        stopped(stop),
    ));
    Ok(Some((bound, task)))
}

/// The TLS server config of `listen.tls` (files relative to the config's directory).
pub fn nbd_tls_config(
    cfg: &Config,
    base: &Path,
) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
    let Some(t) = &cfg.listen.tls else {
        return Ok(None);
    };
    let at = |p: &Path| base.join(p);
    crate::coord::tls::mutual_server_config(&at(&t.cert), &at(&t.key), &at(&t.ca))
        .map(Some)
        .map_err(|e| format!("listen.tls: {e}"))
}

/// Write failed journals again now and then, so the host recovers when the disk has room
/// again even while no write comes to do it.
async fn retry_failed_journals(host: Arc<Host>) {
    let mut tick = tokio::time::interval(crate::durable::RETRY_EVERY);
    loop {
        tick.tick().await;
        let failed: Vec<_> = host
            .journals
            .values()
            .filter(|j| j.failure().is_some())
            .cloned()
            .collect();
        for j in failed {
            let _ = tokio::task::spawn_blocking(move || j.retry()).await;
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
