//! Post-copy: the guest moves before all of its memory has, and the
//! destination pulls the rest on first touch.
//!
//! ```text
//!  source (guest still running)              destination
//!  STALE (the last round's dirty) --------->  punches those pages out of its
//!  DECISION "sync"                --------->  memfd as they arrive
//!                                 <---------  DECISION "synced"
//!  pauses the guest
//!  STALE (dirtied since)          --------->  punches those too
//!  MACHINE, VCPU x N, DEVICE x M  --------->  registers RAM with
//!  END                            --------->  userfaultfd, starts its puller,
//!                                             loads the state
//!                                 <---------  RESUMED, then its vCPUs run
//!  serves, in one loop:
//!    REQUEST (runs touched)       <---------  a vCPU or device touched a
//!    PAGES / ZERO-PAGES at once   --------->  stale page: it waits until the
//!                                             page is filled (UFFDIO_COPY)
//!    the rest, in order, 64 pages a batch ->  filled where still missing
//!  DECISION "postcopy-done"       --------->  every stale page is here
//!                                 <---------  DECISION "postcopy-complete"
//!  exits with the report                      drops userfaultfd
//! ```
//!
//! The stale list goes in two parts so that the destination's punching,
//! about 3 ms for 64 MiB here, happens while the guest still runs on the
//! source: only the pages dirtied in the last milliseconds are taken out
//! during the downtime. A destination takes out whatever STALE runs come,
//! whenever they come before END, so either part may be empty.
//!
//! The source reads nothing after the destination's last word: the
//! destination may exit right after it (its guest ended). A guest that
//! ends on the destination while pages are still to come ends post-copy
//! there too: the destination sends DECISION "postcopy-guest-ended"
//! before it exits, and the source, whose pages no guest needs any more,
//! ends with its report instead of waiting to resume.
//!
//! A page that was never stale (zero on the source, never sent, so a hole
//! in the destination's memfd too) is filled with zeros by the puller
//! when touched, without asking. A page is filled at most once: a copy
//! onto a page already present fails (EEXIST) and is skipped, so a page
//! sent twice (pushed, and requested while in flight) never overwrites
//! what the guest wrote since.
//!
//! **If the link breaks.** Before the source has read RESUMED the guest is
//! still the source's: it resumes there, as in pre-copy, and the
//! destination never runs it. After RESUMED the guest's memory is split:
//! the destination holds the guest and every page it has, the source the
//! pages still stale. Neither can finish alone, so neither gives up:
//! the destination goes on running the guest, and a vCPU or device that
//! touches a page still on the source waits for it; the destination listens
//! again on its `--incoming` address (same TLS or peer checks). The source
//! keeps its pages and waits for `ferry ctl migrate --resume URI`, which
//! reconnects: the destination answers with the runs it still lacks
//! (whatever was in flight is sent again) and serving goes on. If either
//! process dies in this phase the guest is lost; that is post-copy's
//! price, and why ferry uses it only when asked (`--postcopy`) or when
//! pre-copy cannot converge.

pub mod pull;
pub mod serve;

/// The destination's word that its guest ended during post-copy.
pub(crate) const GUEST_ENDED: &[u8] = b"postcopy-guest-ended";

/// One bit per RAM page (dirty-bitmap numbering): pages still to move.
#[derive(Debug, Clone)]
pub struct PageSet {
    words: Vec<u64>,
    count: u64,
    /// Pages it can hold.
    pages: u64,
}

impl PageSet {
    /// An empty set for `pages` pages.
    pub fn new(pages: u64) -> Self {
        PageSet { words: vec![0; pages.div_ceil(64) as usize], count: 0, pages }
    }

    /// Add `page`; false if it was there (or beyond the set).
    pub fn insert(&mut self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let Some(w) = self.words.get_mut((page / 64) as usize) else { return false };
        let bit = 1u64 << (page % 64);
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        self.count += 1;
        true
    }

    /// Take `page` out; false if it was not there.
    pub fn remove(&mut self, page: u64) -> bool {
        let Some(w) = self.words.get_mut((page / 64) as usize) else { return false };
        let bit = 1u64 << (page % 64);
        if *w & bit == 0 {
            return false;
        }
        *w &= !bit;
        self.count -= 1;
        true
    }

    /// Is `page` in the set?
    pub fn contains(&self, page: u64) -> bool {
        self.words.get((page / 64) as usize).is_some_and(|w| w & (1u64 << (page % 64)) != 0)
    }

    /// Pages the set can hold.
    pub fn capacity(&self) -> u64 {
        self.pages
    }

    /// Pages in the set.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Is it empty?
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The pages in the set, ascending.
    pub fn pages(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.count as usize);
        crate::memory::push_set_bits(self.words.iter().copied(), 0, &mut out);
        out
    }

    /// Take up to `n` pages out of the set, the lowest from `*from` on
    /// (wrapping to the start), and move `*from` past them.
    pub fn take(&mut self, from: &mut u64, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n);
        let total = self.words.len() as u64 * 64;
        let mut page = *from % total.max(1);
        let mut seen = 0u64;
        while out.len() < n && self.count > 0 && seen < total {
            let word = self.words[(page / 64) as usize] >> (page % 64);
            if word == 0 {
                let skip = 64 - page % 64;
                seen += skip;
                page = (page + skip) % total;
                continue;
            }
            let step = u64::from(word.trailing_zeros());
            page += step;
            seen += step;
            self.remove(page);
            out.push(page);
            page = (page + 1) % total;
            seen += 1;
        }
        *from = page;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_set_hands_out_each_page_once_in_order() {
        let mut s = PageSet::new(200);
        for p in [3, 64, 65, 130, 199] {
            assert!(s.insert(p));
        }
        assert!(!s.insert(3), "already there");
        assert!(!s.insert(200), "beyond the set");
        assert_eq!(s.len(), 5);
        let mut from = 60;
        assert_eq!(s.take(&mut from, 2), [64, 65]);
        assert_eq!(s.take(&mut from, 10), [130, 199, 3], "wraps to the start");
        assert!(s.is_empty());
        assert!(s.take(&mut from, 10).is_empty());
        s.insert(7);
        assert!(s.contains(7) && !s.contains(8));
        assert_eq!(s.pages(), [7]);
        assert!(s.remove(7) && !s.remove(7));
    }
}
