//! Hot reload of the routes file: on a change of the file or on SIGHUP
//! (both through `watch`). A valid file replaces the routes at once
//! (sessions pick up policy changes, see `session`), an invalid one is
//! rejected whole and the running routes stay.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info};

use crate::{
    client::unix_ms,
    config::load_routes,
    metrics::{ConfigStatus, Metrics},
    registry::RouteRegistry,
    watch::{watch_files, Trigger},
};

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
            // The status first: whoever reads the log line then finds
            // `/stats` saying the same.
            metrics.config_reloaded(ConfigStatus {
                ok: true,
                path: path.display().to_string(),
                loaded_at_unix_ms: unix_ms(),
                routes,
                error: None,
                reloads: 0,
                failed_reloads: 0,
            });
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
            true
        }
        Err(e) => {
            metrics.config_reloaded(ConfigStatus {
                ok: false,
                path: path.display().to_string(),
                loaded_at_unix_ms: unix_ms(),
                routes: 0,
                error: Some(e.to_string()),
                reloads: 0,
                failed_reloads: 0,
            });
            error!(file = %path.display(), problems = %e, "routes file rejected; the running routes stay");
            false
        }
    }
}

/// Starts watching `path` and listening for SIGHUP (`watch`). The task
/// ends when `stop` fires.
pub fn spawn(
    path: PathBuf,
    registry: Arc<RouteRegistry>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    let watched = vec![path.clone()];
    tracker.spawn(watch_files("routes file", watched, stop, move |trigger| {
        if trigger == Trigger::Hangup {
            info!("SIGHUP: reloading the routes file");
        }
        reload(&path, &registry, &metrics);
    }));
}
