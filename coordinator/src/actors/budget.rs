//! Budget: admission of submissions. Every pool is free (zero rates) until pools
//! and caps are configured, so every valid submission is admitted; the single
//! serialisation point for spend lives here.

use actix::prelude::*;
use berth_shared::job::JobSpec;
use berth_shared::wire::ApiError;

#[derive(Default)]
pub struct Budget;

impl Actor for Budget {
    type Context = Context<Self>;
}

/// May this submission be admitted?
#[derive(Message)]
#[rtype(result = "Result<(), ApiError>")]
pub struct Admit {
    pub spec: JobSpec,
    pub owner: String,
}

impl Handler<Admit> for Budget {
    type Result = Result<(), ApiError>;
    fn handle(&mut self, m: Admit, _: &mut Self::Context) -> Self::Result {
        // Only free pools exist: nothing to reserve.
        let _ = (m.spec, m.owner);
        Ok(())
    }
}
