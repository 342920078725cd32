//! Runtime state of containers and their processes.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use husk_proto::{ErrorBody, ErrorCode, ExitStatus, StreamKind, Timestamps};

use crate::container::cgroup::Cgroup;
use crate::container::child::Spawned;
use crate::container::seccomp::SeccompPlan;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts things in flight (a process's output relays, the host's control
/// connections) so that whoever must not cut them off can wait for them.
#[derive(Default)]
pub struct InFlight {
    active: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    /// One started.
    pub fn begin(&self) {
        *lock(&self.active) += 1;
    }

    /// One finished.
    pub fn end(&self) {
        let mut n = lock(&self.active);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    /// Waits until none is in flight, at most `timeout`; returns whether idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut n = lock(&self.active);
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            n = self
                .idle
                .wait_timeout(n, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// The agent's ends of a process's stdio, until the host attaches them.
#[derive(Default)]
pub struct StdioEnds {
    /// Write end of the stdin pipe.
    pub stdin: Option<OwnedFd>,
    /// Read end of the stdout pipe.
    pub stdout: Option<OwnedFd>,
    /// Read end of the stderr pipe.
    pub stderr: Option<OwnedFd>,
    /// The pty master, until attached.
    pub pty: Option<OwnedFd>,
}

/// Why a stream cannot be attached.
#[derive(Debug, PartialEq, Eq)]
pub enum AttachError {
    /// The process has no such stream (no stdin requested, or a terminal).
    NoSuchStream,
    /// Someone attached it already.
    AlreadyAttached,
}

#[derive(Default)]
struct ProcState {
    timestamps: Timestamps,
    exit: Option<ExitStatus>,
    delivered: bool,
}

/// A process the agent started: a container's init or an exec.
pub struct Proc {
    /// Pid in the agent's namespace.
    pub pid: libc::pid_t,
    /// Whether it has a terminal.
    pub terminal: bool,
    /// Whether the host asked for a stdin stream.
    pub stdin: bool,
    /// A copy of the pty master for resizing.
    pub pty_control: Option<OwnedFd>,
    /// Output relays.
    pub relays: InFlight,
    stdio: Mutex<StdioEnds>,
    attached: Mutex<Vec<StreamKind>>,
    state: Mutex<ProcState>,
    changed: Condvar,
}

impl Proc {
    /// A process whose setup finished at `timestamps.created_ns`.
    pub fn new(
        pid: libc::pid_t,
        terminal: bool,
        stdin: bool,
        stdio: StdioEnds,
        pty_control: Option<OwnedFd>,
        timestamps: Timestamps,
    ) -> Self {
        Proc {
            pid,
            terminal,
            stdin,
            pty_control,
            relays: InFlight::default(),
            stdio: Mutex::new(stdio),
            attached: Mutex::new(Vec::new()),
            state: Mutex::new(ProcState {
                timestamps,
                ..ProcState::default()
            }),
            changed: Condvar::new(),
        }
    }

    /// Takes the agent's end of `kind` for a relay.
    pub fn take_stream(&self, kind: StreamKind) -> Result<OwnedFd, AttachError> {
        let mut attached = lock(&self.attached);
        if attached.contains(&kind) {
            return Err(AttachError::AlreadyAttached);
        }
        let mut ends = lock(&self.stdio);
        let slot = match kind {
            StreamKind::Stdin => &mut ends.stdin,
            StreamKind::Stdout => &mut ends.stdout,
            StreamKind::Stderr => &mut ends.stderr,
            StreamKind::Pty => &mut ends.pty,
        };
        let fd = slot.take().ok_or(AttachError::NoSuchStream)?;
        attached.push(kind);
        Ok(fd)
    }

    /// Drops every end the host has not attached (the process then sees
    /// EOF on stdin / EPIPE on output instead of blocking forever).
    pub fn close_unattached(&self) {
        *lock(&self.stdio) = StdioEnds::default();
    }

    /// Current timestamps.
    pub fn timestamps(&self) -> Timestamps {
        lock(&self.state).timestamps
    }

    /// Records that the process exec'd. Its starter learns that late: the
    /// process may have run and exited (and the exit been recorded) first;
    /// then it exec'd no later than it exited, and its exit status says so.
    pub fn set_exec_time(&self, ns: u64) {
        let mut st = lock(&self.state);
        let ns = st.timestamps.exited_ns.map_or(ns, |exited| ns.min(exited));
        st.timestamps.exec_ns = Some(ns);
        if let Some(exit) = st.exit.as_mut() {
            exit.timestamps.exec_ns = Some(ns);
        }
    }

    /// Records the exit and wakes waiters. The exit's stamp may have been
    /// taken before the starter stamped the exec (both threads race): the
    /// process then exec'd no later than it exited.
    pub fn set_exit(&self, mut status: ExitStatus, exited_ns: u64) {
        let mut st = lock(&self.state);
        st.timestamps.exited_ns = Some(exited_ns);
        if st.timestamps.exec_ns.is_some_and(|exec| exec > exited_ns) {
            st.timestamps.exec_ns = Some(exited_ns);
        }
        status.timestamps = st.timestamps;
        st.exit = Some(status);
        self.changed.notify_all();
    }

    /// The exit status, if it exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        lock(&self.state).exit
    }

    /// Blocks until the process exited.
    pub fn wait_exit(&self) -> ExitStatus {
        let mut st = lock(&self.state);
        loop {
            if let Some(status) = st.exit {
                return status;
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Marks the exit status as delivered to the host.
    pub fn set_delivered(&self) {
        lock(&self.state).delivered = true;
        self.changed.notify_all();
    }

    /// Blocks until the exit status was delivered.
    pub fn wait_delivered(&self) {
        let mut st = lock(&self.state);
        while !st.delivered {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A container.
pub struct Container {
    /// Its id.
    pub id: String,
    /// Its init process.
    pub init: Arc<Proc>,
    /// The namespaces it created (`CLONE_NEW*`), joined by execs.
    pub clone_flags: libc::c_int,
    /// Its cgroup, if the guest has cgroups.
    pub cgroup: Option<Cgroup>,
    /// OOM kills in the cgroup before the container ran.
    pub oom_baseline: u64,
    /// Exec'd processes by exec id.
    pub execs: Mutex<HashMap<String, Arc<Proc>>>,
    /// The init, set up and waiting for `Start`.
    pub pending_start: Mutex<Option<Spawned>>,
    /// Its mount namespace, held open until the container is cleaned up.
    pub mount_ns: Mutex<Option<OwnedFd>>,
    /// Its compiled `linux.seccomp`, for exec'd processes.
    pub seccomp: Option<Arc<SeccompPlan>>,
}

impl Container {
    /// The process `exec_id` names (the init for `None`).
    pub fn process(&self, exec_id: Option<&str>) -> Option<Arc<Proc>> {
        match exec_id {
            None => Some(Arc::clone(&self.init)),
            Some(id) => lock(&self.execs).get(id).cloned(),
        }
    }

    /// Every exec'd process.
    pub fn exec_procs(&self) -> Vec<Arc<Proc>> {
        lock(&self.execs).values().cloned().collect()
    }

    /// Registers an exec id; false if taken.
    pub fn insert_exec(&self, exec_id: &str, proc: Arc<Proc>) -> bool {
        let mut execs = lock(&self.execs);
        if execs.contains_key(exec_id) {
            return false;
        }
        execs.insert(exec_id.to_owned(), proc);
        true
    }

    /// Whether `exec_id` is in use.
    pub fn has_exec(&self, exec_id: &str) -> bool {
        lock(&self.execs).contains_key(exec_id)
    }

    /// Takes the not-yet-started init.
    pub fn take_pending(&self) -> Option<Spawned> {
        lock(&self.pending_start).take()
    }
}

/// The longest a stream waits for its container (the host asks for less).
const MAX_STREAM_WAIT: Duration = Duration::from_secs(600);

/// How many create requests of each container id have ended, for streams
/// the host opens while their container is being created.
#[derive(Default)]
pub struct CreateEnds {
    log: Mutex<CreateLog>,
    ended: Condvar,
}

#[derive(Default)]
struct CreateLog {
    /// Bumped at every end.
    generation: u64,
    ended: HashMap<String, u64>,
}

impl CreateLog {
    fn count(&self, id: &str) -> u64 {
        self.ended.get(id).copied().unwrap_or(0)
    }
}

impl CreateEnds {
    /// A create request of `id` ended (its container, if made, is in the
    /// agent's table by now).
    pub fn ended(&self, id: String) {
        let mut log = lock(&self.log);
        // Bounded: ids are forgotten in bulk (a stream waiting on one of
        // them then waits out its time instead of failing at once).
        if log.ended.len() >= 1024 {
            log.ended.clear();
        }
        log.generation += 1;
        *log.ended.entry(id).or_default() += 1;
        drop(log);
        self.ended.notify_all();
    }

    /// `find`, again each time a create ends, until it finds the process,
    /// fails otherwise than with NotFound, a create of `id` has ended since
    /// the call began, or `wait` is over.
    pub fn wait_for<T>(
        &self,
        id: &str,
        wait: Duration,
        find: impl Fn() -> Result<T, ErrorBody>,
    ) -> Result<T, ErrorBody> {
        let deadline = Instant::now() + wait.min(MAX_STREAM_WAIT);
        let ended_before = lock(&self.log).count(id);
        loop {
            let generation = lock(&self.log).generation;
            let missing = match find() {
                Err(e) if e.code == ErrorCode::NotFound => e,
                found => return found,
            };
            let log = lock(&self.log);
            if log.generation != generation {
                // A create ended while `find` looked: look again.
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if log.count(id) > ended_before || left.is_zero() {
                return Err(missing);
            }
            drop(
                self.ended
                    .wait_timeout(log, left)
                    .unwrap_or_else(|e| e.into_inner()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn status() -> ExitStatus {
        ExitStatus {
            exit_code: 0,
            signal: None,
            oom_killed: false,
            output_drained: true,
            timestamps: Timestamps::default(),
        }
    }

    fn not_found() -> ErrorBody {
        ErrorBody {
            code: ErrorCode::NotFound,
            message: "no container".into(),
        }
    }

    /// A waiter on `ends` for "c" in a thread, finding `table`'s value.
    fn waiter(
        ends: &Arc<CreateEnds>,
        table: &Arc<Mutex<Option<u32>>>,
        wait: Duration,
    ) -> thread::JoinHandle<(Result<u32, ErrorBody>, Duration)> {
        let (ends, table) = (Arc::clone(ends), Arc::clone(table));
        thread::spawn(move || {
            let t = Instant::now();
            let r = ends.wait_for("c", wait, || lock(&table).ok_or_else(not_found));
            (r, t.elapsed())
        })
    }

    #[test]
    fn a_stream_waits_for_its_container_until_a_create_of_it_ends() {
        let long = Duration::from_secs(60);
        let ends = Arc::new(CreateEnds::default());
        let table = Arc::new(Mutex::new(None));
        // Created: the waiter gets the process once the create ended.
        let w = waiter(&ends, &table, long);
        thread::sleep(Duration::from_millis(50));
        *lock(&table) = Some(7);
        ends.ended("c".into());
        let (r, took) = w.join().unwrap();
        assert_eq!(r.unwrap(), 7);
        assert!(took < Duration::from_secs(10), "{took:?}");
        // Already there: at once.
        assert_eq!(waiter(&ends, &table, long).join().unwrap().0.unwrap(), 7);

        // A create that failed answers the waiter at once, not after `wait`;
        // so does one of another id only after its own.
        *lock(&table) = None;
        let w = waiter(&ends, &table, long);
        thread::sleep(Duration::from_millis(50));
        ends.ended("other".into());
        thread::sleep(Duration::from_millis(50));
        assert!(
            !w.is_finished(),
            "another container's create answered the stream"
        );
        ends.ended("c".into());
        let (r, took) = w.join().unwrap();
        assert_eq!(r.unwrap_err().code, ErrorCode::NotFound);
        assert!(took < Duration::from_secs(10), "{took:?}");

        // No create at all: the wait is over.
        let (r, took) = waiter(&ends, &table, Duration::from_millis(100))
            .join()
            .unwrap();
        assert_eq!(r.unwrap_err().code, ErrorCode::NotFound);
        assert!(took >= Duration::from_millis(100), "{took:?}");

        // Other errors are not waited on.
        let other = ends.wait_for("c", long, || {
            Err::<u32, _>(ErrorBody {
                code: ErrorCode::InvalidState,
                message: "x".into(),
            })
        });
        assert_eq!(other.unwrap_err().code, ErrorCode::InvalidState);
    }

    #[test]
    fn an_exit_recorded_before_the_exec_still_comes_after_it() {
        let created = Timestamps {
            created_ns: Some(10),
            ..Timestamps::default()
        };
        // The usual order.
        let p = Proc::new(1, false, false, StdioEnds::default(), None, created);
        p.set_exec_time(20);
        p.set_exit(status(), 30);
        let t = p.exit_status().unwrap().timestamps;
        assert_eq!((t.exec_ns, t.exited_ns), (Some(20), Some(30)));
        // The process exec'd, ran and exited before its starter stamped it.
        let p = Proc::new(1, false, false, StdioEnds::default(), None, created);
        p.set_exit(status(), 30);
        p.set_exec_time(40);
        let t = p.exit_status().unwrap().timestamps;
        assert_eq!((t.exec_ns, t.exited_ns), (Some(30), Some(30)));
        assert_eq!(p.timestamps().exec_ns, Some(30));
        // The exit was stamped first but recorded after the exec's stamp.
        let p = Proc::new(1, false, false, StdioEnds::default(), None, created);
        p.set_exec_time(40);
        p.set_exit(status(), 30);
        let t = p.exit_status().unwrap().timestamps;
        assert_eq!((t.exec_ns, t.exited_ns), (Some(30), Some(30)));
        assert_eq!(p.timestamps().exec_ns, Some(30));
    }
}
