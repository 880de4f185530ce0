//! Watching files for changes, and SIGHUP: the one trigger behind every
//! reload (the routes file, the TLS certificate and key).
//!
//! The directories are watched rather than the files, so that editors' and
//! tools' atomic renames (write a temporary file, rename it over the old
//! one) are seen. Events are debounced: a reload happens once the files
//! have been quiet for [`DEBOUNCE`].

use std::{
    collections::BTreeSet,
    ffi::OsString,
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Quiet time after the last file event before reloading: editors write
/// files in several steps.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// Why a reload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// One of the watched files changed.
    FileChanged,
    /// The process received SIGHUP.
    Hangup,
}

/// Calls `reload` after a change to any of `files` (debounced) and on
/// SIGHUP, until `stop` fires. `what` names the files in log lines.
///
/// The watchers and the SIGHUP handler are installed when this is called,
/// not when the returned future first runs: a change (or a SIGHUP, whose
/// default action ends the process) right after the router says it is
/// listening must not be missed. Run the future as a task; the watchers
/// live as long as it does.
pub fn watch_files(
    what: &'static str,
    files: Vec<PathBuf>,
    stop: CancellationToken,
    mut reload: impl FnMut(Trigger) + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    // One pending trigger is enough: a reload reads the whole files.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let watchers: Vec<_> = directories(&files)
        .into_iter()
        .filter_map(|(dir, names)| {
            let tx = tx.clone();
            let watcher =
                notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                    let Ok(event) = event else { return };
                    if event.kind.is_access() {
                        return;
                    }
                    // Kubernetes mounts secrets and config maps as
                    // symlinks into a `..data` directory that it swaps
                    // whole: such an event names `..data`, not our files.
                    let ours = event.paths.iter().any(|p| {
                        p.file_name().is_some_and(|n| {
                            names.contains(n) || n.as_encoded_bytes().starts_with(b"..")
                        })
                    });
                    if ours {
                        let _ = tx.try_send(());
                    }
                })
                .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
            match watcher {
                Ok(w) => Some(w),
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "cannot watch the {what}; reload with SIGHUP");
                    None
                }
            }
        })
        .collect();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    async move {
        let _watchers = watchers;
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
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(DEBOUNCE) => break,
                            Some(()) = rx.recv() => continue,
                        }
                    }
                    reload(Trigger::FileChanged);
                }
                Some(()) = sighup => reload(Trigger::Hangup),
            }
        }
    }
}

/// The directories holding `files`, each with the file names to look for.
fn directories(files: &[PathBuf]) -> Vec<(PathBuf, BTreeSet<OsString>)> {
    let mut out: Vec<(PathBuf, BTreeSet<OsString>)> = Vec::new();
    for f in files {
        let dir = f
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let Some(name) = f.file_name() else { continue };
        match out.iter_mut().find(|(d, _)| *d == dir) {
            Some((_, names)) => {
                names.insert(name.to_os_string());
            }
            None => out.push((dir, BTreeSet::from([name.to_os_string()]))),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_grouped_by_directory() {
        let d = directories(&[
            "/etc/tls/cert.pem".into(),
            "/etc/tls/key.pem".into(),
            "routes.json".into(),
        ]);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].0, PathBuf::from("/etc/tls"));
        assert_eq!(d[0].1.len(), 2);
        assert_eq!(d[1].0, PathBuf::from("."));
    }
}
