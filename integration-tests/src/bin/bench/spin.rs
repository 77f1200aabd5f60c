//! `--spin`: keeps every CPU busy with a lowest-priority (`SCHED_IDLE`)
//! spinner thread while a latency figure is measured.
//!
//! An idle vCPU sleeps in the hypervisor and takes tens of µs to wake, which
//! a ping-pong pays on every hop. A `SCHED_IDLE` thread never delays real
//! work (any runnable task preempts it at once) but keeps the CPU out of its
//! idle state. Throughput figures are never measured with spinners: they
//! would only take cycles.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// How the CPUs were kept during a figure: printed in the table's `cpus`
/// column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// Nothing else ran on the bench's behalf; idle CPUs may sleep.
    Idle,
    /// One `SCHED_IDLE` spinner per CPU.
    Spin,
}

impl CpuMode {
    pub fn label(self) -> &'static str {
        match self {
            CpuMode::Idle => "idle",
            CpuMode::Spin => "spin",
        }
    }

    /// Starts the spinners when the mode asks for them; they stop when the
    /// returned guard is dropped.
    pub fn hold(self) -> std::io::Result<Option<Spinners>> {
        match self {
            CpuMode::Idle => Ok(None),
            CpuMode::Spin => Spinners::start().map(Some),
        }
    }
}

/// Spinner threads, one per CPU; stopped and joined on drop.
pub struct Spinners {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Spinners {
    fn start() -> std::io::Result<Spinners> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let stop = Arc::new(AtomicBool::new(false));
        let mut spinners = Spinners {
            stop: stop.clone(),
            threads: Vec::with_capacity(cpus),
        };
        for cpu in 0..cpus {
            let stop = stop.clone();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("spin-{cpu}"))
                .spawn(move || {
                    let _ = ready_tx.send(lowest_priority_on(cpu));
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })?;
            // Dropping `spinners` on an error below stops the started ones.
            spinners.threads.push(thread);
            ready_rx
                .recv()
                .map_err(|_| std::io::Error::other("a spinner thread died at start"))??;
        }
        Ok(spinners)
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Makes the calling thread `SCHED_IDLE` and pins it to `cpu`.
fn lowest_priority_on(cpu: usize) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` outlives the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("cannot make a spinner thread SCHED_IDLE: {e}"),
        ));
    }
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below available_parallelism, within the set's size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        // Not pinned (e.g. a restricted cpuset): it still spins somewhere.
        return Ok(());
    }
    Ok(())
}
