//! One timer queue for every volume's renewal.
//!
//! A single task owns a [`DelayQueue`]; publishing, recovery and renewals
//! send it `schedule`/`cancel` commands over a channel. Due volumes are
//! renewed with bounded concurrency; each renewal reports when the volume
//! is due next (its renewal point, or a backoff after a failure), and the
//! loop re-arms the timer. Shutdown arrives on a `watch` channel and drains
//! the renewals in flight.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::time::DelayQueue;
use tokio_util::time::delay_queue::Key;

use crate::issuer::BoxFuture;
use crate::paths::VolumeId;

/// Something that renews a volume and says when to come back.
pub trait Renew: Send + Sync + 'static {
    /// Renews `volume`; returns the delay until it is due again, or `None`
    /// if there is nothing to arm (it is gone, or something else will
    /// schedule it).
    fn renew(&self, volume: VolumeId) -> BoxFuture<'_, Option<Duration>>;
}

#[derive(Debug)]
enum Command {
    Schedule(VolumeId, Duration),
    Cancel(VolumeId),
}

/// Sends commands to the rotation loop. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RotationHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl RotationHandle {
    /// (Re)arms the volume's timer to fire after `after`.
    pub fn schedule(&self, volume: VolumeId, after: Duration) {
        // A closed channel means the loop has shut down: nothing to arm.
        let _ = self.tx.send(Command::Schedule(volume, after));
    }

    /// Disarms the volume's timer.
    pub fn cancel(&self, volume: VolumeId) {
        let _ = self.tx.send(Command::Cancel(volume));
    }
}

/// The loop's side of the channel; run it with [`RotationQueue::run`].
#[derive(Debug)]
pub struct RotationQueue {
    rx: mpsc::UnboundedReceiver<Command>,
}

/// Creates a handle and the queue it feeds.
pub fn channel() -> (RotationHandle, RotationQueue) {
    let (tx, rx) = mpsc::unbounded_channel();
    (RotationHandle { tx }, RotationQueue { rx })
}

/// Longest single timer; longer waits are re-armed (DelayQueue's range is
/// about two years).
const MAX_TIMER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Renewals due within the same slot start together: the loop wakes once
/// per slot rather than once per volume, and their CA calls share the
/// connection's writes. A renewal starts at most this much later than its
/// point (renewal points are minutes to hours before expiry).
pub const RENEWAL_SLOT: Duration = Duration::from_millis(100);

impl RotationQueue {
    /// Runs until `shutdown` turns true (or its sender is dropped), at most
    /// `max_concurrent` renewals at a time; then waits for those in flight.
    pub async fn run<R: Renew>(
        mut self,
        renewer: Arc<R>,
        max_concurrent: usize,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let max_concurrent = max_concurrent.max(1);
        let mut timers: DelayQueue<VolumeId> = DelayQueue::new();
        let slots = Slots::new();
        let mut keys: HashMap<VolumeId, Key> = HashMap::new();
        let mut due: VecDeque<VolumeId> = VecDeque::new();
        let mut in_flight: JoinSet<(VolumeId, Option<Duration>)> = JoinSet::new();

        loop {
            while in_flight.len() < max_concurrent {
                let Some(volume) = due.pop_front() else { break };
                let renewer = Arc::clone(&renewer);
                in_flight.spawn(async move {
                    let next = renewer.renew(volume.clone()).await;
                    (volume, next)
                });
            }
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                command = self.rx.recv() => match command {
                    Some(Command::Schedule(volume, after)) => {
                        arm(&mut timers, &mut keys, &slots, volume, after);
                    }
                    Some(Command::Cancel(volume)) => {
                        if let Some(key) = keys.remove(&volume) {
                            timers.remove(&key);
                        }
                        due.retain(|v| *v != volume);
                    }
                    None => break,
                },
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Ok((volume, Some(after))) = done {
                        arm(&mut timers, &mut keys, &slots, volume, after);
                    }
                }
                Some(expired) = poll_fn(|cx| timers.poll_expired(cx)), if !timers.is_empty() => {
                    let volume = expired.into_inner();
                    keys.remove(&volume);
                    if !due.contains(&volume) {
                        due.push_back(volume);
                    }
                }
            }
        }
        tracing::debug!(
            in_flight = in_flight.len(),
            "rotation loop stopping; draining renewals in flight"
        );
        while in_flight.join_next().await.is_some() {}
    }
}

/// Rounds deadlines up to the next [`RENEWAL_SLOT`] boundary.
struct Slots {
    base: tokio::time::Instant,
}

impl Slots {
    fn new() -> Self {
        Self {
            base: tokio::time::Instant::now(),
        }
    }

    /// The slot boundary at or after `now + after`.
    fn deadline(&self, after: Duration) -> tokio::time::Instant {
        let at = tokio::time::Instant::now() + after;
        let since = at.saturating_duration_since(self.base).as_nanos();
        let slot = RENEWAL_SLOT.as_nanos();
        let rounded = since.div_ceil(slot).saturating_mul(slot);
        self.base + Duration::from_nanos(u64::try_from(rounded).unwrap_or(u64::MAX))
    }
}

fn arm(
    timers: &mut DelayQueue<VolumeId>,
    keys: &mut HashMap<VolumeId, Key>,
    slots: &Slots,
    volume: VolumeId,
    after: Duration,
) {
    let deadline = slots.deadline(after.min(MAX_TIMER));
    match keys.get(&volume) {
        Some(key) => timers.reset_at(key, deadline),
        None => {
            let key = timers.insert_at(volume.clone(), deadline);
            keys.insert(volume, key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        running: AtomicUsize,
        max_running: AtomicUsize,
        again_after: Option<Duration>,
        /// When each renewal started, if recorded.
        started: Option<Mutex<Vec<tokio::time::Instant>>>,
    }

    impl Renew for Recorder {
        fn renew(&self, volume: VolumeId) -> BoxFuture<'_, Option<Duration>> {
            Box::pin(async move {
                if let Some(started) = &self.started {
                    started
                        .lock()
                        .expect("lock")
                        .push(tokio::time::Instant::now());
                }
                let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.max_running.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                self.running.fetch_sub(1, Ordering::SeqCst);
                self.calls.lock().expect("lock").push(volume.to_string());
                self.again_after
            })
        }
    }

    fn id(s: &str) -> VolumeId {
        VolumeId::parse(s).expect("id")
    }

    #[tokio::test(start_paused = true)]
    async fn fires_in_order_and_respects_cancel() {
        let (handle, queue) = channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let recorder = Arc::new(Recorder::default());
        let task = tokio::spawn(queue.run(Arc::clone(&recorder), 4, stop_rx));
        handle.schedule(id("b"), Duration::from_secs(20));
        handle.schedule(id("a"), Duration::from_secs(10));
        handle.schedule(id("c"), Duration::from_secs(30));
        handle.cancel(id("c"));
        // Re-arming replaces, it does not add a second timer.
        handle.schedule(id("b"), Duration::from_secs(15));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(*recorder.calls.lock().expect("lock"), ["a", "b"]);
        stop_tx.send(true).expect("stop");
        task.await.expect("join");
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_concurrency_and_rearm() {
        let (handle, queue) = channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let recorder = Arc::new(Recorder {
            again_after: Some(Duration::from_secs(100)),
            ..Recorder::default()
        });
        let task = tokio::spawn(queue.run(Arc::clone(&recorder), 3, stop_rx));
        for i in 0..20 {
            handle.schedule(id(&format!("v{i}")), Duration::from_secs(1));
        }
        tokio::time::sleep(Duration::from_secs(50)).await;
        assert_eq!(recorder.calls.lock().expect("lock").len(), 20);
        assert_eq!(recorder.max_running.load(Ordering::SeqCst), 3);
        // Each renewal re-armed its volume for 100 s later.
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert_eq!(recorder.calls.lock().expect("lock").len(), 40);
        stop_tx.send(true).expect("stop");
        task.await.expect("join");
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_due_within_a_slot_start_together() {
        let (handle, queue) = channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let recorder = Arc::new(Recorder {
            started: Some(Mutex::new(Vec::new())),
            ..Recorder::default()
        });
        let task = tokio::spawn(queue.run(Arc::clone(&recorder), 8, stop_rx));
        let start = tokio::time::Instant::now();
        for (i, ms) in [1_005_u64, 1_020, 1_050, 1_099].iter().enumerate() {
            handle.schedule(id(&format!("v{i}")), Duration::from_millis(*ms));
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let started = recorder
            .started
            .as_ref()
            .expect("recording")
            .lock()
            .expect("lock")
            .clone();
        assert_eq!(started.len(), 4);
        let first = started[0] - start;
        assert!(
            started.iter().all(|t| *t - start == first),
            "one wake-up for the slot: {started:?}"
        );
        assert!(
            first >= Duration::from_millis(1_099)
                && first <= Duration::from_millis(1_100) + RENEWAL_SLOT,
            "started {first:?} after scheduling"
        );
        stop_tx.send(true).expect("stop");
        task.await.expect("join");
    }
}
