//! Child reaping. As PID 1 the agent inherits every orphan of the guest and
//! must reap them all (`ReapMode::All`); it records the exit statuses of
//! the processes it tracks and drops the rest. In host tests the agent is
//! a library inside a test binary, so it reaps only its own pids
//! (`ReapMode::Tracked`) and becomes a child subreaper to inherit the
//! containers' init processes from its short-lived intermediate children.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;

use crate::sys::{self, Fork};

/// How the reaper finds exited children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapMode {
    /// `waitpid(-1)`: PID 1. SIGCHLD must be blocked in every thread.
    All,
    /// `waitpid(pid)` for tracked pids only, polled.
    Tracked,
}

/// Exits of untracked pids kept in case their owner registers them late.
const UNCLAIMED_KEPT: usize = 64;

#[derive(Default)]
struct Inner {
    /// pid -> exit status once it exited.
    tracked: HashMap<libc::pid_t, Option<i32>>,
    /// Recent exits of pids nobody tracked (yet).
    unclaimed: VecDeque<(libc::pid_t, i32)>,
}

/// Exit statuses of tracked children.
pub struct ProcessTable {
    mode: ReapMode,
    inner: Mutex<Inner>,
    exited: Condvar,
}

impl ProcessTable {
    /// Creates the table and starts its reaper thread. In `All` mode the
    /// caller must already have blocked SIGCHLD (before creating threads).
    pub fn start(mode: ReapMode) -> io::Result<Arc<Self>> {
        if mode == ReapMode::Tracked {
            sys::set_child_subreaper()?;
        }
        let table = Arc::new(ProcessTable {
            mode,
            inner: Mutex::new(Inner::default()),
            exited: Condvar::new(),
        });
        let t = Arc::clone(&table);
        thread::Builder::new()
            .name("reaper".into())
            .spawn(move || t.run())?;
        Ok(table)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        let timeout_ms = match self.mode {
            ReapMode::All => 1000,
            ReapMode::Tracked => 10,
        };
        loop {
            sys::wait_signal(&[libc::SIGCHLD], timeout_ms);
            self.reap();
        }
    }

    /// Collects every exited child that is ours to collect.
    pub fn reap(&self) {
        match self.mode {
            ReapMode::All => {
                while let Ok(Some((pid, status))) = sys::waitpid(-1, libc::WNOHANG) {
                    self.record(pid, status);
                }
            }
            ReapMode::Tracked => {
                let pending: Vec<libc::pid_t> = self
                    .lock()
                    .tracked
                    .iter()
                    .filter(|(_, s)| s.is_none())
                    .map(|(&p, _)| p)
                    .collect();
                for pid in pending {
                    // ECHILD: not (yet) our child, e.g. not yet reparented.
                    if let Ok(Some((pid, status))) = sys::waitpid(pid, libc::WNOHANG) {
                        self.record(pid, status);
                    }
                }
            }
        }
    }

    fn record(&self, pid: libc::pid_t, status: i32) {
        let mut inner = self.lock();
        if let Some(slot) = inner.tracked.get_mut(&pid) {
            *slot = Some(status);
            self.exited.notify_all();
        } else {
            if inner.unclaimed.len() == UNCLAIMED_KEPT {
                inner.unclaimed.pop_front();
            }
            inner.unclaimed.push_back((pid, status));
        }
    }

    /// Forks with the table locked and tracks the child before the reaper
    /// can see it exit.
    ///
    /// # Safety
    /// As [`sys::fork`]: the child branch must only exec or `_exit`.
    pub unsafe fn fork_tracked(&self) -> io::Result<Fork> {
        let mut inner = self.lock();
        // SAFETY: forwarded to the caller.
        let fork = unsafe { sys::fork() }?;
        if let Fork::Parent(pid) = fork {
            inner.tracked.insert(pid, None);
        }
        Ok(fork)
    }

    /// Tracks a pid that became our child another way (a grandchild
    /// reparented to us); picks up its exit if it was already reaped.
    pub fn track(&self, pid: libc::pid_t) {
        let mut inner = self.lock();
        let early = inner
            .unclaimed
            .iter()
            .position(|&(p, _)| p == pid)
            .and_then(|i| inner.unclaimed.remove(i))
            .map(|(_, s)| s);
        inner.tracked.insert(pid, early);
    }

    /// Blocks until `pid` exits; returns its wait status and forgets it.
    pub fn wait(&self, pid: libc::pid_t) -> i32 {
        let mut inner = self.lock();
        loop {
            match inner.tracked.get(&pid) {
                Some(Some(status)) => {
                    let status = *status;
                    inner.tracked.remove(&pid);
                    return status;
                }
                Some(None) => {}
                // Not tracked: treat as already gone.
                None => return 0,
            }
            inner = self.exited.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }
}
