//! LogStore: output chunks per task attempt, durable (through the JobStore's group
//! commit) and fanned out to live followers as soon as they are committed.

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::broadcast;

use super::job_store::{AppendLogs, JobStore};
use crate::store::{ChunkVerdict, LogChunk, Notice, StoreError};

pub struct LogStore {
    job_store: Addr<JobStore>,
    notices: broadcast::Sender<Arc<Notice>>,
}

impl LogStore {
    pub fn new(job_store: Addr<JobStore>, notices: broadcast::Sender<Arc<Notice>>) -> Self {
        LogStore { job_store, notices }
    }
}

impl Actor for LogStore {
    type Context = Context<Self>;
}

/// Store chunks from a worker; answers a verdict per chunk once they are durable.
#[derive(Message)]
#[rtype(result = "Result<Vec<ChunkVerdict>, StoreError>")]
pub struct Append {
    pub worker: String,
    pub chunks: Vec<LogChunk>,
}

impl Handler<Append> for LogStore {
    type Result = ResponseFuture<Result<Vec<ChunkVerdict>, StoreError>>;
    fn handle(&mut self, m: Append, _: &mut Self::Context) -> Self::Result {
        let store = self.job_store.clone();
        Box::pin(async move { store.send(AppendLogs { worker: m.worker, chunks: m.chunks }).await.map_err(|_| StoreError::Stopped)? })
    }
}

/// Follow committed output (and task ends) from now on.
#[derive(Message)]
#[rtype(result = "broadcast::Receiver<Arc<Notice>>")]
pub struct Follow;

impl Handler<Follow> for LogStore {
    type Result = MessageResult<Follow>;
    fn handle(&mut self, _: Follow, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.notices.subscribe())
    }
}
