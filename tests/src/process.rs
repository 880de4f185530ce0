//! Child processes under test: spawn, watch their output, signal them, reap them.
//!
//! Each child's stdout and stderr are drained by a dedicated OS thread from the
//! moment it starts, so a chatty child can never block on a full pipe, and the
//! lines are kept in an [`OutputLog`] that async tests wait on. OS threads (not
//! tokio tasks) do the draining so that `Drop` works even while the test's
//! runtime is shutting down. A [`Proc`] that is dropped kills its child (and
//! any processes it adopted): a failing test leaves no orphans behind, and it
//! prints the tail of the child's output so the failure can be diagnosed.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;
use tokio::time::Instant;

/// How many lines of one stream are kept (the oldest are dropped first), so a
/// flood test with verbose logging cannot grow the harness without bound.
const MAX_KEPT_LINES: usize = 20_000;

/// Lines printed by a child on one stream, and a signal for each new line.
pub struct OutputLog {
    state: Mutex<LogState>,
    /// Bumped on every new line and at end of stream; waiters watch it.
    version: watch::Sender<u64>,
}

struct LogState {
    lines: VecDeque<String>,
    /// Lines pushed in total, including those dropped from `lines`.
    total: u64,
    eof: bool,
}

impl OutputLog {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(LogState {
                lines: VecDeque::new(),
                total: 0,
                eof: false,
            }),
            version: watch::Sender::new(0),
        })
    }

    fn state(&self) -> MutexGuard<'_, LogState> {
        // A panic while holding this lock only happens inside `push`, which
        // cannot leave the state inconsistent, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, line: String) {
        let mut st = self.state();
        st.lines.push_back(line);
        st.total += 1;
        if st.lines.len() > MAX_KEPT_LINES {
            st.lines.pop_front();
        }
        drop(st);
        self.version.send_modify(|v| *v += 1);
    }

    fn close(&self) {
        self.state().eof = true;
        self.version.send_modify(|v| *v += 1);
    }

    /// A copy of the kept lines.
    pub fn lines(&self) -> Vec<String> {
        self.state().lines.iter().cloned().collect()
    }

    /// The whole kept output as one string.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Number of lines printed so far (a position for [`OutputLog::wait_line_after`]).
    pub fn position(&self) -> u64 {
        self.state().total
    }

    /// Waits for a line (among all kept lines) that satisfies `pred`.
    pub async fn wait_line(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        self.wait_line_after(0, what, timeout, pred).await
    }

    /// Waits for a line printed after position `from` that satisfies `pred`.
    /// Fails with a description when the timeout passes or the stream ends.
    pub async fn wait_line_after(
        &self,
        from: u64,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        // Subscribe before looking, so a line pushed in between still wakes us.
        let mut rx = self.version.subscribe();
        loop {
            {
                let st = self.state();
                let first_kept = st.total - st.lines.len() as u64;
                let skip = from.saturating_sub(first_kept) as usize;
                if let Some(line) = st.lines.iter().skip(skip).find(|l| pred(l)) {
                    return Ok(line.clone());
                }
                if st.eof {
                    return Err(format!("stream ended before {what}"));
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `self`, so it cannot be dropped while we wait.
                Ok(Err(_)) => return Err(format!("log closed before {what}")),
                Err(_) => return Err(format!("timed out after {timeout:?} waiting for {what}")),
            }
        }
    }

    fn tail(&self, n: usize) -> Vec<String> {
        let st = self.state();
        let skip = st.lines.len().saturating_sub(n);
        st.lines.iter().skip(skip).cloned().collect()
    }
}

fn drain(stream: impl Read + Send + 'static, log: Arc<OutputLog>, thread_name: String) {
    let spawned = thread::Builder::new().name(thread_name).spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                        buf.pop();
                    }
                    log.push(String::from_utf8_lossy(&buf).into_owned());
                }
            }
        }
        log.close();
    });
    if let Err(e) = spawned {
        panic!("cannot spawn an output-draining thread: {e}");
    }
}

/// A running child process with its output captured.
pub struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    /// Whether the child leads its own process group (see [`Proc::spawn_group`]).
    group: bool,
    /// Other processes this one started that must die with it, with their
    /// start times (so a pid reused by an unrelated process is left alone).
    adopted: Vec<(u32, Option<u64>)>,
    pub stdout: Arc<OutputLog>,
    pub stderr: Arc<OutputLog>,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout/stderr captured.
    pub fn spawn(name: &str, cmd: Command) -> Proc {
        Self::spawn_inner(name, cmd, false)
    }

    /// Like [`Proc::spawn`], but the child leads a new process group, so its
    /// own children (which inherit the group) can be signalled together.
    pub fn spawn_group(name: &str, mut cmd: Command) -> Proc {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        Self::spawn_inner(name, cmd, true)
    }

    fn spawn_inner(name: &str, mut cmd: Command, group: bool) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let stdout = OutputLog::new();
        let stderr = OutputLog::new();
        if let Some(s) = child.stdout.take() {
            drain(s, stdout.clone(), format!("{name}-stdout"));
        }
        if let Some(s) = child.stderr.take() {
            drain(s, stderr.clone(), format!("{name}-stderr"));
        }
        Proc {
            name: name.to_owned(),
            child,
            status: None,
            group,
            adopted: Vec::new(),
            stdout,
            stderr,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn nix_pid(&self) -> Pid {
        // Invariant: pids fit in i32 on Linux (pid_max <= 2^22).
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits in i32"))
    }

    /// Registers a process started by this child, to be killed with it on drop.
    pub fn adopt(&mut self, pid: u32) {
        self.adopted.push((pid, start_time(pid)));
    }

    /// Sends `sig` to the child (not its group). A child that already exited
    /// and was reaped is not signalled (its pid may have been reused).
    pub fn signal(&mut self, sig: Signal) {
        if self.try_status().is_some() {
            panic!("{}: cannot send {sig}: it already exited", self.name);
        }
        kill(self.nix_pid(), sig).unwrap_or_else(|e| panic!("{}: kill {sig}: {e}", self.name));
    }

    /// SIGKILL, then reap. Returns at once if the child already exited.
    pub fn kill9(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            if let Ok(st) = self.child.wait() {
                self.status = Some(st);
            }
        }
    }

    pub fn sigterm(&mut self) {
        self.signal(Signal::SIGTERM);
    }

    pub fn sigstop(&mut self) {
        self.signal(Signal::SIGSTOP);
    }

    pub fn sigcont(&mut self) {
        self.signal(Signal::SIGCONT);
    }

    /// The exit status, if the child has exited (reaps it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
            }
        }
        self.status
    }

    /// Waits (polling, bounded) for the child to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not exit within {timeout:?}; stderr tail:\n{}",
                    self.name,
                    self.stderr.tail(30).join("\n")
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for a stdout line satisfying `pred`; on failure the panic message
    /// carries the end of the child's stderr.
    pub async fn wait_stdout(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        match self.stdout.wait_line(what, timeout, pred).await {
            Ok(l) => l,
            Err(e) => {
                let status = self.try_status();
                panic!(
                    "{}: {e}; exit status {status:?}; stdout:\n{}\nstderr tail:\n{}",
                    self.name,
                    self.stdout.tail(30).join("\n"),
                    self.stderr.tail(60).join("\n")
                )
            }
        }
    }

    /// Prints the end of the child's output to the test's stderr.
    pub fn dump(&self, lines: usize) {
        eprintln!("----- {} (pid {}) stdout tail -----", self.name, self.pid());
        for l in self.stdout.tail(lines) {
            eprintln!("{l}");
        }
        eprintln!("----- {} stderr tail -----", self.name);
        for l in self.stderr.tail(lines) {
            eprintln!("{l}");
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var_os("E2E_DUMP_LOGS").is_some() {
            self.dump(80);
        }
        if self.group && self.try_status().is_none() {
            let _ = killpg(self.nix_pid(), Signal::SIGKILL);
        }
        // A SIGSTOPped child still dies from SIGKILL, so this cannot hang.
        self.kill9();
        for (pid, started) in self.adopted.drain(..) {
            if started.is_none() || start_time(pid) != started {
                continue;
            }
            if let Ok(raw) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
        }
    }
}

/// The start time of a process (field 22 of `/proc/<pid>/stat`, in clock
/// ticks since boot): with the pid, it identifies one process for good.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start at field 3.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Whether a process with this pid exists and is not a zombie. Zombies are
/// excluded because an orphan's zombie may never be reaped when the test runs
/// as PID 1's child in a container; it no longer holds sockets or runs code.
pub fn pid_alive(pid: u32) -> bool {
    let exists = match i32::try_from(pid) {
        Ok(raw) => kill(Pid::from_raw(raw), None).is_ok(),
        Err(_) => false,
    };
    if !exists {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_identifies_this_process() {
        let me = std::process::id();
        let t = start_time(me);
        assert!(t.is_some());
        assert_eq!(start_time(me), t);
        assert!(pid_alive(me));
    }

    #[tokio::test]
    async fn output_is_captured_and_exit_is_observed() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo one; echo two >&2; echo three; exit 3"]);
        let mut p = Proc::spawn("sh", cmd);
        let line = p
            .wait_stdout("three", Duration::from_secs(10), |l| l == "three")
            .await;
        assert_eq!(line, "three");
        let st = p.wait_exit(Duration::from_secs(10)).await.unwrap();
        assert_eq!(st.code(), Some(3));
        let err = p
            .stderr
            .wait_line("two", Duration::from_secs(10), |l| l == "two")
            .await;
        assert_eq!(err.as_deref(), Ok("two"));
        // The stream has ended: waiting for a line that never came fails fast.
        let missing = p
            .stdout
            .wait_line("four", Duration::from_secs(10), |l| l == "four")
            .await;
        assert!(missing.unwrap_err().contains("ended"));
        assert_eq!(p.stdout.lines(), ["one", "three"]);
    }

    #[tokio::test]
    async fn dropping_a_proc_kills_its_child() {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let p = Proc::spawn("sleep", cmd);
        let pid = p.pid();
        assert!(pid_alive(pid));
        drop(p);
        assert!(!pid_alive(pid), "the child outlived its Proc");
    }
}
