//! Shutdown signals, the same way for every long-running command.

/// Completes when the process is asked to stop: SIGTERM (Kubernetes,
/// systemd, `kill`) or SIGINT (Ctrl-C). Where Unix signals cannot be
/// installed, Ctrl-C alone.
pub async fn shutdown_requested() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
