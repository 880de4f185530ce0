//! [`Publisher`]: publish to topics from any backend process, through a
//! ZeroMQ PUB socket connected to the router's SUB socket
//! (`PUBLISH_ENDPOINT`).
//!
//! Delivery is best effort, as with any ZeroMQ PUB socket:
//! - **Slow joiner.** Right after a connect, the router's subscription has
//!   not reached this socket yet, and the PUB socket drops what it is given
//!   until it has. The first messages after [`Publisher::connect`] (and
//!   after every reconnect) can be lost.
//! - **No reconnect in the socket.** The zeromq crate's PUB does not
//!   reconnect; this type notices the disconnection and connects a new
//!   socket on the next [`Publisher::publish`], which then suffers the slow
//!   joiner drop again.
//! - **No ordering with a worker's own messages.** A worker that subscribes
//!   a connection and then publishes should use
//!   [`WorkerHandle::publish`](crate::WorkerHandle::publish), which travels
//!   on the worker's socket in order.

use std::pin::Pin;
use std::time::Duration;

use bridge_proto::{encode_publication, Publication};
use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use serde_json::Value;
use tracing::{debug, info, warn};
use zeromq::{PubSocket, Socket, SocketEvent, SocketOptions, SocketSend, ZmqError, ZmqMessage};

use crate::config::publish_endpoint_from;

/// Why a publication could not be handed to the socket.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Connecting to the router's publication endpoint failed.
    #[error("cannot connect to the publication endpoint {endpoint}: {source}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The socket error.
        #[source]
        source: ZmqError,
    },
    /// The socket refused the message.
    #[error("cannot publish to {endpoint}: {source}")]
    Send {
        /// The endpoint.
        endpoint: String,
        /// The socket error.
        #[source]
        source: ZmqError,
    },
}

type Events = Pin<Box<dyn Stream<Item = SocketEvent> + Send>>;

/// A PUB socket connected to the router's publication endpoint.
pub struct Publisher {
    endpoint: String,
    connect_timeout: Duration,
    socket: Option<(PubSocket, Events)>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("endpoint", &self.endpoint)
            .field("connected", &self.socket.is_some())
            .finish()
    }
}

impl Publisher {
    /// Connects to `endpoint` (bounded by 2 s). See the module docs for
    /// what may be lost right after connecting.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, PublishError> {
        Self::connect_with_timeout(endpoint, Duration::from_secs(2)).await
    }

    /// Connects to `PUBLISH_ENDPOINT`, or `tcp://127.0.0.1:5556`.
    pub async fn connect_from_env() -> Result<Self, PublishError> {
        Self::connect(publish_endpoint_from(|k| std::env::var(k).ok())).await
    }

    /// Connects with a custom bound on each connection attempt.
    pub async fn connect_with_timeout(
        endpoint: impl Into<String>,
        connect_timeout: Duration,
    ) -> Result<Self, PublishError> {
        let mut publisher = Self {
            endpoint: endpoint.into(),
            connect_timeout,
            socket: None,
        };
        publisher.reconnect().await?;
        Ok(publisher)
    }

    /// The endpoint this publisher connects to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Publishes `data` as a `msg_type` message to the clients subscribed to
    /// `topic`. `Ok` means the socket took it, not that anyone received it.
    pub async fn publish(
        &mut self,
        topic: &str,
        msg_type: &str,
        data: Value,
    ) -> Result<(), PublishError> {
        if self.lost_router() {
            info!(endpoint = %self.endpoint, "publication endpoint disconnected; reconnecting");
            self.socket = None;
        }
        if self.socket.is_none() {
            self.reconnect().await?;
        }
        let payload = encode_publication(&Publication {
            msg_type: msg_type.to_owned(),
            data,
        });
        let size = payload.len();
        let mut message = ZmqMessage::from(Bytes::copy_from_slice(topic.as_bytes()));
        message.push_back(Bytes::from(payload));
        // Invariant: `reconnect` either filled `socket` or returned an error.
        let Some((socket, _)) = self.socket.as_mut() else {
            return Ok(());
        };
        match socket.send(message).await {
            Ok(()) => {
                debug!(topic, msg.type = msg_type, bytes = size, "published");
                Ok(())
            }
            Err(source) => {
                self.socket = None;
                Err(PublishError::Send {
                    endpoint: self.endpoint.clone(),
                    source,
                })
            }
        }
    }

    /// Whether the socket reported losing its peer since the last look.
    fn lost_router(&mut self) -> bool {
        let Some((_, events)) = self.socket.as_mut() else {
            return false;
        };
        let mut lost = false;
        while let Some(Some(event)) = events.next().now_or_never() {
            if matches!(event, SocketEvent::Disconnected(_)) {
                lost = true;
            }
        }
        lost
    }

    async fn reconnect(&mut self) -> Result<(), PublishError> {
        let mut options = SocketOptions::default();
        options.connect_timeout(self.connect_timeout);
        let mut socket = PubSocket::with_options(options);
        let events: Events = Box::pin(socket.monitor());
        if let Err(source) = socket.connect(&self.endpoint).await {
            warn!(endpoint = %self.endpoint, error = %source, "cannot connect the publisher");
            return Err(PublishError::Connect {
                endpoint: self.endpoint.clone(),
                source,
            });
        }
        self.socket = Some((socket, events));
        Ok(())
    }
}
