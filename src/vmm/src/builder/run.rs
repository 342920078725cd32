//! Running a built VM: the event loop on the calling thread, the vCPU
//! threads already started, until the guest stops or is stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use super::{ConsoleInputSource, Vm};
use crate::api::ApiWatcher;
use crate::event_loop::{self, ConsoleInput, ExitWatcher, RawTerminal, SignalWatcher};
use crate::exit::VmExit;
use crate::seccomp::{self, ThreadKind};
use crate::vstate::profile::Sampler;
use crate::vstate::vcpu::VcpuCommand;

impl Vm {
    /// Runs the guest until it stops; returns why.
    pub fn run(self, input: ConsoleInputSource) -> VmExit {
        self.run_with(input, true)
    }

    /// Runs the guest until it stops. With `stop_on_signals`, SIGINT,
    /// SIGTERM and SIGHUP stop the VM; without, the caller handles them
    /// (`husk run` forwards them to the container).
    pub fn run_with(self, input: ConsoleInputSource, stop_on_signals: bool) -> VmExit {
        self.run_as(input, stop_on_signals, false)
    }

    /// [`Vm::run_with`], and the calling thread confines itself to the
    /// teardown's syscalls once the event loop runs (the VM's seccomp mode:
    /// [`ThreadKind::Teardown`]). The filter stays after this returns: call
    /// it from a thread that does no more than report the exit, write to
    /// fds it holds and end (`husk vm`'s main thread, a sandbox's VMM thread).
    pub fn run_confined(self, input: ConsoleInputSource, stop_on_signals: bool) -> VmExit {
        self.run_as(input, stop_on_signals, true)
    }

    fn run_as(self, input: ConsoleInputSource, stop_on_signals: bool, confine: bool) -> VmExit {
        let hz = self.profiler.hz();
        let sampler = if hz > 0 {
            let threads: Vec<_> = self.vcpus.iter().map(|v| &v.thread).collect();
            Sampler::start(hz, &threads)
                .map_err(|e| tracing::warn!("no profile: cannot start the sampler: {e}"))
                .ok()
        } else {
            None
        };
        // The guest runs first: nothing below is needed before its first
        // KVM_RUN (what it signals meanwhile waits in eventfds, which the
        // loop reads once it runs).
        for v in &self.vcpus {
            v.send(VcpuCommand::Resume);
        }
        // The loop runs on a thread of its own, which filters its syscalls;
        // the teardown below (vCPU joins, devices dropped: virtiofsd
        // reaped, the vsock socket unlinked) stays on the caller's.
        let result = std::thread::scope(|s| {
            let looped = std::thread::Builder::new()
                .name("event-loop".into())
                .spawn_scoped(s, || self.run_inner(input, stop_on_signals));
            // After the spawn: a thread inherits its creator's filter, and
            // the event loop's calls are not the teardown's.
            if confine && looped.is_ok() {
                if let Err(e) = seccomp::install(ThreadKind::Teardown, self.seccomp) {
                    self.latch.stop(VmExit::VmmError(e.to_string()));
                }
            }
            match looped.map(|t| t.join()) {
                Ok(Ok(exit)) => exit,
                Ok(Err(_)) => VmExit::VmmError("the event loop panicked".into()),
                Err(e) => VmExit::VmmError(format!("cannot start the event loop: {e}")),
            }
        });
        // Before the vCPU threads are joined: the sampler signals them.
        drop(sampler);
        for v in &self.vcpus {
            v.send(VcpuCommand::Exit);
        }
        let Vm {
            vcpus,
            serial,
            io,
            latch,
            ..
        } = self;
        for v in vcpus {
            v.join();
        }
        serial.lock().unwrap_or_else(|e| e.into_inner()).flush();
        let unhandled = io.unhandled_count();
        if unhandled > 0 {
            tracing::info!("{unhandled} guest accesses to unclaimed ports/MMIO were ignored");
        }
        drop(latch);
        result
    }

    fn run_inner(&self, input: ConsoleInputSource, stop_on_signals: bool) -> VmExit {
        let mut em = match EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new() {
            Ok(em) => em,
            Err(e) => return VmExit::VmmError(format!("cannot create the event loop: {e:?}")),
        };
        let done = Arc::new(AtomicBool::new(false));
        em.add_subscriber(Arc::new(Mutex::new(ExitWatcher::new(
            self.latch.clone(),
            done.clone(),
        ))));
        if stop_on_signals {
            match event_loop::signalfd(&event_loop::STOP_SIGNALS) {
                Ok(fd) => {
                    em.add_subscriber(Arc::new(Mutex::new(SignalWatcher::new(
                        fd,
                        self.latch.clone(),
                    ))));
                }
                Err(e) => tracing::warn!("cannot watch termination signals: {e}"),
            }
        }
        let _raw = match input {
            ConsoleInputSource::Fd(fd) => {
                match self.fifo_drained.try_clone() {
                    Ok(drained) => {
                        em.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
                            fd,
                            self.serial.clone(),
                            drained,
                        ))));
                    }
                    Err(e) => tracing::warn!("no console input: {e}"),
                }
                RawTerminal::enter(fd)
            }
            ConsoleInputSource::None => None,
        };
        for dev in &self.devices {
            em.add_subscriber(dev.clone());
        }
        let api_pending = Arc::new(AtomicBool::new(false));
        if let Some(api) = &self.api {
            em.add_subscriber(Arc::new(Mutex::new(ApiWatcher::new(
                api.raw_fd(),
                api_pending.clone(),
            ))));
        }
        // Everything the loop needs is open: from here it only serves.
        if let Err(e) = seccomp::install(ThreadKind::EventLoop, self.seccomp) {
            return VmExit::VmmError(e.to_string());
        }
        while !done.load(Ordering::SeqCst) {
            if let Err(e) = em.run() {
                self.latch
                    .stop(VmExit::VmmError(format!("event loop failed: {e:?}")));
                break;
            }
            if api_pending.swap(false, Ordering::SeqCst) {
                self.serve_api();
            }
        }
        self.latch
            .reason()
            .unwrap_or_else(|| VmExit::VmmError("VM stopped without a reason".into()))
    }
}
