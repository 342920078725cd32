//! A sampling profiler for the guest: a thread kicks every vCPU out of
//! KVM_RUN at a fixed rate and the vCPU records its guest RIP. On kvm_pvm
//! hosts the guest kernel is emulated by KVM, so `perf` on the host cannot
//! see where the guest spends its time; this can. Off unless asked for.

use std::io::{self, Write};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::vcpu::{kick_signal, monotonic_ns};

/// At most this many samples are kept (about 16 MiB): a long-running VM
/// profiled by mistake cannot grow the VMM without bound.
pub const MAX_SAMPLES: usize = 1 << 20;

/// Highest sampling rate accepted.
pub const MAX_HZ: u32 = 10_000;

/// One sample: when, which vCPU, where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ns: u64,
    /// vCPU index.
    pub vcpu: u8,
    /// Guest instruction pointer.
    pub rip: u64,
}

/// Samples shared by the vCPU threads.
#[derive(Default)]
pub struct Profiler {
    hz: AtomicU32,
    samples: Mutex<Vec<Sample>>,
    dropped: AtomicU64,
}

impl Profiler {
    /// Sampling rate (0: off).
    pub fn hz(&self) -> u32 {
        self.hz.load(Ordering::Relaxed)
    }

    /// Turns sampling on at `hz` (clamped to 1..=`MAX_HZ`); takes effect
    /// when the VM runs.
    pub fn enable(&self, hz: u32) {
        self.hz.store(hz.clamp(1, MAX_HZ), Ordering::Relaxed);
    }

    /// Called by a vCPU thread after a kick.
    pub fn record(&self, vcpu: u8, rip: u64) {
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() >= MAX_SAMPLES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        s.push(Sample {
            ns: monotonic_ns(),
            vcpu,
            rip,
        });
    }

    /// The samples so far, in the order they were taken.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Writes `# husk-profile v1 hz=N dropped=N` and one `ns vcpu rip` line
    /// per sample (rip in hex).
    pub fn write_to(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "# husk-profile v1 hz={} dropped={}",
            self.hz(),
            self.dropped.load(Ordering::Relaxed)
        )?;
        for s in self.samples() {
            writeln!(out, "{} {} {:x}", s.ns, s.vcpu, s.rip)?;
        }
        Ok(())
    }
}

/// The thread that kicks the vCPUs; stops when dropped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Starts kicking `threads` (vCPU threads, alive until this is dropped)
    /// `hz` times a second.
    pub fn start<T>(hz: u32, threads: &[&JoinHandle<T>]) -> io::Result<Self> {
        let tids: Vec<libc::pthread_t> = threads.iter().map(|t| t.as_pthread_t()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let period = Duration::from_nanos(1_000_000_000 / u64::from(hz.clamp(1, MAX_HZ)));
        let thread = std::thread::Builder::new()
            .name("profiler".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(period);
                    for &t in &tids {
                        // SAFETY: the vCPU threads are joined only after this
                        // thread is (Sampler is dropped first), so each
                        // pthread_t names a thread that has not been joined;
                        // the kick handler only stores one byte.
                        unsafe { libc::pthread_kill(t, kick_signal()) };
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_bounded_and_written() {
        let p = Profiler::default();
        p.enable(0);
        assert_eq!(p.hz(), 1);
        p.enable(1_000_000);
        assert_eq!(p.hz(), MAX_HZ);
        for i in 0..MAX_SAMPLES + 5 {
            p.record(0, i as u64);
        }
        assert_eq!(p.samples().len(), MAX_SAMPLES);
        let mut out = Vec::new();
        p.write_to(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some(format!("# husk-profile v1 hz={MAX_HZ} dropped=5").as_str())
        );
        let first: Vec<&str> = lines.next().unwrap().split(' ').collect();
        assert_eq!(&first[1..], ["0", "0"]);
    }
}
