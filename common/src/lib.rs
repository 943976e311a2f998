//! Shared library of txpipe: everything the gateway, the workers and the CLI have in common.
//!
//! Domain logic (the CSV contract, the status machine, the stage table, the messages) knows
//! nothing of RabbitMQ, S3 or HTTP; adapters (AMQP, storage, HTTP health) are thin layers
//! around it. docs/DESIGN.md has a map from each behaviour to its module.

pub mod amqp;
pub mod attempt;
pub mod auth;
pub mod config;
pub mod csv_schema;
pub mod currency;
pub mod dead_letter;
pub mod deps;
pub mod error;
pub mod file_id;
pub mod headers;
pub mod health;
pub mod ledger;
pub mod messages;
pub mod metrics;
pub mod names;
pub mod service;
pub mod shutdown;
pub mod stage;
pub mod status;
pub mod storage;
pub mod stuck;
pub mod telemetry;
pub mod trace;
pub mod worker;

pub use config::Settings;
pub use deps::Deps;
pub use file_id::FileId;
pub use names::Names;
