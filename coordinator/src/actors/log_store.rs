//! LogStore: live followers of output. Chunks are stored by each worker connection
//! straight through the store's group-commit writer (several batches in flight, in
//! order) and fanned out here as soon as they are committed.

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::broadcast;

use crate::store::Notice;

pub struct LogStore {
    notices: broadcast::Sender<Arc<Notice>>,
}

impl LogStore {
    pub fn new(notices: broadcast::Sender<Arc<Notice>>) -> Self {
        LogStore { notices }
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
        MessageResult(self.notices.subscribe())
    }
}
