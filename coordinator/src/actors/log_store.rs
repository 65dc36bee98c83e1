//! LogStore: output, stored and followed. A worker's output stream hands its chunks
//! here in batches (several in flight, answered in order); each goes on to the store's
//! group-commit writer at once and its verdicts come back once durable. Followers get
//! committed output (and task ends) as the store publishes them.

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::broadcast;

use crate::store::{ChunkVerdict, LogChunk, Notice, Op, StoreHandle, Tx};

pub struct LogStore {
    store: StoreHandle,
}

impl LogStore {
    pub fn new(store: StoreHandle) -> Self {
        LogStore { store }
    }
}

impl Actor for LogStore {
    type Context = Context<Self>;
}

/// Follow committed output (and task ends) from now on.
#[derive(Message)]
#[rtype(result = "broadcast::Receiver<Arc<Notice>>")]
pub struct Follow;

impl Handler<Follow> for LogStore {
    type Result = MessageResult<Follow>;
    fn handle(&mut self, _: Follow, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.store.notices.subscribe())
    }
}

/// Store a batch of one attempt's output chunks (fenced by their lease); `reply` gets
/// a verdict per chunk once they are durable. Batches sent one after another are
/// applied and answered in that order (the handler passes each on to the writer at
/// once, so several can be in flight).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Append {
    pub worker: String,
    pub chunks: Vec<LogChunk>,
    pub reply: Tx<Vec<ChunkVerdict>>,
}

impl Handler<Append> for LogStore {
    type Result = ();
    fn handle(&mut self, m: Append, _: &mut Self::Context) {
        // A stopped writer drops the reply, which its receiver reads as a failure.
        let _ = self.store.send(Op::AppendLogs { worker: m.worker, chunks: m.chunks, reply: m.reply });
    }
}
