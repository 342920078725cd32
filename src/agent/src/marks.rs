//! Setup steps and when each ended (CLOCK_BOOTTIME), so the host can see
//! where a container's creation spends its time. Kept per thread: the
//! request's handler notes its steps, and a process it forks inherits the
//! list, adds its own and sends the lot back with READY.

use std::cell::RefCell;

use crate::sys::boottime_ns;

/// Most steps one list keeps (a bound on what a child can send back).
const MAX_STEPS: usize = 64;

thread_local! {
    static STEPS: RefCell<Vec<(&'static str, u64)>> = const { RefCell::new(Vec::new()) };
}

/// Starts a new list on this thread: a `start` step, now.
pub fn start() {
    STEPS.with(|s| {
        let mut s = s.borrow_mut();
        s.clear();
        s.push(("start", boottime_ns()));
    });
}

/// Notes that `step` ended now.
pub fn mark(step: &'static str) {
    STEPS.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < MAX_STEPS {
            s.push((step, boottime_ns()));
        }
    });
}

/// This thread's steps so far.
pub fn snapshot() -> Vec<(&'static str, u64)> {
    STEPS.with(|s| s.borrow().clone())
}

/// Makes `steps` this thread's list (a thread that goes on with another's).
pub fn replace(steps: Vec<(&'static str, u64)>) {
    STEPS.with(|s| *s.borrow_mut() = steps);
}

/// This thread's steps as `name ns` lines.
pub fn encode() -> Vec<u8> {
    STEPS.with(|s| {
        s.borrow()
            .iter()
            .map(|(name, ns)| format!("{name} {ns}\n"))
            .collect::<String>()
            .into_bytes()
    })
}

/// Steps from [`encode`]'s output; malformed lines are skipped.
pub fn decode(bytes: &[u8]) -> Vec<husk_proto::SetupStep> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|l| {
            let (step, ns) = l.rsplit_once(' ')?;
            Some(husk_proto::SetupStep {
                step: step.to_owned(),
                ns: ns.parse().ok()?,
            })
        })
        .take(MAX_STEPS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip_and_start_over() {
        start();
        mark("one");
        mark("two words");
        let steps = decode(&encode());
        let names: Vec<&str> = steps.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(names, ["start", "one", "two words"]);
        assert!(steps.windows(2).all(|w| w[0].ns <= w[1].ns));
        start();
        assert_eq!(decode(&encode()).len(), 1);
        assert!(decode(b"junk\nx 12\ny notanumber\n").len() == 1);
        for _ in 0..100 {
            mark("many");
        }
        assert_eq!(decode(&encode()).len(), MAX_STEPS);
    }
}
