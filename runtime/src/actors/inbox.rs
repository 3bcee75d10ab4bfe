//! A stage's mailbox: two lanes, control before data. The stage's scheduler loop
//! ([`super::StageActor`]) reads every control message first (quit, stats, training calls),
//! so they overtake the data queued behind them; data messages are taken only while the
//! stage has room in its batch. The data lane's bound is not here: a sender holds one of the
//! stage's [`crate::inflight::MailboxSlots`] for each queued message (backpressure).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::inflight::Envelope;
use crate::messages::Control;

#[derive(Default)]
struct Lanes {
    control: VecDeque<Control>,
    data: VecDeque<Envelope>,
    closed: bool,
}

/// The two-lane mailbox of one stage.
#[derive(Default)]
pub struct Inbox {
    lanes: Mutex<Lanes>,
    wake: Condvar,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, Lanes> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a data message; given back when the stage is gone.
    pub fn push_data(&self, env: Envelope) -> Result<(), Box<Envelope>> {
        let mut l = self.lock();
        if l.closed {
            return Err(Box::new(env));
        }
        l.data.push_back(env);
        drop(l);
        self.wake.notify_all();
        Ok(())
    }

    /// Queue a control message; given back when the stage is gone.
    pub fn push_control(&self, c: Control) -> Result<(), Box<Control>> {
        let mut l = self.lock();
        if l.closed {
            return Err(Box::new(c));
        }
        l.control.push_back(c);
        drop(l);
        self.wake.notify_all();
        Ok(())
    }

    pub fn try_control(&self) -> Option<Control> {
        self.lock().control.pop_front()
    }

    pub fn try_data(&self) -> Option<Envelope> {
        self.lock().data.pop_front()
    }

    /// Whether a control message waits (a step that waits on something gives way to it).
    pub fn has_control(&self) -> bool {
        !self.lock().control.is_empty()
    }

    /// Data messages waiting.
    pub fn queued(&self) -> usize {
        self.lock().data.len()
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Block until a control message arrives, or a data message while `take_data`, or
    /// `deadline` passes (`None`: no deadline), or the mailbox closes.
    pub fn wait(&self, deadline: Option<Instant>, take_data: bool) {
        let mut l = self.lock();
        loop {
            if l.closed || !l.control.is_empty() || (take_data && !l.data.is_empty()) {
                return;
            }
            match deadline {
                None => l = self.wake.wait(l).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return;
                    }
                    l = self
                        .wake
                        .wait_timeout(l, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Refuse new messages and hand back what was queued.
    pub fn close(&self) -> (Vec<Control>, Vec<Envelope>) {
        let mut l = self.lock();
        l.closed = true;
        let c = l.control.drain(..).collect();
        let d = l.data.drain(..).collect();
        drop(l);
        self.wake.notify_all();
        (c, d)
    }
}
