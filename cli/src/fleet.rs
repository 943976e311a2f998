//! The whole fleet in one process: the gateway and one of each worker, sharing one broker
//! connection and one storage, for a single machine (`txpipe up`) and for tests.

use std::sync::Arc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use txpipe_common::stage::Stage;
use txpipe_common::worker::Handler;
use txpipe_common::Deps;

/// Why the fleet stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("gateway: {0}")]
    Gateway(#[from] txpipe_ingest_gateway::GatewayError),
    #[error("{0}: {1}")]
    Worker(Stage, txpipe_common::amqp::AmqpError),
    #[error("declaring the topology: {0}")]
    Topology(txpipe_common::amqp::AmqpError),
    #[error("a fleet task failed: {0}")]
    Task(String),
}

/// Each stage's handler.
pub fn handlers(deps: &Deps) -> [Arc<dyn Handler>; 3] {
    [
        Arc::new(txpipe_validator::Validator::new(deps.clone())),
        Arc::new(txpipe_transformer::Transformer::new(deps.clone())),
        Arc::new(txpipe_notifier::Notifier::new(deps.clone())),
    ]
}

/// Runs the gateway on `listener` and the three workers until `shutdown` resolves or one of
/// them fails (then the others are stopped too and the failure is returned).
pub async fn run(
    listener: tokio::net::TcpListener,
    deps: Deps,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), FleetError> {
    deps.broker.declare_all().await.map_err(FleetError::Topology)?;
    let stop = CancellationToken::new();
    let mut tasks: JoinSet<Result<(), FleetError>> = JoinSet::new();
    let (d, s) = (deps.clone(), stop.clone());
    tasks.spawn(async move {
        txpipe_ingest_gateway::run(listener, d, s.cancelled_owned()).await.map_err(FleetError::Gateway)
    });
    for handler in handlers(&deps) {
        let (d, s) = (deps.clone(), stop.clone());
        tasks.spawn(async move {
            let stage = handler.stage();
            txpipe_common::worker::run(&d, handler, s.cancelled_owned()).await.map_err(|e| FleetError::Worker(stage, e))
        });
    }

    let mut first_error = None;
    tokio::select! {
        _ = shutdown => {}
        Some(done) = tasks.join_next() => {
            first_error = match done {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(e) => Some(FleetError::Task(e.to_string())),
            };
        }
    }
    stop.cancel();
    while let Some(done) = tasks.join_next().await {
        if let (None, Ok(Err(e))) = (&first_error, done) {
            first_error = Some(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
