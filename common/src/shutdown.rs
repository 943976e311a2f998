//! One shutdown signal for every binary: SIGTERM or Ctrl-C.

use std::future::Future;

/// Resolves when the process is asked to stop (SIGTERM or Ctrl-C, SIGINT). Call it inside the
/// runtime. The handlers are installed by the call itself, not when the future is first polled:
/// a signal that comes before then (a supervisor stopping a service that is still starting, on
/// a busy host) would otherwise meet the default action and kill the process mid-way.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let asked = {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(sig) => Some(sig),
            Err(err) => {
                tracing::error!(%err, "cannot listen for {name}");
                None
            }
        };
        let (mut term, mut int) =
            (listen(SignalKind::terminate(), "SIGTERM"), listen(SignalKind::interrupt(), "Ctrl-C"));
        async move {
            tokio::select! {
                _ = received(term.as_mut()) => {},
                _ = received(int.as_mut()) => {},
            }
        }
    };
    #[cfg(not(unix))]
    let asked = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    async move {
        asked.await;
        tracing::info!("shutdown requested");
    }
}

/// The next delivery of `sig`; never, if it could not be listened for.
#[cfg(unix)]
async fn received(sig: Option<&mut tokio::signal::unix::Signal>) {
    match sig {
        Some(sig) => {
            sig.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(all(test, unix))]
mod tests {
    /// A SIGTERM that comes after the call but before anything waits on the future is not lost
    /// (and does not kill the process: this test's own process receives it).
    #[tokio::test]
    async fn a_signal_before_the_first_poll_is_kept() {
        let asked = super::shutdown_signal();
        let me = std::process::id().to_string();
        let sent = tokio::process::Command::new("kill").args(["-TERM", &me]).status().await.unwrap();
        assert!(sent.success());
        tokio::time::timeout(std::time::Duration::from_secs(10), asked).await.expect("the signal was seen");
    }
}
