//! SIGTERM and SIGINT: stop rclone, clean up, exit 143/130 (cli.md).
//!
//! Why this shape (after just's `signal_handler.rs` and nextest's signal-handling note):
//! - A Kubernetes pod gets SIGTERM on PID 1 only, so offsite must forward it to rclone itself.
//!   SIGINT from a terminal reaches rclone through the shared process group, but is forwarded
//!   too, so a `kill -INT <offsite pid>` behaves the same.
//! - The handler only records the signal (async-signal-safe); a watcher thread forwards it to
//!   every registered child, waits a bounded grace period, then kills what is left.
//! - The main code notices the signal through [`check`] after each rclone invocation and
//!   unwinds with an `Exit` error, so every `TempDir` (the rendered config) is dropped and
//!   removed before the process ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::exit::{fail, Code};

/// How long rclone gets to stop after a forwarded signal before it is killed. Kubernetes'
/// default termination grace is 30 s; stay well inside it.
pub const GRACE: Duration = Duration::from_secs(5);

static TERM: OnceLock<Arc<AtomicBool>> = OnceLock::new();
static INT: OnceLock<Arc<AtomicBool>> = OnceLock::new();
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn flag(cell: &'static OnceLock<Arc<AtomicBool>>) -> &'static Arc<AtomicBool> {
    cell.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Install the handlers and the watcher thread. Call once, early in `main`.
pub fn install() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for (sig, cell) in [(SIGTERM, &TERM), (SIGINT, &INT)] {
        let f = flag(cell).clone();
        // signal-hook's documented pattern: a second signal, arriving while the first is
        // still being handled, terminates at once (the escape hatch for a stuck shutdown).
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, f.clone());
        let _ = signal_hook::flag::register(sig, f);
    }
    std::thread::spawn(|| loop {
        if let Some(sig) = pending() {
            stop_children(sig);
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    });
}

fn stop_children(sig: i32) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let forward = Signal::try_from(sig).unwrap_or(Signal::SIGTERM);
    let pids: Vec<u32> = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
    for &p in &pids {
        let _ = kill(Pid::from_raw(p as i32), forward);
    }
    let deadline = Instant::now() + GRACE;
    loop {
        let alive: Vec<u32> = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
        if alive.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for p in alive {
                let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
            }
            return;
        }
        // Children registered after the signal (none should start: `check` refuses) are
        // signalled too.
        for p in alive.iter().filter(|p| !pids.contains(p)) {
            let _ = kill(Pid::from_raw(*p as i32), forward);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The signal received so far, if any.
pub fn pending() -> Option<i32> {
    if flag(&TERM).load(Ordering::SeqCst) {
        Some(signal_hook::consts::SIGTERM)
    } else if flag(&INT).load(Ordering::SeqCst) {
        Some(signal_hook::consts::SIGINT)
    } else {
        None
    }
}

/// Fail with exit 130/143 if a signal arrived: called before and after every rclone run.
pub fn check() -> anyhow::Result<()> {
    match pending() {
        None => Ok(()),
        Some(s) if s == signal_hook::consts::SIGINT => Err(fail(
            Code::Interrupted,
            "interrupted by SIGINT; rclone stopped",
        )),
        Some(_) => Err(fail(
            Code::Terminated,
            "terminated by SIGTERM; rclone stopped",
        )),
    }
}

/// A running child's pids, registered for signal forwarding while this guard lives.
pub struct Child(Vec<u32>);

impl Child {
    pub fn register(pids: Vec<u32>) -> Child {
        if let Ok(mut c) = CHILDREN.lock() {
            c.extend(&pids);
        }
        // A signal that arrived just before the spawn must still reach this child.
        if let Some(sig) = pending() {
            stop_children(sig);
        }
        Child(pids)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(mut c) = CHILDREN.lock() {
            c.retain(|p| !self.0.contains(p));
        }
    }
}
