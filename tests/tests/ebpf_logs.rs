//! The programs' debug logs reach the `log` crate when, and only when, they are turned on.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod ebpf_support;

use std::{net::SocketAddr, sync::Mutex};

use ebpf_support::{Fixture, PROBE, Probe, accept, privileged};

struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.0
            .lock()
            .unwrap()
            .push(format!("{} {}", record.level(), record.args()));
    }

    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

#[test]
fn debug_logs_are_forwarded_when_enabled() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    log::set_logger(&CAPTURE).expect("first logger of this test binary");
    log::set_max_level(log::LevelFilter::Debug);

    for (name, enabled) in [("logs-off", false), ("logs-on", true)] {
        CAPTURE.0.lock().unwrap().clear();
        let mut fx = Fixture::with_config(name, |c| c.debug_logs = enabled)?;
        // Never reached: redirected to the fixture's listener.
        let dst = SocketAddr::from(([198, 18, 255, 10], 8443));
        let mut cmd = fx.command_in_cgroup(PROBE);
        cmd.arg("tcp").arg(dst.to_string());
        let probe = Probe::spawn(cmd)?;
        assert!(probe.ok(), "{}", probe.line);
        accept(&fx.listeners().tcp4)?;
        fx.interceptor.as_mut().expect("interceptor").flush_logs();
        // aya itself logs while loading; keep only what the programs said.
        let lines: Vec<String> = CAPTURE
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("redirected"))
            .cloned()
            .collect();
        if enabled {
            assert_eq!(lines, ["DEBUG connect4 redirected port 8443"]);
        } else {
            assert!(lines.is_empty(), "{lines:?}");
        }
    }
    Ok(())
}
