//! The waiting queue: bounded FIFO for new requests, unbounded front for preempted ones.

use std::collections::VecDeque;

/// A FIFO of waiting items. New items enter at the back only while fewer than `capacity` wait;
/// preempted items re-enter at the front regardless, since they were admitted once already.
#[derive(Debug)]
pub(super) struct WaitQueue<T> {
    items: VecDeque<T>,
    capacity: usize,
}

impl<T: PartialEq> WaitQueue<T> {
    /// An empty queue admitting new items while fewer than `capacity` wait.
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            items: VecDeque::new(),
            capacity,
        }
    }

    /// Items waiting.
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    /// Appends a new item, or hands it back when the queue is at capacity; `room` more may wait
    /// beyond it (items the next step admits anyway: free running slots).
    pub(super) fn push_back(&mut self, item: T, room: usize) -> Result<(), T> {
        if self.items.len() >= self.capacity + room {
            return Err(item);
        }
        self.items.push_back(item);
        Ok(())
    }

    /// Puts a preempted item first in line (beyond capacity if need be).
    pub(super) fn push_front(&mut self, item: T) {
        self.items.push_front(item);
    }

    /// The next item to admit.
    pub(super) fn front(&self) -> Option<&T> {
        self.items.front()
    }

    /// Removes the next item to admit.
    pub(super) fn pop_front(&mut self) -> Option<T> {
        self.items.pop_front()
    }

    /// Removes `item` wherever it is. Returns whether it was there.
    pub(super) fn remove(&mut self, item: &T) -> bool {
        match self.items.iter().position(|x| x == item) {
            Some(i) => {
                self.items.remove(i);
                true
            }
            None => false,
        }
    }

    /// Items in admission order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_with_capacity_and_front_for_preempted() {
        let mut q = WaitQueue::new(2);
        assert_eq!(q.push_back(1, 0), Ok(()));
        assert_eq!(q.push_back(2, 0), Ok(()));
        assert_eq!(q.push_back(3, 0), Err(3), "full: the item comes back");
        q.push_front(9);
        assert_eq!(q.len(), 3, "preempted items may exceed capacity");
        assert_eq!(q.iter().copied().collect::<Vec<_>>(), [9, 1, 2]);
        assert_eq!(q.pop_front(), Some(9));
        assert_eq!(q.push_back(3, 0), Err(3), "still at capacity");
        assert_eq!(q.push_back(3, 1), Ok(()), "one more when there is room");
        assert!(q.remove(&3));
        assert!(q.remove(&2));
        assert!(!q.remove(&2));
        assert_eq!(q.push_back(3, 0), Ok(()));
        assert_eq!(q.front(), Some(&1));
    }
}
