//! A fault-injecting TCP proxy for the tests: services connect to the broker through it, and
//! a test cuts every connection or refuses new ones, without touching the shared broker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// A proxy to one upstream address, on 127.0.0.1 and a free port.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    listener: AbortHandle,
}

struct State {
    upstream: SocketAddr,
    refusing: AtomicBool,
    links: Mutex<Vec<AbortHandle>>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State { upstream, refusing: AtomicBool::new(false), links: Mutex::new(Vec::new()) });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                if st.refusing.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream = st.upstream;
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let mut client = client;
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                st.links.lock().unwrap().push(link.abort_handle());
            }
        });
        Self { addr, state, listener: task.abort_handle() }
    }

    /// The broker URL through this proxy (guest/guest, default vhost).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Drops every open connection at once (both sides see the socket close).
    pub fn cut(&self) {
        for link in self.state.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// While refusing, new connections are closed as soon as they are accepted.
    pub fn refuse(&self, refusing: bool) {
        self.state.refusing.store(refusing, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.listener.abort();
        self.cut();
    }
}

/// The address of the broker the tests use.
pub fn broker_addr() -> SocketAddr {
    let url = crate::test_settings(std::path::Path::new(".")).amqp_url;
    let hostport = url.split('@').next_back().unwrap().split('/').next().unwrap();
    std::net::ToSocketAddrs::to_socket_addrs(hostport).unwrap().next().unwrap()
}
