//! StoreReader: read-only queries on their own connections, on a SyncArbiter so
//! blocking reads never stall the actors that serve connections.

use actix::prelude::*;

use crate::store::{Reader, StoreError};

pub struct StoreReader {
    conn: Box<dyn Reader + Send>,
}

impl StoreReader {
    pub fn new(conn: Box<dyn Reader + Send>) -> Self {
        StoreReader { conn }
    }
}

impl Actor for StoreReader {
    type Context = SyncContext<Self>;
}

/// A read to run against a reader connection.
pub type ReadFn<R> = Box<dyn FnOnce(&mut dyn Reader) -> Result<R, StoreError> + Send>;

/// Runs a read on one of the reader connections.
pub struct Query<R>(pub ReadFn<R>);

impl<R: 'static> Message for Query<R> {
    type Result = Result<R, StoreError>;
}

impl<R: Send + 'static> Handler<Query<R>> for StoreReader {
    type Result = Result<R, StoreError>;
    fn handle(&mut self, q: Query<R>, _: &mut Self::Context) -> Self::Result {
        (q.0)(&mut *self.conn)
    }
}

/// Sends a read and waits for it.
pub async fn query<R: Send + 'static>(
    addr: &Addr<StoreReader>,
    f: impl FnOnce(&mut dyn Reader) -> Result<R, StoreError> + Send + 'static,
) -> Result<R, StoreError> {
    addr.send(Query(Box::new(f))).await.map_err(|_| StoreError::Stopped)?
}
