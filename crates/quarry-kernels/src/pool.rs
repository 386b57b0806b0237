//! A persistent thread pool for many small, short parallel loops.
//!
//! A decode step is a few hundred matrix-vector products of tens of microseconds to a few
//! milliseconds each. Splitting each one across cores only pays if a dispatch costs far less
//! than the work: waking sleeping threads through the OS for every product (what a general
//! work-stealing pool ends up doing between bursts) costs microseconds each time. This pool
//! keeps its workers spinning on an epoch counter for [`SPIN_TIME`] after each dispatch, so
//! back-to-back dispatches reach them through one cache line, and parks them after that so an
//! idle engine does not burn its cores.
//!
//! [`ThreadPool::run`] runs `f(i)` for every `i in 0..n_tasks`; the calling thread takes part
//! and tasks are claimed one at a time from a shared counter, so uneven tasks balance.
//!
//! # How a dispatch works, and the invariants that keep it sound
//!
//! The closure and the task counter live in a `Job` on the dispatching thread's stack; the
//! pool publishes a pointer to it. Workers *join* a dispatch by incrementing the joined count
//! in `state`, which only succeeds while its `OPEN` bit is set, and *leave* by decrementing it.
//!
//! * A worker dereferences the job pointer only between a successful join and its leave.
//! * The dispatcher clears `OPEN` once every task has been claimed, then waits until the joined
//!   count is zero before its `Job` goes out of scope. That wait sits in a drop guard, so it
//!   happens even if the dispatcher unwinds: no worker can touch a dead `Job`.
//! * Workers that never joined (still parked, or too late) are not waited for, so a sleepy
//!   worker does not delay a dispatch the others already finished.
//! * Panics in tasks are caught wherever they run, the remaining tasks still run, and the
//!   first payload is re-raised on the caller after the dispatch has completed; the pool stays
//!   usable.
//! * A worker about to park raises its `sleeping` flag and then re-reads the epoch; the
//!   dispatcher bumps the epoch and then reads the flags (all `SeqCst`). One of the two always
//!   sees the other, so a worker never sleeps through a dispatch meant to wake it.
//! * Dispatches onto one pool from several threads are serialised by a mutex. A `run` from
//!   inside a task (on any pool) runs its tasks inline on the current thread instead of
//!   waiting for workers that may all be busy in the outer dispatch.
//!
//! The pool assumes its threads have their cores to themselves, as an inference server's do.
//! On an oversubscribed machine a worker preempted in the middle of a task stalls its whole
//! dispatch (as in any fork-join pool), and spinning makes such preemption likelier: size the
//! pool to the cores that are actually free.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use thiserror::Error;

/// How long an idle worker spins waiting for the next dispatch before parking. Long enough to
/// span the serial work between two products of a decode step and most of the sampling between
/// steps (a parked worker takes 10–30 µs to wake on a VM, as long as a whole small product);
/// short enough that an idle pool stops burning CPU almost at once.
pub const SPIN_TIME: Duration = Duration::from_micros(200);

/// `state` bit set while a dispatch accepts workers; the bits below count joined workers.
const OPEN: usize = 1 << (usize::BITS - 1);

/// Why the global pool could not be given the requested size.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PoolError {
    /// A pool needs at least the calling thread.
    #[error("a thread pool needs at least one thread, got 0")]
    ZeroThreads,

    /// The global pool was already created, with a different size.
    #[error("the global thread pool already runs {existing} threads; cannot make it {requested}")]
    AlreadySized { existing: usize, requested: usize },

    /// The operating system refused a worker thread (a process or memory limit); the workers
    /// already started were stopped again.
    #[error("cannot start thread {thread} of the {requested} asked for: {reason}")]
    Spawn {
        thread: usize,
        requested: usize,
        reason: String,
    },
}

thread_local! {
    /// Whether this thread is running pool tasks: always on workers, and on a dispatcher while
    /// it takes part. Nested dispatches from such a thread run inline.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// Keeps a hot atomic on its own cache line (two, for the adjacent-line prefetcher), so the
/// line workers spin on is not invalidated by unrelated writes.
#[repr(align(128))]
struct Padded<T>(T);

/// State shared between the pool handle and its workers.
struct Shared {
    /// Bumped once per dispatch and once at shutdown; what idle workers watch.
    epoch: Padded<AtomicUsize>,
    /// `OPEN` plus the number of workers currently inside the open (or closing) dispatch.
    state: Padded<AtomicUsize>,
    /// The current dispatch's job; valid to dereference only while joined (see module docs).
    job: AtomicPtr<Job<'static>>,
    /// One flag per worker: set while it is parked or about to park.
    sleeping: Box<[AtomicBool]>,
    shutdown: AtomicBool,
}

/// One dispatch: lives on the dispatching thread's stack for the duration of `run`.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync + 'a),
    n_tasks: usize,
    /// The next unclaimed task index.
    next: Padded<AtomicUsize>,
    /// The first panic caught in a task, re-raised on the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job<'_> {
    /// Claims and runs tasks until none are left, catching panics so every claimed task is
    /// accounted for and the dispatch can finish.
    fn work(&self) {
        loop {
            let i = self.next.0.fetch_add(1, Ordering::Relaxed);
            if i >= self.n_tasks {
                return;
            }
            if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| (self.f)(i))) {
                let mut slot = self.panic.lock().unwrap_or_else(PoisonError::into_inner);
                if slot.is_none() {
                    *slot = Some(payload);
                }
            }
        }
    }
}

/// A fixed set of worker threads plus the calling thread, for [`ThreadPool::run`].
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises dispatches from different threads: there is one job slot.
    dispatch: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `n_threads` including the calling thread: `n_threads - 1` workers are spawned.
    ///
    /// # Panics
    /// If `n_threads` is 0 or a worker thread cannot be spawned ([`ThreadPool::try_new`]
    /// returns those as errors).
    pub fn new(n_threads: usize) -> ThreadPool {
        ThreadPool::try_new(n_threads).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A pool of `n_threads` including the calling thread, or why it cannot be had: 0
    /// threads, or a worker the operating system would not start (the ones already started
    /// are stopped and joined before this returns).
    pub fn try_new(n_threads: usize) -> Result<ThreadPool, PoolError> {
        if n_threads == 0 {
            return Err(PoolError::ZeroThreads);
        }
        let n_workers = n_threads - 1;
        let shared = Arc::new(Shared {
            epoch: Padded(AtomicUsize::new(0)),
            state: Padded(AtomicUsize::new(0)),
            job: AtomicPtr::new(std::ptr::null_mut()),
            sleeping: (0..n_workers).map(|_| AtomicBool::new(false)).collect(),
            shutdown: AtomicBool::new(false),
        });
        let mut pool = ThreadPool {
            shared,
            workers: Vec::with_capacity(n_workers),
            dispatch: Mutex::new(()),
        };
        for index in 0..n_workers {
            let shared = Arc::clone(&pool.shared);
            let spawned = thread::Builder::new()
                .name(format!("quarry-pool-{index}"))
                .spawn(move || worker_main(&shared, index));
            match spawned {
                Ok(handle) => pool.workers.push(handle),
                // Dropping the partial pool stops and joins the workers it has.
                Err(e) => {
                    return Err(PoolError::Spawn {
                        // The calling thread is thread 1; worker `index` is thread index + 2.
                        thread: index + 2,
                        requested: n_threads,
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok(pool)
    }

    /// The number of threads that run tasks, the calling thread included.
    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` for every `i` in `0..n_tasks` across the pool, the calling thread taking
    /// part; returns when all are done.
    ///
    /// Tasks are claimed dynamically, so uneven tasks balance. A `run` from inside a task runs
    /// its tasks inline (serially) on that thread rather than deadlocking; concurrent calls from
    /// different threads take turns.
    ///
    /// # Panics
    /// If a task panics, the other tasks still run, and then the first panic is resumed here.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() || n_tasks <= 1 || IN_POOL.get() {
            (0..n_tasks).for_each(f);
            return;
        }
        // Dispatch never panics while holding the lock, but a poisoned `()` is harmless anyway.
        let turn = self.dispatch.lock().unwrap_or_else(PoisonError::into_inner);
        let shared = &*self.shared;
        let job = Job {
            f,
            n_tasks,
            next: Padded(AtomicUsize::new(0)),
            panic: Mutex::new(None),
        };
        // The 'static is a lie kept honest by `Dispatch::drop`, which outlives every use.
        let job_ptr = (&job as *const Job<'_>).cast::<Job<'static>>().cast_mut();
        shared.job.store(job_ptr, Ordering::Relaxed);
        // Release: a worker whose join (Acquire) sees OPEN also sees the job pointer.
        shared.state.0.store(OPEN, Ordering::Release);
        let guard = Dispatch { shared };
        shared.epoch.0.fetch_add(1, Ordering::SeqCst);
        // Wake only parked workers, and no more of them than there are other tasks.
        for (flag, worker) in shared.sleeping.iter().zip(&self.workers).take(n_tasks - 1) {
            if flag.load(Ordering::SeqCst) && flag.swap(false, Ordering::SeqCst) {
                worker.thread().unpark();
            }
        }
        IN_POOL.set(true);
        job.work();
        drop(guard);
        let payload = job
            .panic
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        drop(turn);
        if let Some(payload) = payload {
            panic::resume_unwind(payload);
        }
    }
}

impl ThreadPool {
    /// Runs `f(i, chunk)` for every `chunk_len`-sized chunk of `data` (the last may be
    /// shorter), `i` counting chunks, across the pool like [`ThreadPool::run`].
    pub fn for_each_chunk_mut<T: Send>(
        &self,
        data: &mut [T],
        chunk_len: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        assert!(
            chunk_len > 0,
            "for_each_chunk_mut: chunk_len must be positive"
        );
        // Each task locks only its own chunk, so the locks are never contended; they let the
        // `Fn` tasks write disjoint parts of `data` without unsafe code.
        let chunks: Vec<Mutex<&mut [T]>> = data.chunks_mut(chunk_len).map(Mutex::new).collect();
        self.run(chunks.len(), &|i| {
            let mut chunk = chunks[i].lock().unwrap_or_else(PoisonError::into_inner);
            f(i, &mut chunk)
        });
    }
}

/// Ends a dispatch on drop: closes it to new workers and waits for joined ones to leave, so the
/// dispatcher's `Job` cannot be freed (by return or unwind) while a worker still reads it.
struct Dispatch<'a> {
    shared: &'a Shared,
}

impl Drop for Dispatch<'_> {
    fn drop(&mut self) {
        IN_POOL.set(false);
        let state = &self.shared.state.0;
        state.fetch_and(!OPEN, Ordering::AcqRel);
        let mut spins = 0u32;
        // Acquire pairs with each worker's Release leave: their uses of the job happen before.
        while state.load(Ordering::Acquire) != 0 {
            // Joined workers are mid-task; yield if one seems to have lost its core.
            if spins < 1 << 14 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
    }
}

impl Drop for ThreadPool {
    /// Stops and joins the workers.
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.epoch.0.fetch_add(1, Ordering::SeqCst);
        for worker in self.workers.drain(..) {
            worker.thread().unpark();
            // A worker only dies early if dropping a surplus panic payload panicked; nothing
            // is left to report by then.
            let _ = worker.join();
        }
    }
}

/// A worker: wait for a new epoch, help with the dispatch if it is still open, repeat.
fn worker_main(shared: &Shared, index: usize) {
    IN_POOL.set(true);
    // Epoch 0 is the pool's creation, not a dispatch.
    let mut seen = 0;
    loop {
        seen = wait_for_epoch(shared, index, seen);
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        if try_join(shared) {
            let _leave = Leave { shared };
            let job = shared.job.load(Ordering::Relaxed);
            // SAFETY: we joined while OPEN was set, and the Acquire in `try_join` pairs with the
            // dispatcher's Release store of OPEN made after it stored this pointer, so `job`
            // points to the live `Job` of the dispatch we joined. That dispatcher does not let
            // the `Job` go out of scope until the joined count reaches zero (`Dispatch::drop`),
            // which cannot happen before `_leave` drops, after our last use of `job`.
            unsafe { &*job }.work();
        }
    }
}

/// Joins the open dispatch, if there is one.
fn try_join(shared: &Shared) -> bool {
    let state = &shared.state.0;
    let mut current = state.load(Ordering::Relaxed);
    while current & OPEN != 0 {
        match state.compare_exchange_weak(
            current,
            current + 1,
            Ordering::Acquire,
            Ordering::Relaxed,
        ) {
            Ok(_) => return true,
            Err(now) => current = now,
        }
    }
    false
}

/// Leaves the joined dispatch on drop, even if unwinding, so the dispatcher never waits forever.
struct Leave<'a> {
    shared: &'a Shared,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        // Release: our uses of the job happen before the dispatcher's Acquire sees the count drop.
        self.shared.state.0.fetch_sub(1, Ordering::Release);
    }
}

/// Waits until the epoch differs from `seen` and returns it: spins for [`SPIN_TIME`], then parks.
fn wait_for_epoch(shared: &Shared, index: usize, seen: usize) -> usize {
    let epoch = &shared.epoch.0;
    let start = Instant::now();
    // Reading the clock costs more than a spin; look at it once per 64 spins.
    while start.elapsed() < SPIN_TIME {
        for _ in 0..64 {
            let now = epoch.load(Ordering::Acquire);
            if now != seen {
                return now;
            }
            std::hint::spin_loop();
        }
    }
    let sleeping = &shared.sleeping[index];
    loop {
        // Raise the flag before the last look at the epoch; see the module docs.
        sleeping.store(true, Ordering::SeqCst);
        let now = epoch.load(Ordering::SeqCst);
        if now != seen {
            sleeping.store(false, Ordering::Relaxed);
            return now;
        }
        // Returns on unpark, or spuriously; either way look again.
        thread::park();
    }
}

static GLOBAL: OnceLock<ThreadPool> = OnceLock::new();

/// The process-wide pool the kernels use.
///
/// Sized by [`set_global_threads`] if that was called before first use, otherwise by the
/// number of physical cores (see [`default_threads`]).
pub fn global() -> &'static ThreadPool {
    GLOBAL.get_or_init(|| ThreadPool::new(default_threads()))
}

/// Sets the global pool's size, creating it now.
///
/// Fails if `n` is 0, a worker thread cannot be started, or the pool already exists with a
/// different size; asking again for the size it already has succeeds.
pub fn set_global_threads(n: usize) -> Result<(), PoolError> {
    if n == 0 {
        return Err(PoolError::ZeroThreads);
    }
    let existing = match GLOBAL.get() {
        Some(pool) => pool.n_threads(),
        None => {
            let pool = ThreadPool::try_new(n)?;
            // Another thread may have created the pool meanwhile: then this one is dropped.
            GLOBAL.get_or_init(|| pool).n_threads()
        }
    };
    if existing == n {
        Ok(())
    } else {
        Err(PoolError::AlreadySized {
            existing,
            requested: n,
        })
    }
}

/// The default pool size: physical cores, since hyper-threads share the execution units and
/// memory bandwidth that the kernels saturate. Capped by `available_parallelism`, which
/// honours CPU affinity and cgroup quotas, so a container limited to two CPUs gets two threads.
pub fn default_threads() -> usize {
    let available = thread::available_parallelism().map_or(1, |n| n.get());
    physical_cores().map_or(available, |cores| cores.min(available))
}

/// Counts distinct (physical id, core id) pairs in /proc/cpuinfo; `None` where that file or
/// those fields are missing (other systems, some architectures).
fn physical_cores() -> Option<usize> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mut cores = std::collections::HashSet::new();
    // Processors are blank-line separated blocks; a block without the fields has no say.
    for block in cpuinfo.split("\n\n") {
        let field = |name: &str| {
            block.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().to_owned())
            })
        };
        if let (Some(package), Some(core)) = (field("physical id"), field("core id")) {
            cores.insert((package, core));
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `n_tasks` on `pool` and checks each index ran exactly once.
    fn check_each_once(pool: &ThreadPool, n_tasks: usize) {
        let counts: Vec<AtomicUsize> = (0..n_tasks).map(|_| AtomicUsize::new(0)).collect();
        pool.run(n_tasks, &|i| {
            counts[i].fetch_add(1, Ordering::Relaxed);
        });
        for (i, count) in counts.iter().enumerate() {
            assert_eq!(count.load(Ordering::Relaxed), 1, "task {i} of {n_tasks}");
        }
    }

    #[test]
    fn try_new_reports_instead_of_panicking() {
        assert_eq!(ThreadPool::try_new(0).err(), Some(PoolError::ZeroThreads));
        assert_eq!(ThreadPool::try_new(3).unwrap().n_threads(), 3);
        let e = PoolError::Spawn {
            thread: 5,
            requested: 8,
            reason: "Resource temporarily unavailable (os error 11)".into(),
        };
        assert_eq!(
            e.to_string(),
            "cannot start thread 5 of the 8 asked for: Resource temporarily unavailable (os error 11)"
        );
    }

    #[test]
    fn every_task_runs_exactly_once() {
        for n_threads in 1..=4 {
            let pool = ThreadPool::new(n_threads);
            assert_eq!(pool.n_threads(), n_threads);
            for n_tasks in [0, 1, 2, 3, 17, 1000] {
                check_each_once(&pool, n_tasks);
            }
        }
    }

    #[test]
    fn many_consecutive_dispatches_lose_nothing() {
        for n_threads in [2, 3] {
            let pool = ThreadPool::new(n_threads);
            let total = AtomicUsize::new(0);
            for round in 0..10_000 {
                let n_tasks = 2 + round % 7;
                let hits = AtomicUsize::new(0);
                pool.run(n_tasks, &|i| {
                    // Each index contributes a distinct bit: a duplicate or a loss shows.
                    hits.fetch_add(1 << i, Ordering::Relaxed);
                    total.fetch_add(1, Ordering::Relaxed);
                });
                assert_eq!(hits.into_inner(), (1 << n_tasks) - 1, "round {round}");
            }
            assert_eq!(
                total.into_inner(),
                (0..10_000).map(|r| 2 + r % 7).sum::<usize>()
            );
        }
    }

    #[test]
    fn dispatches_after_workers_park_still_run() {
        let pool = ThreadPool::new(3);
        for _ in 0..5 {
            thread::sleep(SPIN_TIME * 10);
            check_each_once(&pool, 64);
        }
    }

    /// How many threads ran `n_tasks` tasks, each task waiting (up to a generous deadline) for a
    /// task on another thread, so the answer does not depend on scheduling luck.
    fn threads_used(pool: &ThreadPool, n_tasks: usize) -> usize {
        let threads = Mutex::new(std::collections::HashSet::new());
        let deadline = Instant::now() + Duration::from_secs(10);
        pool.run(n_tasks, &|_| {
            threads.lock().unwrap().insert(thread::current().id());
            while threads.lock().unwrap().len() < 2 && Instant::now() < deadline {
                thread::sleep(Duration::from_micros(100));
            }
        });
        threads.into_inner().unwrap().len()
    }

    #[test]
    fn workers_take_part() {
        for n_threads in 2..=4 {
            let pool = ThreadPool::new(n_threads);
            assert!(threads_used(&pool, 2 * n_threads) >= 2);
        }
    }

    #[test]
    fn task_panic_reaches_caller_after_all_tasks_and_pool_survives() {
        let pool = ThreadPool::new(3);
        let ran = AtomicUsize::new(0);
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(100, &|i| {
                ran.fetch_add(1, Ordering::Relaxed);
                if i % 10 == 3 {
                    panic!("task {i} failed");
                }
            });
        }));
        let payload = result.expect_err("the panic must reach the caller");
        let message = payload
            .downcast_ref::<String>()
            .expect("a formatted message");
        assert!(message.starts_with("task ") && message.ends_with(" failed"));
        // Every task ran: the dispatch completed before the panic was resumed.
        assert_eq!(ran.into_inner(), 100);
        for n_tasks in [2, 17, 1000] {
            check_each_once(&pool, n_tasks);
        }
    }

    #[test]
    fn nested_run_is_inline() {
        let pool = ThreadPool::new(3);
        let total = AtomicUsize::new(0);
        pool.run(8, &|_| {
            let outer_thread = thread::current().id();
            pool.run(5, &|_| {
                assert_eq!(thread::current().id(), outer_thread);
                total.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.into_inner(), 40);
        // The dispatcher's nested flag was reset: later dispatches use the workers again.
        assert!(threads_used(&pool, 8) >= 2);
    }

    #[test]
    fn drop_joins_workers() {
        for n_threads in 1..=4 {
            let pool = ThreadPool::new(n_threads);
            check_each_once(&pool, 10);
            drop(pool);
        }
        // Also after the workers have parked.
        let pool = ThreadPool::new(2);
        check_each_once(&pool, 10);
        thread::sleep(SPIN_TIME * 10);
        drop(pool);
    }

    #[test]
    fn concurrent_dispatchers_take_turns() {
        let pool = ThreadPool::new(3);
        thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    for round in 0..2_000 {
                        check_each_once(&pool, 2 + round % 11);
                    }
                });
            }
        });
    }

    #[test]
    fn global_pool_sizing() {
        assert_eq!(set_global_threads(0), Err(PoolError::ZeroThreads));
        let existing = global().n_threads();
        assert!(existing >= 1);
        assert_eq!(set_global_threads(existing), Ok(()));
        assert_eq!(
            set_global_threads(existing + 1),
            Err(PoolError::AlreadySized {
                existing,
                requested: existing + 1
            })
        );
        check_each_once(global(), 33);
    }

    #[test]
    fn default_threads_is_at_least_one() {
        assert!(default_threads() >= 1);
    }
}
