//! The session-facing types: what sessions ask of the bridge ([`Command`]),
//! a client request as the session hands it over ([`RequestCmd`]) with the
//! breaker admission it carries ([`BreakerTicket`]), and what the broker
//! tells `/routes` about its workers ([`Snapshot`]).

use std::{sync::Arc, time::Duration};

use bridge_proto as proto;
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::{
    ids::{Cid, ConnId},
    policy::breaker::{Admit, Breaker, BreakerPolicy},
    routes::Route,
};

/// The route's breaker, the admission the session got from it, and the
/// policy to judge the outcome by.
#[derive(Debug, Clone)]
pub struct BreakerTicket {
    pub breaker: Arc<Breaker>,
    pub admit: Admit,
    pub policy: BreakerPolicy,
}

/// A client request, as the session hands it over.
#[derive(Debug)]
pub struct RequestCmd {
    pub cid: Cid,
    pub conn: ConnId,
    /// The client's id as JSON text (the key of the connection's in-flight
    /// map, which holds the same text).
    pub client_key: std::sync::Arc<str>,
    pub client_id: Value,
    /// The route the session followed when it sent the request (its
    /// pattern, and the service it names).
    pub route: Arc<Route>,
    pub msg_type: String,
    pub data: Value,
    pub timeout: Duration,
    pub affinity: bool,
    /// Extra attempts allowed after a transient failure.
    pub retries: u32,
    pub breaker: Option<BreakerTicket>,
    /// Verified token claims of the connection.
    pub claims: Option<Value>,
    /// Bytes of the client's frame: what holding this request costs.
    pub size: usize,
}

/// What sessions ask of the bridge.
#[derive(Debug)]
pub enum Command {
    Request(Box<RequestCmd>),
    Event {
        conn: ConnId,
        msg_type: String,
        data: Value,
    },
    Binary {
        conn: ConnId,
        data: Bytes,
    },
    Raw {
        conn: ConnId,
        binary: bool,
        payload: Bytes,
    },
    Connect(Box<proto::Connect>),
    Disconnect {
        conn: ConnId,
        code: u16,
        reason: String,
        /// Requests still in flight on the connection: they are cancelled.
        cids: Vec<Cid>,
    },
    Cancel {
        cid: Cid,
        reason: &'static str,
    },
    Snapshot(oneshot::Sender<Snapshot>),
}

/// Live workers, for `/routes`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub workers: Vec<WorkerInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerInfo {
    pub id: String,
    pub services: Vec<String>,
    pub in_flight: u32,
    pub capacity: u32,
    pub draining: bool,
    pub sdk: String,
    /// The client message types it announced (sorted); `None`: it did not say.
    pub msg_types: Option<Vec<String>>,
}
