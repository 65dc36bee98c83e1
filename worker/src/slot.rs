//! Slots: a worker runs at most `n` attempts at once, each in its own workspace.
//! Plain code, no I/O.

/// Which slots are busy.
#[derive(Debug, Clone)]
pub struct SlotTable {
    busy: Vec<bool>,
}

impl SlotTable {
    pub fn new(n: usize) -> Self {
        SlotTable { busy: vec![false; n] }
    }

    /// Takes the lowest free slot.
    pub fn acquire(&mut self) -> Option<usize> {
        let i = self.busy.iter().position(|b| !b)?;
        self.busy[i] = true;
        Some(i)
    }

    /// Frees a slot; freeing a free or unknown slot does nothing.
    pub fn release(&mut self, i: usize) {
        if let Some(b) = self.busy.get_mut(i) {
            *b = false;
        }
    }

    pub fn free(&self) -> usize {
        self.busy.iter().filter(|b| !**b).count()
    }

    pub fn len(&self) -> usize {
        self.busy.len()
    }

    pub fn is_empty(&self) -> bool {
        self.busy.is_empty()
    }
}

/// How many more tasks to ask for: capacity (slots + prefetch) minus what is running,
/// waiting locally, or already asked for.
pub fn to_request(slots: usize, prefetch: usize, running: usize, queued: usize, asked: usize) -> u32 {
    (slots + prefetch).saturating_sub(running + queued + asked) as u32
}

#[cfg(test)]
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
}
