//! Hot reload of the routes file: on a change of the file (notify, watching
//! its directory so that editors' atomic renames are seen) or on SIGHUP,
//! both through one path. Changes are debounced; a valid file replaces the
//! routes at once (sessions pick up policy changes, see `session`), an
//! invalid one is rejected whole and the running routes stay.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn};

use crate::{
    client::unix_ms,
    config::load_routes,
    metrics::{ConfigStatus, Metrics},
    registry::RouteRegistry,
};

/// Quiet time after the last file event before reloading: editors write
/// files in several steps.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Loads the file and installs it, or keeps the running routes. Returns
/// whether the new file was applied. A valid file after a rejected one is
/// logged at info even when it changes nothing (the usual case: the edit
/// that broke the file was undone), so the log says the problem is over.
pub fn reload(path: &Path, registry: &RouteRegistry, metrics: &Metrics) -> bool {
    let was_rejected = metrics.config_status().is_some_and(|s| !s.ok);
    match load_routes(path) {
        Ok(table) => {
            let routes = table.routes().len();
            let changes = registry.replace_file(table);
            match (changes.is_empty(), was_rejected) {
                (true, false) => debug!("routes file reloaded: no change"),
                (true, true) => info!(
                    file = %path.display(),
                    "routes file valid again after a rejected edit; the running routes match it"
                ),
                (false, false) => {
                    info!(added = ?changes.added, removed = ?changes.removed, modified = ?changes.modified, "routes reloaded")
                }
                (false, true) => {
                    info!(added = ?changes.added, removed = ?changes.removed, modified = ?changes.modified, "routes file valid again after a rejected edit: routes reloaded")
                }
            }
            metrics.config_reloaded(ConfigStatus {
                ok: true,
                path: path.display().to_string(),
                loaded_at_unix_ms: unix_ms(),
                routes,
                error: None,
                reloads: 0,
                failed_reloads: 0,
            });
            true
        }
        Err(e) => {
            error!(file = %path.display(), problems = %e, "routes file rejected; the running routes stay");
            metrics.config_reloaded(ConfigStatus {
                ok: false,
                path: path.display().to_string(),
                loaded_at_unix_ms: unix_ms(),
                routes: 0,
                error: Some(e.to_string()),
                reloads: 0,
                failed_reloads: 0,
            });
            false
        }
    }
}

/// Starts watching `path` and listening for SIGHUP. The watcher lives as
/// long as the task, which ends when `stop` fires.
pub fn spawn(
    path: PathBuf,
    registry: Arc<RouteRegistry>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    // One pending trigger is enough: a reload reads the whole file.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let name: Option<OsString> = path.file_name().map(|n| n.to_os_string());
    let file_tx = tx.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let ours = event
            .paths
            .iter()
            .any(|p| p.file_name().map(|n| n.to_os_string()) == name);
        if ours {
            let _ = file_tx.try_send(());
        }
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot watch the routes file; reload with SIGHUP");
            None
        }
    };

    tracker.spawn(async move {
        let _watcher = watcher;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let sighup = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(()) = rx.recv() => {
                    // Debounce: wait until the file has been quiet for a moment.
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(DEBOUNCE) => break,
                            Some(()) = rx.recv() => continue,
                        }
                    }
                    reload(&path, &registry, &metrics);
                }
                Some(()) = sighup => {
                    info!("SIGHUP: reloading the routes file");
                    reload(&path, &registry, &metrics);
                }
            }
        }
    });
}
