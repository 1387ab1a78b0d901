//! The gateway daemon: start/stop/status, one per state directory, socket permissions,
//! settings file errors, restart with re-adoption, and crash consistency of `sandbox create`.

use std::{os::unix::fs::PermissionsExt as _, time::Duration};

use anyhow::{Context as _, Result};
use openshell_tests::{
    gateway::{TestGateway, process_alive, process_exited},
    require_root, sandbox_names as names,
};

#[test]
fn start_status_stop() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    let status = gw.run(&["gateway", "status", "-o", "json"])?;
    assert_eq!(status.code, Some(1));
    assert_eq!(status.json()?["running"], false);

    let started = gw.run(&["gateway", "start"])?.ok()?;
    assert!(
        started.stderr.contains("gateway started"),
        "{}",
        started.stderr
    );
    // One gateway per state directory.
    let again = gw.run(&["gateway", "start"])?.ok()?;
    assert!(again.stderr.contains("already running"), "{}", again.stderr);
    let fg = gw.run(&["gateway", "start", "--foreground"])?.ok()?;
    assert!(fg.stderr.contains("already running"), "{}", fg.stderr);

    let status = gw.run(&["gateway", "status", "-o", "json"])?.ok()?.json()?;
    assert_eq!(status["running"], true);
    assert_eq!(status["sandboxes"], 0);
    assert_eq!(
        status["pid"].as_i64(),
        gw.gateway_pid().map(i64::from),
        "{status}"
    );
    let socket = gw.state_dir().join("run/gateway.sock");
    let mode = std::fs::metadata(&socket)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");

    let pid = gw.gateway_pid().context("no pid")?.to_string();
    gw.run(&["gateway", "stop"])?.ok()?;
    assert!(process_exited(&pid, Duration::from_secs(10)));
    assert!(!socket.exists(), "socket left behind");
    let status = gw.run(&["gateway", "status"])?;
    assert_eq!(status.code, Some(1));
    assert_eq!(status.stdout, "gateway is not running\n");
    Ok(())
}

#[test]
fn bad_settings_file_is_reported_with_the_key() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    let good = std::fs::read_to_string(&gw.config)?;
    std::fs::write(
        &gw.config,
        format!("{good}[tls]\nextra_root = [\"/tmp/ca.pem\"]\n"),
    )?;
    let run = gw.run(&["gateway", "start"])?;
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("extra_root") && run.stderr.contains(&gw.config.display().to_string()),
        "{}",
        run.stderr
    );
    let ca = gw.dir.path().join("ca.pem");
    let with_root = format!("{good}[tls]\nextra_roots = [\"{}\"]\n", ca.display());
    std::fs::write(&gw.config, &with_root)?;
    let run = gw.run(&["gateway", "start"])?;
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr
            .contains(&format!("[tls] extra_roots: {}", ca.display())),
        "a missing root file is named: {}",
        run.stderr
    );
    std::fs::write(&ca, openshell_tests::upstream::TestCa::new()?.cert_pem)?;
    gw.run(&["gateway", "start"])?.ok()?;
    Ok(())
}

#[test]
fn socket_group_opens_the_socket_to_a_group() -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    require_root!();
    let gw = TestGateway::new()?;
    let good = std::fs::read_to_string(&gw.config)?;
    let with_group = |group: &str| {
        good.replace(
            "[gateway]\n",
            &format!("[gateway]\nsocket_group = \"{group}\"\n"),
        )
    };
    std::fs::write(&gw.config, with_group("no-such-group-x"))?;
    let run = gw.run(&["gateway", "start"])?;
    assert_ne!(run.code, Some(0));
    let log = std::fs::read_to_string(gw.state_dir().join("gateway.log"))?;
    assert!(
        log.contains("no-such-group-x") && log.contains("groupadd"),
        "{log}"
    );

    std::fs::write(&gw.config, with_group("root"))?;
    gw.run(&["gateway", "start"])?.ok()?;
    let meta = std::fs::metadata(gw.state_dir().join("run/gateway.sock"))?;
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 0);
    Ok(())
}

#[test]
fn restarted_gateway_readopts_running_sandboxes() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    gw.run(&[
        "sandbox",
        "create",
        "--name",
        "survivor",
        "--",
        "sh",
        "-c",
        "sleep 300 </dev/null >/dev/null 2>&1 &",
    ])?
    .ok()?;
    let procs = std::fs::read_to_string(gw.cgroup_dir("survivor")?.join("cgroup.procs"))?;
    let pid = procs.trim().to_owned();
    assert!(!pid.is_empty());

    // Graceful stop: the sandbox's process keeps running.
    gw.run(&["gateway", "stop"])?.ok()?;
    assert!(process_alive(&pid), "process died with the gateway");

    // A CLI call starts a new gateway, which finds the sandbox running.
    let list = gw.run(&["sandbox", "list", "-o", "json"])?.ok()?;
    assert!(
        list.stderr.contains("started one in the background"),
        "{}",
        list.stderr
    );
    let list = list.json()?;
    assert_eq!(names(&list), vec!["survivor"]);
    assert_eq!(list[0]["status"], "running", "{list}");
    assert_eq!(list[0]["processes"], 1);

    // Killed outright: still nothing lost, the process still runs.
    let gateway = gw.gateway_pid().context("no gateway pid")?;
    // SAFETY: kill has no memory preconditions; the pid is this test's gateway.
    unsafe {
        libc::kill(gateway, libc::SIGKILL);
    }
    assert!(process_exited(
        &gateway.to_string(),
        Duration::from_secs(10)
    ));
    assert!(process_alive(&pid), "process died with the gateway");
    let list = gw.run(&["sandbox", "list", "-o", "json"])?.ok()?.json()?;
    assert_eq!(list[0]["status"], "running", "{list}");
    // The re-adopted sandbox works as before.
    let run = gw
        .run(&["sandbox", "exec", "survivor", "--", "echo", "still here"])?
        .ok()?;
    assert_eq!(run.stdout, "still here\n");
    gw.run(&["sandbox", "delete", "survivor"])?.ok()?;
    assert!(process_exited(&pid, Duration::from_secs(10)));
    Ok(())
}

#[test]
fn sigkill_during_create_leaves_a_consistent_state() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    gw.run(&["sandbox", "create", "--name", "healthy", "--", "true"])?
        .ok()?;
    for point in [
        "create-after-record",
        "create-after-cgroup",
        "create-before-ready",
    ] {
        gw.run(&["gateway", "stop"])?.ok()?;
        let mut cmd = gw.command();
        cmd.env("OPENSHELL_FAILPOINT", point)
            .args(["gateway", "start"]);
        openshell_tests::gateway::run_with_timeout(cmd, b"", Duration::from_secs(60))?.ok()?;
        let crashed = gw.run(&["sandbox", "create", "--name", "half", "--", "true"])?;
        assert_ne!(
            crashed.code,
            Some(0),
            "{point}: create survived the failpoint"
        );
        let log = std::fs::read_to_string(gw.state_dir().join("gateway.log"))?;
        assert!(
            log.contains(&format!("failpoint {point}")),
            "{point}: {log}"
        );

        // The next CLI call starts a fresh gateway, which reconciles.
        let list = gw.run(&["sandbox", "list", "-o", "json"])?.ok()?.json()?;
        assert_eq!(names(&list), vec!["healthy"], "{point}: {list}");
        assert_eq!(list[0]["status"], "idle");
        assert!(!gw.cgroup_dir("half")?.exists(), "{point}: cgroup leaked");
        assert!(
            !gw.state_dir().join("sandboxes/half").exists(),
            "{point}: directory leaked"
        );
        // The name is free again.
        gw.run(&[
            "sandbox",
            "create",
            "--name",
            "half",
            "--no-keep",
            "--",
            "true",
        ])?
        .ok()?;
    }
    Ok(())
}

#[test]
fn orphan_cgroups_are_removed_at_start() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    let orphan = gw.cgroup_dir("orphan")?;
    std::fs::create_dir_all(&orphan)?;
    gw.run(&["gateway", "start"])?.ok()?;
    assert!(!orphan.exists(), "orphan cgroup survived reconciliation");
    let log = std::fs::read_to_string(gw.state_dir().join("gateway.log"))?;
    assert!(log.contains("removed orphan cgroups [\"orphan\"]"), "{log}");
    Ok(())
}

#[test]
fn status_and_error_output() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    gw.run(&["gateway", "start"])?.ok()?;
    let status = gw.run(&["gateway", "status"])?.ok()?;
    let pid = gw.gateway_pid().context("no pid")?.to_string();
    let redacted = status
        .stdout
        .replace(&gw.state_dir().display().to_string(), "[STATE]")
        .replace(&gw.cgroup_base_dir()?.display().to_string(), "[CGROUP]")
        .replace(&pid, "[PID]")
        .replace(env!("CARGO_PKG_VERSION"), "[VERSION]");
    insta::assert_snapshot!("gateway_status", redacted);
    let missing = gw.run(&["sandbox", "exec", "nope", "--", "true"])?;
    assert_eq!(missing.code, Some(1));
    insta::assert_snapshot!("exec_missing_sandbox", missing.stderr);
    Ok(())
}
