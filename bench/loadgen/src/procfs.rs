//! What the benchmark reads from `/proc`: a process's CPU time (`/proc/PID/stat` utime + stime)
//! and its memory (`/proc/PID/status` VmRSS and VmHWM).

use std::{collections::HashMap, time::Duration};

use serde::{Deserialize, Serialize};

/// CPU time and memory of a process at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProcSample {
    /// User + system CPU time since the process started.
    pub cpu: Duration,
    /// Resident set size now, in KiB.
    pub rss_kib: u64,
    /// Peak resident set size since the process started (VmHWM), in KiB.
    pub hwm_kib: u64,
}

/// Reads `/proc/PID/stat` and `/proc/PID/status`.
pub fn sample(pid: u32) -> Result<ProcSample, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("reading /proc/{pid}/stat: {e}"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    let ticks =
        parse_stat_cpu_ticks(&stat).ok_or_else(|| format!("cannot parse /proc/{pid}/stat"))?;
    let memory = parse_status_memory(&status)
        .ok_or_else(|| format!("no VmRSS/VmHWM in /proc/{pid}/status"))?;
    Ok(ProcSample {
        cpu: ticks_to_duration(ticks, clock_ticks_per_second()),
        rss_kib: memory.rss_kib,
        hwm_kib: memory.hwm_kib,
    })
}

/// CPU time of this process (the load generator itself).
pub fn own_cpu() -> Duration {
    sample(std::process::id()).map_or(Duration::ZERO, |s| s.cpu)
}

/// `utime + stime` in clock ticks from the text of `/proc/PID/stat`.
///
/// The second field (`comm`) is in parentheses and may itself contain spaces and parentheses, so
/// the fields are counted from the last `)`: after it come `state` (field 3), … `utime` (field 14)
/// and `stime` (field 15).
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// `VmRSS` and `VmHWM` (both in kB) from the text of `/proc/PID/status`.
pub fn parse_status_memory(status: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        status.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(':')?;
            let mut parts = value.split_whitespace();
            let number = parts.next()?.parse().ok()?;
            match parts.next() {
                Some("kB") | None => Some(number),
                Some(_) => None,
            }
        })
    };
    Some(Memory {
        rss_kib: field("VmRSS")?,
        hwm_kib: field("VmHWM")?,
    })
}

/// CPU time (`utime + stime`, clock ticks) of every process now, by PID, from `/proc/*/stat`.
/// Kernel threads (softirq daemons, workers) are processes here too. A process that ends between
/// two reads is missed; one that cannot be read (it just ended) is skipped.
pub fn processes_cpu_ticks() -> HashMap<u32, u64> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.filter_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Some((pid, parse_stat_cpu_ticks(&stat)?))
    })
    .collect()
}

/// The CPU time the processes other than `exclude` used between two `processes_cpu_ticks`
/// readings, in clock ticks; a process that appeared meanwhile counts from zero.
pub fn others_ticks(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>, exclude: &[u32]) -> u64 {
    after
        .iter()
        .filter(|(pid, _)| !exclude.contains(pid))
        .map(|(pid, &ticks)| ticks.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum()
}

/// Machine-wide CPU time from the first line of `/proc/stat`, over all CPUs: the time stolen by
/// the hypervisor.
///
/// The machine's busy time is not used: `/proc/stat` samples it at the scheduler tick, unlike a
/// process's CPU time, which the kernel scales to its exact run time. A server woken at a fixed
/// rate (an open-loop row) can run in step with the tick, so over a 10 s window the machine's busy
/// time minus the processes' was off by up to half a core either way. What other processes used
/// is counted from their own times instead (`others_ticks`). Interrupt time needs no term of its
/// own: this kernel charges softirq work (the loopback network) to the process it interrupted, as
/// a 10 s closed-loop row shows (a third of a core in `/proc/stat`'s softirq column, and the server
/// and the generator at 100 % of their cores each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineCpu {
    pub steal: Duration,
}

pub fn machine_cpu() -> Result<MachineCpu, String> {
    let stat =
        std::fs::read_to_string("/proc/stat").map_err(|e| format!("reading /proc/stat: {e}"))?;
    parse_machine_cpu(&stat, clock_ticks_per_second())
        .ok_or_else(|| "cannot parse /proc/stat".into())
}

pub fn parse_machine_cpu(stat: &str, ticks_per_second: u64) -> Option<MachineCpu> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let n: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice] (guest is inside user).
    let field = |i: usize| n.get(i).copied().unwrap_or(0);
    if n.len() < 4 {
        return None;
    }
    Some(MachineCpu {
        steal: ticks_to_duration(field(7), ticks_per_second),
    })
}

pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

pub fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    let per_second = per_second.max(1);
    Duration::from_secs(ticks / per_second)
        + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second)
}

pub fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        // A comm with a space and a parenthesis must not shift the fields.
        let stat = "4242 (tokio-rt (w) 1) S 1 4242 4242 0 -1 4194560 1200 0 0 0 \
                    731 269 0 0 20 0 3 0 12345 123456789 2345 18446744073709551615 \
                    1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(731 + 269));
    }

    #[test]
    fn a_truncated_stat_is_refused() {
        assert_eq!(parse_stat_cpu_ticks("1 (x) S 1 2 3"), None);
        assert_eq!(parse_stat_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn status_memory_is_read_in_kib() {
        let status = "Name:\tstepgate\nVmPeak:\t  900000 kB\nVmHWM:\t   20480 kB\n\
                      VmRSS:\t   18432 kB\nThreads:\t3\n";
        assert_eq!(
            parse_status_memory(status),
            Some(Memory {
                rss_kib: 18432,
                hwm_kib: 20480
            })
        );
        assert_eq!(parse_status_memory("Name:\tx\nVmRSS:\t1 kB\n"), None);
        // VmRSSfoo is not VmRSS.
        assert_eq!(
            parse_status_memory("VmRSSfoo:\t9 kB\nVmRSS:\t1 kB\nVmHWM:\t2 kB\n"),
            Some(Memory {
                rss_kib: 1,
                hwm_kib: 2
            })
        );
    }

    #[test]
    fn others_are_every_process_but_the_excluded() {
        let before = HashMap::from([(1, 100), (2, 50), (3, 10)]);
        // 2 is excluded, 3 ended (missed), 4 started in the window.
        let after = HashMap::from([(1, 130), (2, 90), (4, 7)]);
        assert_eq!(others_ticks(&before, &after, &[2]), 30 + 7);
        assert_eq!(others_ticks(&before, &after, &[]), 30 + 40 + 7);
        let now = processes_cpu_ticks();
        assert!(
            now.contains_key(&std::process::id()),
            "this process is listed"
        );
    }

    #[test]
    fn machine_cpu_reads_the_steal_column() {
        let stat = "cpu  100 5 50 9000 7 3 2 11 0 0\ncpu0 50 2 25 4500 3 1 1 5 0 0\nintr 1\n";
        assert_eq!(
            parse_machine_cpu(stat, 100),
            Some(MachineCpu {
                steal: Duration::from_millis(110),
            })
        );
        assert_eq!(parse_machine_cpu("intr 1\n", 100), None);
        assert!(machine_cpu().is_ok());
    }

    #[test]
    fn ticks_convert_exactly() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(1, 3), Duration::from_nanos(333_333_333));
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample(std::process::id()).expect("sampling /proc/self");
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib);
    }
}
