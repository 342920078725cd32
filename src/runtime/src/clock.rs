//! The guest's clock on the host's. The agent stamps its events with the
//! guest's `CLOCK_BOOTTIME`, which starts when the guest kernel sets up its
//! clock, not at the VM's first KVM_RUN (on kvm_pvm hosts that is seconds
//! later). Both clocks advance at the same rate (kvm-clock is the host's
//! TSC), so one offset, taken from the agent's stamped `Hello`, maps every
//! agent stamp onto the host's `CLOCK_MONOTONIC`.

/// host `CLOCK_MONOTONIC` ns = guest `CLOCK_BOOTTIME` ns + `offset_ns`,
/// within ± `error_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestClock {
    pub offset_ns: i64,
    pub error_ns: u64,
}

impl GuestClock {
    /// From one exchange: the host started connecting at `sent`, the agent
    /// stamped its `Hello` `guest`, the host had read it at `received`
    /// (host ns). The stamp lies between the two, so the midpoint is off by
    /// at most half the round trip. None when the stamps are impossible
    /// (the agent's value is untrusted).
    pub fn from_exchange(sent: u64, guest: u64, received: u64) -> Option<Self> {
        let rtt = received.checked_sub(sent)?;
        let mid = i128::from(sent) + i128::from(rtt / 2);
        let offset_ns = i64::try_from(mid - i128::from(guest)).ok()?;
        Some(GuestClock {
            offset_ns,
            error_ns: rtt.div_ceil(2),
        })
    }

    /// The tighter of `self` and `other`.
    pub fn tighter(self, other: Option<GuestClock>) -> GuestClock {
        match other {
            Some(o) if o.error_ns < self.error_ns => o,
            _ => self,
        }
    }

    /// A guest stamp on the host's clock (clamped to the u64 range).
    pub fn to_host(&self, guest_ns: u64) -> u64 {
        let v = i128::from(guest_ns) + i128::from(self.offset_ns);
        v.clamp(0, i128::from(u64::MAX)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_is_the_midpoint_of_the_exchange() {
        // Host sent at 10.000 s, read the reply at 10.004 s; the agent's
        // clock said 2.002 s: the guest clock started 8 s after the host's.
        let c = GuestClock::from_exchange(10_000_000_000, 2_002_000_000, 10_004_000_000).unwrap();
        assert_eq!(c.offset_ns, 8_000_000_000);
        assert_eq!(c.error_ns, 2_000_000);
        assert_eq!(c.to_host(2_500_000_000), 10_500_000_000);
    }

    #[test]
    fn impossible_or_hostile_stamps_are_refused_or_clamped() {
        assert_eq!(GuestClock::from_exchange(10, 5, 9), None);
        assert_eq!(GuestClock::from_exchange(0, u64::MAX, 0), None);
        let c = GuestClock::from_exchange(0, 1 << 62, 0).unwrap();
        assert_eq!(c.to_host(0), 0);
        let c = GuestClock::from_exchange(u64::MAX - 1, 0, u64::MAX);
        assert_eq!(c, None, "offset beyond i64");
        let c = GuestClock::from_exchange(1 << 62, 0, 1 << 62).unwrap();
        assert_eq!(c.to_host(u64::MAX), u64::MAX);
    }

    #[test]
    fn the_tighter_exchange_wins() {
        let wide = GuestClock::from_exchange(0, 5, 100).unwrap();
        let tight = GuestClock::from_exchange(40, 5, 50).unwrap();
        assert_eq!(wide.tighter(Some(tight)), tight);
        assert_eq!(tight.tighter(Some(wide)), tight);
        assert_eq!(tight.tighter(None), tight);
    }
}
