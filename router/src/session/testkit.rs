//! Test doubles for the session's unit tests: a command queue that records
//! (with a capacity, to play a full bridge), a bridge made of a bounded
//! channel, a socket made of two channels with its client end, and an
//! [`Env`] around them.

use std::{
    cell::{Cell, RefCell},
    collections::BTreeMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::extract::ws::Message;
use futures_util::{Sink, Stream};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Bridge, CommandQueue, Env, SessionStart};
use crate::{
    broker::Command,
    hub::Hub,
    ids::ConnId,
    metrics::Metrics,
    policy::runtime::Runtimes,
    registry::RouteRegistry,
    routes::{Route, RouteDefaults, RouteTable},
};

/// A route as the routes file would give it, with the built-in defaults.
pub(crate) fn route(path: &str, service: &str) -> Route {
    RouteDefaults::BUILTIN.route(path, service)
}

/// A command queue that records what it takes, and refuses once `room` is
/// used up.
pub(crate) struct Recorder {
    pub sent: RefCell<Vec<Command>>,
    pub room: Cell<usize>,
}

impl Recorder {
    pub fn with_room(room: usize) -> Self {
        Self {
            sent: RefCell::new(Vec::new()),
            room: Cell::new(room),
        }
    }

    pub fn take(&self) -> Vec<Command> {
        std::mem::take(&mut self.sent.borrow_mut())
    }
}

impl CommandQueue for Recorder {
    fn try_send(&self, cmd: Command) -> Result<(), Command> {
        match self.room.get() {
            0 => Err(cmd),
            n => {
                self.room.set(n - 1);
                self.sent.borrow_mut().push(cmd);
                Ok(())
            }
        }
    }
}

/// The bridge's bounded command channel, without the bridge.
#[derive(Clone)]
pub(crate) struct TestBridge(mpsc::Sender<Command>);

impl CommandQueue for TestBridge {
    fn try_send(&self, cmd: Command) -> Result<(), Command> {
        self.0.try_send(cmd).map_err(|e| e.into_inner())
    }
}

impl Bridge for TestBridge {
    async fn send(&self, cmd: Command) {
        let _ = self.0.send(cmd).await;
    }
}

/// The session's side of a socket made of channels.
pub(crate) struct TestSocket {
    from_client: mpsc::UnboundedReceiver<Result<Message, axum::Error>>,
    to_client: mpsc::UnboundedSender<Message>,
}

/// The client's side.
pub(crate) struct TestClient {
    pub to_session: mpsc::UnboundedSender<Result<Message, axum::Error>>,
    pub from_session: mpsc::UnboundedReceiver<Message>,
}

pub(crate) fn socket() -> (TestSocket, TestClient) {
    let (to_session, from_client) = mpsc::unbounded_channel();
    let (to_client, from_session) = mpsc::unbounded_channel();
    (
        TestSocket {
            from_client,
            to_client,
        },
        TestClient {
            to_session,
            from_session,
        },
    )
}

impl TestClient {
    pub fn send_text(&self, text: &str) {
        let _ = self.to_session.send(Ok(Message::Text(text.into())));
    }

    /// The next message from the session; panics after a (paused-time
    /// friendly) bound.
    pub async fn next(&mut self) -> Message {
        tokio::time::timeout(Duration::from_secs(60), self.from_session.recv())
            .await
            .expect("a message from the session in time")
            .expect("the session is still writing")
    }

    /// The next text frame, as JSON.
    pub async fn next_json(&mut self) -> Value {
        match self.next().await {
            Message::Text(t) => serde_json::from_str(t.as_str()).expect("JSON frame"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

impl super::Socket for TestSocket {}

impl Stream for TestSocket {
    type Item = Result<Message, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.from_client.poll_recv(cx)
    }
}

impl Sink<Message> for TestSocket {
    type Error = std::io::Error;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, msg: Message) -> Result<(), Self::Error> {
        self.to_client
            .send(msg)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
}

/// An environment with a bridge channel of `bridge_room` commands, and the
/// receiving end of that channel.
pub(crate) fn env(
    table: RouteTable,
    bridge_room: usize,
) -> (Env<TestBridge>, mpsc::Receiver<Command>) {
    let (tx, rx) = mpsc::channel(bridge_room);
    let env = Env {
        hub: Arc::new(Hub::new()),
        registry: Arc::new(RouteRegistry::new(table, false)),
        metrics: Arc::new(Metrics::new()),
        bridge: TestBridge(tx),
        draining: CancellationToken::new(),
        tracker: TaskTracker::new(),
        client_ping: Duration::from_secs(20),
        drain_timeout: Duration::from_secs(10),
        max_outbound_bytes: 1 << 20,
        rate_limits: true,
        lot: Arc::new(crate::resume::ParkingLot::new(64 << 20)),
        kept: crate::resume::KeptBudget::new(64 << 20),
    };
    (env, rx)
}

/// What the upgrade hands a session on `route`.
pub(crate) fn start(runtimes: &Runtimes, route: Arc<Route>) -> SessionStart {
    let conn = ConnId::new();
    let runtime = runtimes.get(&route.path);
    let slot = runtime
        .try_connect(usize::MAX)
        .expect("no connection limit");
    SessionStart {
        connect: bridge_proto::Connect {
            conn: conn.0.to_string(),
            route: route.path.clone(),
            service: route.service.clone(),
            path: route.path.clone(),
            params: BTreeMap::new(),
            query: BTreeMap::new(),
            headers: BTreeMap::new(),
            remote: "127.0.0.1:1".into(),
            claims: None,
            client_cert: None,
        },
        conn,
        route,
        runtime,
        slot,
        permit: crate::capacity::Capacity::new(usize::MAX)
            .try_admit()
            .expect("no router-wide limit"),
    }
}
