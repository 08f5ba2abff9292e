//! The switch-over policy of pre-copy: after each round, whether to send
//! another, throttle the guest, switch over, move it by post-copy, or
//! give up.
//!
//! When to switch over: pre-copy aims at [`AIM_DOWNTIME_MS`] (or the
//! user's `--max-downtime`, if lower), not at the ceiling. Rounds go on
//! while they still shrink what is dirty; the guest is paused as soon as
//! the rest is expected to go within the aim, or, once rounds stop
//! helping ([`STALLED_ROUNDS`] in a row without a new low) or
//! [`MAX_ROUNDS`] have passed, if it is within the ceiling. Past the
//! round limit ferry stops and copies anyway if the expected downtime is
//! within twice the ceiling; otherwise it gives up, says so, and the
//! source guest keeps running.
//!
//! A guest that outruns the link (a round left more dirty than the one
//! before while the rest is above the ceiling, or rounds stopped helping
//! and it is still above) is throttled (auto-converge): its vCPUs sleep
//! [`THROTTLE_FIRST`] percent of the time, [`THROTTLE_STEP`] more after
//! each further round that does not fit, up to [`THROTTLE_MAX`]
//! (`vcpu.rs` says how a throttled vCPU sleeps). Memory that devices or
//! the host write is not slowed by it. The throttle ends with the
//! migration, whichever way it ends.
//!
//! Post-copy: when the user asked for it (`--postcopy`) and the
//! destination takes it, a round that leaves the rest above the ceiling
//! and less than a tenth smaller than the round before moves the guest
//! at once (rounds that keep pace with the guest only resend its working
//! set); it also takes the place of the throttle. Without `--postcopy`
//! it takes the place of giving up, where the destination can take it
//! (the caller, `source.rs`, makes that choice).

/// Rounds of pre-copy before the convergence policy applies.
pub const MAX_ROUNDS: u32 = 30;
/// The downtime pre-copy aims at while rounds still help, in milliseconds.
pub const AIM_DOWNTIME_MS: f64 = 2.0;
/// Rounds in a row that leave more dirty than the best round so far
/// before pre-copy counts as stalled and settles for the ceiling.
pub const STALLED_ROUNDS: u32 = 3;
/// Default downtime limit, in milliseconds.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 300;
/// The first throttle, in percent of the time the vCPUs sleep.
pub const THROTTLE_FIRST: u8 = 20;
/// How much the throttle rises after each round that still does not fit.
pub const THROTTLE_STEP: u8 = 10;
/// The highest throttle.
pub const THROTTLE_MAX: u8 = 99;

/// What pre-copy does after a round's dirty set is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Pause the guest and send the rest.
    SwitchOver,
    /// Send the dirty set and look again.
    Another,
    /// The guest outruns the link: throttle its vCPUs to sleep this
    /// percent of the time, send the dirty set and look again.
    Throttle(u8),
    /// The guest outruns the link: stop, the source runs on.
    GiveUp,
    /// Move the guest now and the rest of memory after it (chosen by the
    /// caller in place of `Throttle` or `GiveUp`).
    Postcopy,
}

/// The switch-over policy (the module's header says it in words).
#[derive(Debug)]
pub(crate) struct SwitchOver {
    /// The user's ceiling, seconds.
    ceiling: f64,
    /// What pre-copy aims at while rounds help, seconds.
    aim: f64,
    /// Rounds before a switch-over is allowed (a test knob).
    min_rounds: u32,
    max_rounds: u32,
    fewest_dirty: u64,
    stalled: u32,
    /// The throttle asked for so far, in percent.
    throttle: u8,
    /// The dirty set the last round left.
    last_dirty: u64,
    /// Post-copy was asked for (and the destination takes it).
    postcopy: bool,
}

impl SwitchOver {
    /// `postcopy`: move by post-copy as soon as a round stops shrinking
    /// the rest above the ceiling, instead of throttling.
    pub(crate) fn new(ceiling: f64, min_rounds: u32, postcopy: bool) -> Self {
        SwitchOver {
            ceiling,
            aim: (AIM_DOWNTIME_MS / 1e3).min(ceiling),
            min_rounds,
            max_rounds: MAX_ROUNDS.max(min_rounds + 1),
            fewest_dirty: u64::MAX,
            stalled: 0,
            throttle: 0,
            last_dirty: u64::MAX,
            postcopy,
        }
    }

    /// Round `round` (from 1) left `dirty_bytes`, expected to take
    /// `expected` seconds at the link's rate.
    pub(crate) fn after_round(&mut self, round: u32, dirty_bytes: u64, expected: f64) -> Step {
        if dirty_bytes < self.fewest_dirty {
            (self.fewest_dirty, self.stalled) = (dirty_bytes, 0);
        } else {
            self.stalled += 1;
        }
        let settle = self.stalled >= STALLED_ROUNDS || round >= self.max_rounds;
        // More dirty than the round before left: the guest dirtied memory
        // faster than that round sent it.
        let outrun = dirty_bytes > self.last_dirty;
        // Less than a tenth off the round before: pre-copy is not getting
        // anywhere (the guest dirties about as fast as the link sends).
        let level = dirty_bytes as f64 >= 0.9 * self.last_dirty as f64;
        self.last_dirty = dirty_bytes;
        if round > self.min_rounds && (expected <= self.aim || (settle && expected <= self.ceiling)) {
            return Step::SwitchOver;
        }
        if self.postcopy && round > self.min_rounds && expected > self.ceiling && (level || settle) {
            return Step::Postcopy;
        }
        if (settle || (outrun && expected > self.ceiling))
            && round < self.max_rounds
            && self.throttle < THROTTLE_MAX
        {
            self.throttle = match self.throttle {
                0 => THROTTLE_FIRST,
                t => t.saturating_add(THROTTLE_STEP).min(THROTTLE_MAX),
            };
            return Step::Throttle(self.throttle);
        }
        if round >= self.max_rounds {
            return if expected <= 2.0 * self.ceiling { Step::SwitchOver } else { Step::GiveUp };
        }
        Step::Another
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const CEILING: f64 = 0.3;

    #[test]
    fn a_rest_that_fits_the_aim_switches_over_at_once() {
        let mut p = SwitchOver::new(CEILING, 0, false);
        assert_eq!(p.after_round(1, 64 * 1024, 0.0001), Step::SwitchOver);
    }

    #[test]
    fn rounds_go_on_while_they_shrink_the_rest_though_it_fits_the_ceiling() {
        let mut p = SwitchOver::new(CEILING, 0, false);
        // 10 MiB at 700 MB/s: 15 ms, within 300 ms but not the 2 ms aim.
        assert_eq!(p.after_round(1, 10 * MIB, 0.015), Step::Another);
        assert_eq!(p.after_round(2, 2 * MIB, 0.003), Step::Another);
        assert_eq!(p.after_round(3, MIB / 2, 0.0008), Step::SwitchOver);
    }

    #[test]
    fn once_rounds_stop_helping_the_ceiling_is_enough() {
        let mut p = SwitchOver::new(CEILING, 0, false);
        assert_eq!(p.after_round(1, 4 * MIB, 0.006), Step::Another);
        for round in 2..2 + STALLED_ROUNDS - 1 {
            assert_eq!(p.after_round(round, 4 * MIB, 0.006), Step::Another, "round {round}");
        }
        assert_eq!(p.after_round(1 + STALLED_ROUNDS, 4 * MIB, 0.006), Step::SwitchOver);
    }

    #[test]
    fn a_lower_ceiling_than_the_aim_is_the_aim() {
        let mut p = SwitchOver::new(0.001, 0, false);
        assert_eq!(p.after_round(1, MIB, 0.0015), Step::Another);
        assert_eq!(p.after_round(2, MIB / 4, 0.0009), Step::SwitchOver);
    }

    #[test]
    fn a_guest_that_outruns_the_link_is_throttled_then_given_up_after_the_round_limit() {
        let mut p = SwitchOver::new(CEILING, 0, false);
        let mut steps = Vec::new();
        for round in 1..=MAX_ROUNDS {
            steps.push(p.after_round(round, 512 * MIB, 0.9));
        }
        let stalled = STALLED_ROUNDS as usize;
        assert!(steps[..stalled].iter().all(|s| *s == Step::Another), "{steps:?}");
        let throttles: Vec<u8> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Throttle(p) => Some(*p),
                _ => None,
            })
            .collect();
        assert_eq!(
            throttles,
            [20, 30, 40, 50, 60, 70, 80, 90, 99],
            "from the first stalled round on, one per round"
        );
        assert_eq!(steps[stalled], Step::Throttle(THROTTLE_FIRST));
        assert_eq!(steps.last(), Some(&Step::GiveUp), "at the round limit, still above twice the ceiling");
        let mut q = SwitchOver::new(CEILING, 0, false);
        for round in 1..MAX_ROUNDS {
            q.after_round(round, 256 * MIB, 0.5);
        }
        assert_eq!(q.after_round(MAX_ROUNDS, 256 * MIB, 0.5), Step::SwitchOver, "within twice the ceiling");
    }

    #[test]
    fn a_dirty_set_that_grows_above_the_ceiling_is_throttled_at_once() {
        let mut p = SwitchOver::new(CEILING, 0, false);
        assert_eq!(p.after_round(1, 100 * MIB, 0.4), Step::Another);
        assert_eq!(p.after_round(2, 150 * MIB, 0.6), Step::Throttle(THROTTLE_FIRST), "it grew");
        assert_eq!(p.after_round(3, 200 * MIB, 0.8), Step::Throttle(30));
        let mut q = SwitchOver::new(CEILING, 0, false);
        assert_eq!(q.after_round(1, 10 * MIB, 0.02), Step::Another);
        assert_eq!(q.after_round(2, 12 * MIB, 0.03), Step::Another, "growing, but within the ceiling");
    }

    #[test]
    fn a_throttled_guest_that_fits_the_ceiling_switches_over() {
        let mut p = SwitchOver::new(CEILING, 0, false);
        for round in 1..=STALLED_ROUNDS {
            p.after_round(round, 512 * MIB, 0.9);
        }
        assert_eq!(p.after_round(STALLED_ROUNDS + 1, 512 * MIB, 0.9), Step::Throttle(20));
        assert_eq!(p.after_round(STALLED_ROUNDS + 2, 600 * MIB, 1.0), Step::Throttle(30), "still too much");
        // The throttle bites: fewer pages, though above the 2 ms aim.
        assert_eq!(
            p.after_round(STALLED_ROUNDS + 3, 8 * MIB, 0.012),
            Step::Another,
            "a new low: rounds help"
        );
        for round in STALLED_ROUNDS + 4..STALLED_ROUNDS + 3 + STALLED_ROUNDS {
            assert_eq!(p.after_round(round, 8 * MIB, 0.012), Step::Another, "round {round}");
        }
        assert_eq!(
            p.after_round(STALLED_ROUNDS + 3 + STALLED_ROUNDS, 8 * MIB, 0.012),
            Step::SwitchOver,
            "stalled again, but within the ceiling"
        );
    }

    #[test]
    fn the_minimum_rounds_knob_holds_the_switch_over_back() {
        let mut p = SwitchOver::new(CEILING, 3, false);
        for round in 1..=3 {
            assert_eq!(p.after_round(round, 0, 0.0), Step::Another, "round {round}");
        }
        assert_eq!(p.after_round(4, 0, 0.0), Step::SwitchOver);
    }

    #[test]
    fn with_postcopy_a_round_that_does_not_shrink_the_rest_moves_the_guest_at_once() {
        let mut p = SwitchOver::new(CEILING, 0, true);
        // 64 MiB at 32 MiB/s, then as much again: the guest keeps pace.
        assert_eq!(p.after_round(1, 64 * MIB, 2.0), Step::Another);
        assert_eq!(p.after_round(2, 63 * MIB, 1.97), Step::Postcopy);
        // A rest that shrinks keeps pre-copy going; one that fits switches over.
        let mut p = SwitchOver::new(CEILING, 0, true);
        assert_eq!(p.after_round(1, 64 * MIB, 2.0), Step::Another);
        assert_eq!(p.after_round(2, 32 * MIB, 1.0), Step::Another);
        assert_eq!(p.after_round(3, MIB / 4, 0.001), Step::SwitchOver);
    }
}
