//! Errors shared by the services and the CLI: why a service could not start (or a namespace
//! could not be provisioned), and [`Chain`] for errors whose text leaves the process.

use crate::amqp::AmqpError;
use crate::storage::StorageError;
use std::error::Error;
use std::fmt;

/// Why a service could not start, or `txpipe provision`/`teardown` could not finish; each
/// says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
}

/// Shows an error followed by each of its causes (`error: cause: cause`). For text that
/// leaves the process or its logs as one line (a dead-letter reason, an HTTP body, a
/// readiness answer), where nobody walks `source()` and the causes hold the detail (the SDK's
/// or the OS's own words). A cause whose text is already shown (some errors print their
/// source in their own message) is not repeated.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(e) = cause {
            let more = e.to_string();
            if !text.contains(&more) {
                text.push_str(": ");
                text.push_str(&more);
            }
            cause = e.source();
        }
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_shows_every_cause() {
        let e = StorageError::unavailable("cannot open /x").with_source(std::io::Error::other("disk on fire"));
        assert_eq!(Chain(&e).to_string(), "storage unavailable: cannot open /x: disk on fire");
        let io: std::io::Error = e.into();
        // an io::Error shows its inner error and then that error's causes, not it twice
        assert_eq!(Chain(&io).to_string(), "storage unavailable: cannot open /x: disk on fire");
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot connect: {0} (is it running?)")]
        struct Connect(#[source] std::io::Error);
        let e = Connect(std::io::Error::other("refused"));
        assert_eq!(Chain(&e).to_string(), "cannot connect: refused (is it running?)");
    }
}
