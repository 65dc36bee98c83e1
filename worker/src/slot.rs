//! Slots: a worker runs at most `n` attempts at once, each in its own workspace.
//! Plain code, no I/O.

/// Where one slot stands. A session or a job holds it (`Acquired`), runs in it
/// (`Executing`: one or more execs, or the job's process), is done with it
/// (`Releasing`: the workspace is being cleaned), and it is free again. Anything can go
/// wrong on the way (`Error`, with the reason), and a slot in error stays out of use
/// until someone resets it on purpose, so a broken workspace is never handed out again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    Available,
    Acquired,
    Executing,
    Releasing,
    Error(String),
}

impl SlotState {
    /// Whether `self → next` is a legal move:
    ///
    /// | from       | to                                   |
    /// |------------|--------------------------------------|
    /// | available  | acquired                             |
    /// | acquired   | executing, releasing                 |
    /// | executing  | acquired (execs done), releasing     |
    /// | releasing  | available                            |
    /// | any        | error (a new reason replaces the old) |
    ///
    /// error → available is not a move: only `SlotTable::reset` does it, on purpose.
    /// A slot already executing stays `Executing` while more execs start; counting them
    /// is the holder's business.
    pub fn can_move_to(&self, next: &SlotState) -> bool {
        use SlotState::*;
        matches!(
            (self, next),
            (Available, Acquired)
                | (Acquired, Executing)
                | (Acquired, Releasing)
                | (Executing, Acquired)
                | (Executing, Releasing)
                | (Releasing, Available)
                | (_, Error(_))
        )
    }

    /// The state's name in messages and reports ("available", "error").
    pub fn name(&self) -> &'static str {
        match self {
            SlotState::Available => "available",
            SlotState::Acquired => "acquired",
            SlotState::Executing => "executing",
            SlotState::Releasing => "releasing",
            SlotState::Error(_) => "error",
        }
    }
}

impl std::fmt::Display for SlotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotState::Error(reason) => write!(f, "error ({reason})"),
            other => f.write_str(other.name()),
        }
    }
}

/// What `state` answers for a slot the table does not have: it is no slot to use.
static NO_SUCH_SLOT: SlotState = SlotState::Error(String::new());

/// The slots and where each stands; a slot is free only when `Available`.
#[derive(Debug, Clone)]
pub struct SlotTable {
    states: Vec<SlotState>,
}

impl SlotTable {
    pub fn new(n: usize) -> Self {
        SlotTable { states: vec![SlotState::Available; n] }
    }

    /// Takes the lowest available slot (available → acquired).
    pub fn acquire(&mut self) -> Option<usize> {
        let i = self.states.iter().position(|s| *s == SlotState::Available)?;
        self.states[i] = SlotState::Acquired;
        Some(i)
    }

    /// Frees a slot that is held (acquired or executing → releasing → available) or
    /// finishes one already releasing. Freeing a free or unknown slot does nothing, and
    /// so does freeing one in error: that takes a `reset`.
    pub fn release(&mut self, i: usize) {
        if let Some(s) = self.states.get_mut(i) {
            if s.can_move_to(&SlotState::Releasing) {
                *s = SlotState::Releasing;
            }
            if *s == SlotState::Releasing {
                *s = SlotState::Available;
            }
        }
    }

    pub fn free(&self) -> usize {
        self.states.iter().filter(|s| **s == SlotState::Available).count()
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// Where slot `i` stands; a slot the table does not have reads as an error with an
    /// empty reason (never available).
    pub fn state(&self, i: usize) -> &SlotState {
        self.states.get(i).unwrap_or(&NO_SUCH_SLOT)
    }

    /// Moves slot `i` to `next`, refusing a move the table of `SlotState::can_move_to`
    /// does not allow ("slot 2: cannot move from available to executing").
    pub fn set(&mut self, i: usize, next: SlotState) -> Result<(), String> {
        let n = self.states.len();
        let Some(s) = self.states.get_mut(i) else {
            return Err(format!("slot {i}: no such slot (this worker has {n})"));
        };
        if !s.can_move_to(&next) {
            let hint = if matches!(s, SlotState::Error(_)) && next == SlotState::Available { ": a slot in error comes back only by reset" } else { "" };
            return Err(format!("slot {i}: cannot move from {} to {}{hint}", s.name(), next.name()));
        }
        *s = next;
        Ok(())
    }

    /// Puts a slot in error back in use (error → available), on purpose, once whatever
    /// broke it is mended. Resetting a slot in any other state is refused.
    pub fn reset(&mut self, i: usize) -> Result<(), String> {
        let n = self.states.len();
        match self.states.get_mut(i) {
            Some(s @ SlotState::Error(_)) => {
                *s = SlotState::Available;
                Ok(())
            }
            Some(s) => Err(format!("slot {i}: cannot reset a slot that is {}: only a slot in error is reset", s.name())),
            None => Err(format!("slot {i}: no such slot (this worker has {n})")),
        }
    }

    /// Every slot's state, in slot order, for reports.
    pub fn states(&self) -> Vec<SlotState> {
        self.states.clone()
    }
}

/// How many more tasks to ask for: capacity (slots + prefetch) minus what is running,
/// waiting locally, or already asked for.
pub fn to_request(slots: usize, prefetch: usize, running: usize, queued: usize, asked: usize) -> u32 {
    (slots + prefetch).saturating_sub(running + queued + asked) as u32
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_lowest_first() {
        let mut t = SlotTable::new(2);
        assert_eq!(t.acquire(), Some(0));
        assert_eq!(t.acquire(), Some(1));
        assert_eq!(t.acquire(), None);
        t.release(0);
        assert_eq!(t.free(), 1);
        assert_eq!(t.acquire(), Some(0));
        t.release(7);
        assert_eq!(t.free(), 0);
    }

    #[test]
    fn requests_never_exceed_capacity() {
        assert_eq!(to_request(4, 2, 0, 0, 0), 6);
        assert_eq!(to_request(4, 2, 4, 1, 1), 0);
        assert_eq!(to_request(4, 2, 4, 2, 3), 0);
        assert_eq!(to_request(1, 0, 0, 0, 0), 1);
    }

    #[test]
    fn every_move_is_legal_or_refused_as_the_table_says() {
        use SlotState::*;
        let err = || Error("disk full".into());
        let all = [Available, Acquired, Executing, Releasing, err()];
        let legal = [
            (Available, Acquired),
            (Acquired, Executing),
            (Acquired, Releasing),
            (Executing, Acquired),
            (Executing, Releasing),
            (Releasing, Available),
            (Available, err()),
            (Acquired, err()),
            (Executing, err()),
            (Releasing, err()),
            (err(), err()),
        ];
        for from in &all {
            for to in &all {
                let want = legal.iter().any(|(f, t)| f == from && t == to);
                assert_eq!(from.can_move_to(to), want, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn set_refuses_illegal_moves_with_the_slot_and_both_states() {
        use SlotState::*;
        let refused = [
            (vec![], Executing, "slot 0: cannot move from available to executing"),
            (vec![], Releasing, "slot 0: cannot move from available to releasing"),
            (vec![], Available, "slot 0: cannot move from available to available"),
            (vec![Acquired], Acquired, "slot 0: cannot move from acquired to acquired"),
            (vec![Acquired], Available, "slot 0: cannot move from acquired to available"),
            (vec![Acquired, Executing], Available, "slot 0: cannot move from executing to available"),
            (vec![Acquired, Releasing], Acquired, "slot 0: cannot move from releasing to acquired"),
            (vec![Acquired, Releasing], Executing, "slot 0: cannot move from releasing to executing"),
            (vec![Error("x".into())], Available, "slot 0: cannot move from error to available: a slot in error comes back only by reset"),
            (vec![Error("x".into())], Acquired, "slot 0: cannot move from error to acquired"),
        ];
        for (path, next, msg) in refused {
            let mut t = SlotTable::new(1);
            for step in path {
                t.set(0, step).unwrap();
            }
            let before = t.state(0).clone();
            assert_eq!(t.set(0, next).unwrap_err(), msg);
            assert_eq!(*t.state(0), before, "a refused move changes nothing");
        }
        let mut t = SlotTable::new(3);
        assert_eq!(t.set(2, Executing).unwrap_err(), "slot 2: cannot move from available to executing");
        assert_eq!(t.set(3, Acquired).unwrap_err(), "slot 3: no such slot (this worker has 3)");
        assert!(matches!(t.state(3), Error(_)));
    }

    #[test]
    fn a_session_walks_the_whole_cycle() {
        use SlotState::*;
        let mut t = SlotTable::new(2);
        assert_eq!(t.acquire(), Some(0));
        assert_eq!(*t.state(0), Acquired);
        t.set(0, Executing).unwrap();
        t.set(0, Acquired).unwrap();
        t.set(0, Executing).unwrap();
        assert_eq!(t.states(), vec![Executing, Available]);
        t.release(0);
        assert_eq!(*t.state(0), Available);
        assert_eq!(t.free(), 2);

        assert_eq!(t.acquire(), Some(0));
        t.set(0, Releasing).unwrap();
        assert_eq!(t.free(), 1, "a releasing slot is not free yet");
        assert_eq!(t.acquire(), Some(1));
        t.set(0, Available).unwrap();
        assert_eq!(t.free(), 1);
    }

    #[test]
    fn a_slot_in_error_stays_out_until_reset() {
        use SlotState::*;
        let mut t = SlotTable::new(2);
        assert_eq!(t.acquire(), Some(0));
        t.set(0, Error("workspace cleanup failed".into())).unwrap();
        assert_eq!(t.state(0).to_string(), "error (workspace cleanup failed)");
        t.release(0);
        assert!(matches!(t.state(0), Error(_)), "release does not clear an error");
        assert_eq!(t.acquire(), Some(1));
        assert_eq!(t.acquire(), None);
        assert_eq!(t.reset(1).unwrap_err(), "slot 1: cannot reset a slot that is acquired: only a slot in error is reset");
        t.reset(0).unwrap();
        assert_eq!(t.states(), vec![Available, Acquired]);
        assert_eq!(t.acquire(), Some(0));
        assert_eq!(t.reset(5).unwrap_err(), "slot 5: no such slot (this worker has 2)");
    }
}
