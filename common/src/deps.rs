//! What every service holds: settings, names, storage and the broker, built once at startup.

use crate::amqp::{Broker, Publisher};
use crate::config::Settings;
pub use crate::error::StartupError;
use crate::names::Names;
use crate::storage::Storage;
use std::sync::Arc;

/// Shared dependencies of a service; cheap to clone.
#[derive(Clone)]
pub struct Deps {
    pub settings: Arc<Settings>,
    pub names: Names,
    pub storage: Storage,
    pub broker: Broker,
    pub publisher: Publisher,
}

impl Deps {
    /// Opens storage and connects to the broker.
    pub async fn connect(settings: Settings) -> Result<Self, StartupError> {
        let storage = Storage::open(&settings).await?;
        Self::with_storage(settings, storage).await
    }

    /// Connects to the broker, using storage opened elsewhere (tests, `txpipe up`).
    pub async fn with_storage(settings: Settings, storage: Storage) -> Result<Self, StartupError> {
        let broker = Broker::connect(&settings).await?;
        let publisher = broker.publisher().await?;
        Ok(Self { names: settings.names(), settings: Arc::new(settings), storage, broker, publisher })
    }

    /// Ok when the broker is connected and storage answers; otherwise why not.
    pub async fn readiness(&self) -> Result<(), String> {
        if !self.broker.is_connected() || !self.publisher.is_usable() {
            return Err("not connected to RabbitMQ".into());
        }
        self.storage.check().await.map_err(|e| crate::error::Chain(&e).to_string())
    }
}
