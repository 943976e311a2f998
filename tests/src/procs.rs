//! The service binaries as separate processes, for the tests that need real processes
//! (`cargo build --workspace --bins` first; `scripts/test` does it).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The built binary `name`.
pub fn binary(name: &str) -> PathBuf {
    // tests run from target/<profile>/deps; the binaries sit one level up
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// A command for binary `name` in namespace `ns` with data in `data_dir`: its own HTTP port,
/// JSON logs on a piped stderr (see [`wait_for_log`]), killed when dropped, and the test's
/// broker. Add what the test needs, then spawn.
pub fn command(name: &str, ns: &str, data_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(binary(name));
    cmd.env("TXPIPE_NAMESPACE", ns)
        .env("TXPIPE_DATA_DIR", data_dir)
        .env("TXPIPE_HTTP_ADDR", "127.0.0.1:0")
        .env("TXPIPE_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        // the harness's own switch is no setting of the services (which refuse unknown TXPIPE_ names)
        .env_remove("TXPIPE_TEST_STORAGE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Ok(url) = std::env::var("TXPIPE_AMQP_URL") {
        cmd.env("TXPIPE_AMQP_URL", url);
    }
    cmd
}

/// Reads the child's JSON log lines until one has `message == wanted`; returns that line.
pub async fn wait_for_log(child: &mut Child, wanted: &str) -> serde_json::Value {
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["fields"]["message"] == wanted {
                    return v;
                }
            }
        }
        panic!("the process ended before logging {wanted:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no {wanted:?} log line within 30 s"));
    // keep draining so the child never blocks on a full pipe
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    found
}

/// SIGTERM, then its exit status (within 40 s).
pub async fn stop(mut child: Child) -> std::process::ExitStatus {
    let pid = child.id().expect("running");
    Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await.unwrap();
    tokio::time::timeout(Duration::from_secs(40), child.wait()).await.expect("exits after SIGTERM").unwrap()
}
